"""Attacks: one interface (attack(model, x, y) -> AttackResult), a registry by name.

Importing this package registers every attack.
"""
from . import autoattack, exp_attack, feature, generator_attacks, gradient, spsa, wpgd  # noqa: F401  (registration)
from .base import ATTACKS, Attack, AttackResult, list_attacks, make_attack, register_attack, verdict

__all__ = ["ATTACKS", "Attack", "AttackResult", "list_attacks", "make_attack", "register_attack", "verdict"]
