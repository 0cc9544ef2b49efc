"""Attacks: one interface (attack(model, x, y) -> AttackResult), a registry by name.

Importing this package registers every attack: every module in it is imported, so a new attack
is one new module with a `@register_attack("name")` class (docs/extending.md).
"""
from ..registry import import_package_modules
from .base import ATTACKS, Attack, AttackResult, list_attacks, make_attack, register_attack, verdict

import_package_modules(__name__, __path__)

__all__ = ["ATTACKS", "Attack", "AttackResult", "list_attacks", "make_attack", "register_attack", "verdict"]
