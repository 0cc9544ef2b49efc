"""Training methods: one interface (step(model, x, y) -> StepOutput), a registry by name.

Importing this package registers every method.
"""
from . import adt_am, adt_exp, baselines, wdat  # noqa: F401  (registration side effects)
from .base import (LOSSES, METHODS, MethodContext, StepOutput, TrainMethod, check_method, check_method_loss,
                   default_loss, list_methods, make_method, register_method)

__all__ = ["LOSSES", "METHODS", "MethodContext", "StepOutput", "TrainMethod", "check_method", "check_method_loss",
           "default_loss", "list_methods", "make_method", "register_method"]
