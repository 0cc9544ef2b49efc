"""Training methods: one interface (step(model, x, y) -> StepOutput), a registry by name.

Importing this package registers every method.
"""
from . import adt_am, adt_exp, baselines, wdat  # noqa: F401  (registration side effects)
from .base import METHODS, MethodContext, StepOutput, TrainMethod, list_methods, make_method, register_method

__all__ = ["METHODS", "MethodContext", "StepOutput", "TrainMethod", "list_methods", "make_method",
           "register_method"]
