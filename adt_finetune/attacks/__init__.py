"""Attacks: one interface (attack(model, x, y) -> AttackResult), a registry by name."""
from .base import ATTACKS, Attack, AttackResult, make_attack, register_attack

__all__ = ["ATTACKS", "Attack", "AttackResult", "make_attack", "register_attack"]
