"""Training methods: one interface (step(model, x, y) -> StepOutput), a registry by name.

Importing this package registers every method: every module in it is imported, so a new method
is one new module with a `@register_method("name")` class (docs/extending.md).
"""
from ..registry import import_package_modules
from .base import (LOSSES, METHODS, MethodContext, StepOutput, TrainMethod, check_loss, check_method,
                   check_method_loss, default_loss, list_methods, loss_for, make_method, register_method)

# The shipped methods first, in the order the benchmark lists them (baselines, then the ADT family).
import_package_modules(__name__, __path__, first=("baselines", "adt_exp", "adt_am", "wdat"))

__all__ = ["LOSSES", "METHODS", "MethodContext", "StepOutput", "TrainMethod", "check_loss", "check_method",
           "check_method_loss",
           "default_loss", "list_methods", "loss_for", "make_method", "register_method"]
