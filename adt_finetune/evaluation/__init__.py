"""Evaluation: suites, the per-example engine, sanity checks, and `adt-ft eval` as a function."""
from .engine import *  # noqa: F401,F403
from .engine import (DEFAULT_N_EXAMPLES, GENERATOR_ATTACKS, MODES, PSEUDO, SUITES, EvalRecord, EvalResult,
                     SanityCheck, Target, _ResumeState, check_attack_names, evaluate, evaluate_workspace, fingerprint,
                     load_examples, parse_attack_list, read_per_example_csv, resolve_target, sanity_checks,
                     suite_attacks, valid_attack_names)
