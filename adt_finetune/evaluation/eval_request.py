"""What an evaluation is asked to do, as typed values that travel unchanged from the caller to the use.

`EvalRequest` is `adt-ft eval` (or `evaluate_workspace`) as one value: the CLI builds it once from its
flags, a notebook builds it directly, and nothing in between repacks it. `EvalSettings` is what the
engine needs once the model and the images are known (`evaluate`, `evaluate_shard`). Each rule is
checked where its value is built: ε when `EvalRequest` is made (text such as '8/255' is parsed there,
once), attack names, mode, batch size and chunk size when `EvalSettings` is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import UserError
from ..utils import parse_eps
from .shards import CHUNK_SIZE, check_chunk_size
from .suites import check_attack_names, check_mode

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class EvalRequest:
    """Everything `adt-ft eval` takes (its flags, by the same names)."""

    model: str | None = None                    # zoo name or checkpoint file; default: latest run, else current model
    arch: str | None = None                     # with a checkpoint file
    arch_kwargs: dict[str, Any] | None = None
    run: str | None = None                      # run id or folder
    suite: str | None = None                    # default paper (corruptions: no attacks); a suite or attacks
    attacks: str | None = None                  # comma-separated names instead of a suite
    n_examples: int | None = None               # first N test images (default 1000, or all if fewer)
    eps: float | None = None                    # L∞ budget or L2 radius; text ('8/255') is parsed when made
    mode: str = "independent"                   # or cascade
    batch_size: int = 256
    seed: int = 0
    device: str = "auto"
    baseline: bool = False                      # also evaluate the run's base model
    dataset: str | None = None                  # name, or a folder of images with one subfolder per class
    data_dir: str | Path | None = None
    budgets: str | None = None                  # W-PGD budgets of the wasserstein suite
    entry: str | None = None                    # leaderboard entry name
    resume: bool = False
    workspace: str | Path = "."
    attack_settings: dict[str, dict[str, Any]] | None = None   # {attack: {setting: value}}
    amp: bool = False
    overwrite: bool = False
    shard: str | tuple[int, int] | None = None  # 'K/N': this job's shard of N
    shard_dir: str | Path | None = None
    chunk_size: int = CHUNK_SIZE
    threat_model: str = "Linf"                  # the leaderboard a --model zoo name is looked up in

    def __post_init__(self) -> None:
        if self.suite is not None and self.attacks is not None:
            raise UserError(f"give a suite ({self.suite!r}) or a list of attacks ({self.attacks!r}), not both")
        if self.attacks is None and self.suite is None:
            object.__setattr__(self, "suite", "paper")
        if self.eps is not None:
            object.__setattr__(self, "eps", parse_eps(self.eps))


#: the threat models the attacks implement (corruptions is not a norm ball)
THREAT_MODELS = ("Linf", "L2")


@dataclass(frozen=True)
class EvalSettings:
    """How the engine evaluates, model and images aside (the arguments of `evaluate`); the attack names,
    the mode, the batch and chunk sizes are checked when it is made."""

    attacks: Sequence[str]                      # registry names, plus "clean" and "wasserstein"
    eps: float
    mode: str = "independent"
    batch_size: int = 256
    seed: int = 0
    device: "str | torch.device" = "cpu"
    attack_settings: dict[str, dict[str, Any]] | None = None
    indices: Sequence[int] | None = None        # labels of the rows (default 0..N-1)
    budgets: Sequence[float] | str | None = None
    amp: bool = False
    train_data: "tuple[torch.Tensor, torch.Tensor] | None" = field(default=None, repr=False)
    chunk_size: int = CHUNK_SIZE
    threat_model: str = "Linf"                  # RobustBench's name: Linf or L2 (ε is then an L2 radius)

    def __post_init__(self) -> None:
        if self.threat_model not in THREAT_MODELS:
            raise UserError(f"threat model {self.threat_model!r}: evaluation supports {' and '.join(THREAT_MODELS)}")
        object.__setattr__(self, "attacks", check_attack_names(list(self.attacks)))
        check_mode(self.mode)
        if self.batch_size <= 0:
            raise UserError(f"`batch_size` must be positive, got {self.batch_size}")
        object.__setattr__(self, "chunk_size", check_chunk_size(self.chunk_size))
