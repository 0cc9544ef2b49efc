"""Evaluation: suites, the per-example engine, sanity checks, and `adt-ft eval` as a function.

    suites     attack suites and names          result     EvalResult, the per-example file
    engine     evaluate(): clean pass, attacks  resume     partial flags for --resume
    sanity     the sanity checks                targets    the model, test images, training images
    workspace_eval  evaluate_workspace()        wasserstein_suite  the W-PGD budget grid
    eval_request    EvalRequest (what `adt-ft eval` asks), EvalSettings (what the engine runs)
    shards     chunks, shards, combine()        shard_files  what a --shard job writes
    merge      merge_shards(): shard files into one leaderboard entry
    corruptions  the corruptions suite (corruption_files: CIFAR-10-C/100-C and ImageNet-C, corruption_run:
               evaluate_corruptions(), what evaluate_workspace runs for suite "corruptions")
    entry_claims  owning an entry's name while writing it, partial-results folders
    audit      audit_model(), audit_entry(): the robustness-evaluation audit (audit_checks: verdicts,
               audit_probes: gradient/randomness probes, audit_run: audit_workspace(), `adt-ft audit`)

The library draws nothing: progress goes to an optional `progress.Reporter`,
and the CLI draws the tables.
"""
from .corruption_files import CORRUPTIONS, SEVERITIES, CorruptionFiles, open_corruption_files
from .corruption_run import CorruptionRecord, evaluate_corruptions
from .corruptions import CorruptionResult, corruption_suite
from .engine import evaluate, evaluate_shard, evaluate_with
from .eval_request import EvalRequest, EvalSettings
from .merge import merge_shards
from .result import EvalResult, SanityCheck, read_per_example_csv
from .resume import _ResumeState, fingerprint
from .workspace_eval import EvalRecord, ShardRecord, default_entry_name, evaluate_workspace, evaluation_variant
from .sanity import LINF_TOLERANCE, check_finite_weights, sanity_checks
from .shards import CHUNK_SIZE, ShardPart, combine, parse_shard
from .suites import (COTRAINED_ATTACKS, GENERATOR_ATTACKS, MODES, PAPER, PSEUDO, SUITES, check_attack_names,
                     parse_attack_list, suite_attacks, valid_attack_names)
from .targets import (DEFAULT_N_EXAMPLES, TRAIN_IMAGES_FOR_ATTACKS, Target, load_attack_training_data, load_examples,
                      resolve_target)

__all__ = [
    "CHUNK_SIZE", "COTRAINED_ATTACKS", "DEFAULT_N_EXAMPLES", "LINF_TOLERANCE", "MODES", "PAPER", "PSEUDO",
    "SUITES", "TRAIN_IMAGES_FOR_ATTACKS", "EvalRecord", "EvalRequest", "EvalResult", "EvalSettings", "SanityCheck",
    "ShardPart", "ShardRecord",
    "Target", "_ResumeState", "check_attack_names", "check_finite_weights", "combine", "default_entry_name",
    "evaluation_variant",
    "evaluate", "evaluate_shard", "evaluate_with", "evaluate_workspace", "fingerprint", "load_attack_training_data",
    "load_examples",
    "merge_shards", "parse_attack_list", "parse_shard", "read_per_example_csv", "resolve_target", "sanity_checks",
    "suite_attacks", "valid_attack_names", "CORRUPTIONS", "SEVERITIES", "CorruptionFiles", "CorruptionRecord",
    "CorruptionResult", "corruption_suite", "evaluate_corruptions", "open_corruption_files",
]
