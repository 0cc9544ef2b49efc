"""What one evaluation produced: per-example flags and every number derived from them.

`EvalResult.write_csv` writes the per-example file (`<entry>.per-example.csv`),
one row per evaluated example, readable with `pandas.read_csv` or
`numpy.genfromtxt(..., delimiter=",", names=True, dtype=None, encoding=None)`:

    index            position of the example in the evaluated set (the first N test images, in order)
    label            true class index
    clean            1 if the clean image is classified correctly, else 0
    <attack>, ...    one column per attack in suite order: 1 robust (still correct), 0 broken,
                     empty = not run on it (cascade mode: an earlier attack already broke it).
                     Clean errors are 0 in every attack column.
    wpgd@δ, pgd20@δ  wasserstein suite only: W-PGD flags per budget δ and pointwise PGD-20 at ε = δ
                     (not part of `robust`)
    robust           1 if correct under every pointwise attack (mean of this column = A_rob)
    first_broken_by  "clean" for clean errors, else the first attack in suite order that broke it;
                     empty when robust
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils import atomic_write_text, format_eps, sha256_file


@dataclass
class SanityCheck:
    name: str
    ok: bool | None  # None: not applicable to this evaluation
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass
class EvalResult:
    """Per-example outcome of one evaluation; every summary number derives from `flags`."""

    attacks: list[str]              # attack columns in suite order (pointwise and distributional)
    indices: np.ndarray             # (N,) int64
    labels: np.ndarray              # (N,) int64
    clean: np.ndarray               # (N,) bool
    flags: np.ndarray               # (N, len(attacks)) int8: 1 robust, 0 broken, -1 not run
    eps: float
    mode: str
    seed: int
    batch_size: int
    device: str
    timings_s: dict[str, float] = field(default_factory=dict)
    #: each attack's largest ‖x'−x‖ in the threat model's norm (L∞, or L2 when threat_model is "L2")
    max_linf: dict[str, float] = field(default_factory=dict)
    attack_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    sanity: list[SanityCheck] = field(default_factory=list)
    wasserstein: dict[str, Any] | None = None
    #: columns reported but not part of A_rob: other threat models (W-PGD) or budgets
    excluded_from_a_rob: list[str] = field(default_factory=list)
    amp: bool = False               # --amp given: the attacks in amp_attacks searched under bf16 autocast
    amp_attacks: list[str] = field(default_factory=list)  # (their verdicts are still fp32; the rest ran in fp32)
    #: examples per chunk: batch-level randomness is keyed to these fixed chunks of the evaluated set (see `shards`)
    chunk_size: int | None = None
    shards: int = 1                 # processes or jobs that shared the work (torchrun ranks or --shard jobs)
    #: each shard's attack seconds when shards > 1 (then `timings_s` holds their sums)
    shard_timings_s: list[dict[str, float]] | None = None
    threat_model: str = "Linf"      # "L2": ε is an L2 radius and the distances are L2 norms

    def in_a_rob(self, column: str) -> bool:
        return column in self.attacks and column not in self.excluded_from_a_rob

    @property
    def n_examples(self) -> int:
        return int(len(self.labels))

    @property
    def pointwise(self) -> list[int]:
        """Column positions that count towards A_rob."""
        return [k for k, a in enumerate(self.attacks) if self.in_a_rob(a)]

    @property
    def robust(self) -> np.ndarray:
        """(N,) bool: correct under every pointwise attack (an unrun entry only
        happens after an earlier attack broke the example)."""
        cols = self.pointwise
        if not cols:
            return self.clean.copy()
        return self.clean & (self.flags[:, cols] == 1).all(axis=1)

    @property
    def clean_acc(self) -> float:
        return _pct(self.clean)

    @property
    def a_rob(self) -> float | None:
        """None when no pointwise attack ran (A_rob would just be clean accuracy)."""
        return _pct(self.robust) if self.pointwise else None

    @property
    def per_attack(self) -> dict[str, float | None]:
        """Each attack's own robust accuracy; None for pointwise attacks in cascade
        mode, whose columns only cover the examples that earlier attacks left."""
        out: dict[str, float | None] = {}
        for k, a in enumerate(self.attacks):
            comparable = self.mode == "independent" or not self.in_a_rob(a)
            out[a] = _pct(self.flags[:, k] == 1) if comparable else None
        return out

    @property
    def cumulative(self) -> dict[str, float]:
        """Robust accuracy against this attack and every earlier pointwise attack."""
        out: dict[str, float] = {}
        still = self.clean.copy()
        for k in self.pointwise:
            still &= self.flags[:, k] == 1
            out[self.attacks[k]] = _pct(still)
        return out

    @property
    def first_broken_by(self) -> list[str]:
        out = []
        cols = self.pointwise
        for i in range(self.n_examples):
            if not self.clean[i]:
                out.append("clean")
                continue
            broken = [self.attacks[k] for k in cols if self.flags[i, k] == 0]
            out.append(broken[0] if broken else "")
        return out

    @property
    def unreliable(self) -> bool:
        return any(c.ok is False for c in self.sanity)

    def display_value(self, column: str) -> float | None:
        """What a results table shows for a column: the attack's own accuracy, or
        in cascade mode its cumulative accuracy."""
        if column == "clean":
            return self.clean_acc
        if column == "A_rob":
            return self.a_rob
        own = self.per_attack.get(column)
        return own if own is not None else self.cumulative.get(column)

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "n_examples": self.n_examples,
            "seed": self.seed,
            "eps": self.eps,
            "eps_str": format_eps(self.eps),
            "batch_size": self.batch_size,
            "attacks": list(self.attacks),
            "clean_acc": self.clean_acc,
            "per_attack": self.per_attack,
            "per_attack_note": ("each attack on every clean-correct example" if self.mode == "independent" else
                                "cascade: attacks ran only on examples still robust, so per-attack accuracies "
                                "are unknown (null); see cumulative"),
            "cumulative": self.cumulative,
            "a_rob": self.a_rob,
            "excluded_from_a_rob": list(self.excluded_from_a_rob),
            "timings_s": dict(self.timings_s),
            "threat_model": self.threat_model,
            # The largest distance under its norm's name: an L2 entry never shows an "L∞" distance.
            ("max_l2" if self.threat_model == "L2" else "max_linf"): dict(self.max_linf),
            "attack_settings": jsonable(self.attack_settings),
            "sanity": [c.to_json() for c in self.sanity],
            "unreliable": self.unreliable,
            "wasserstein": self.wasserstein,
            "device": self.device,
            "amp": self.amp,
            "amp_attacks": list(self.amp_attacks),
            "chunk_size": self.chunk_size,
            "shards": self.shards,
            **({"shard_timings_s": self.shard_timings_s} if self.shard_timings_s else {}),
        }

    def csv_text(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["index", "label", "clean", *self.attacks, "robust", "first_broken_by"])
        robust = self.robust
        first = self.first_broken_by
        for i in range(self.n_examples):
            cells = ["" if f < 0 else str(int(f)) for f in self.flags[i]]
            writer.writerow([int(self.indices[i]), int(self.labels[i]), int(self.clean[i]), *cells,
                             int(robust[i]), first[i]])
        return buf.getvalue()

    def write_csv(self, path: str | Path) -> str:
        """Write the per-example file atomically; returns its sha256."""
        atomic_write_text(path, self.csv_text())
        return sha256_file(path)


def read_per_example_csv(path: str | Path) -> dict[str, list[str]]:
    """The per-example file as columns of strings (for checks without pandas)."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    return {h: [r[j] for r in body] for j, h in enumerate(header)}


def _pct(mask: np.ndarray) -> float:
    return float(100.0 * np.asarray(mask, dtype=bool).mean()) if len(mask) else 0.0


def jsonable(obj: Any) -> Any:
    """Settings and reports as JSON values (a small tensor as a list, anything else as its repr)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() <= 16:
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return repr(obj)
