"""Architectures that ship with adt-ft (small ones for CPU work; zoo ones come from RobustBench)."""
from .small import SmallCNN, SmallResNet

__all__ = ["SmallCNN", "SmallResNet"]
