"""Sharded evaluation (docs/evaluation.md, "Sharded evaluation"): fixed chunks of the
evaluated set, shards made of whole chunks, and one result from the shards' flags.

Chunk c holds the examples at positions [c·C, (c+1)·C) of the evaluated set, C the
chunk size (`CHUNK_SIZE` unless the evaluation says otherwise; it is recorded in the
result). Shard k of n takes the chunks c with c mod n = k. The engine

- never puts examples of two chunks in one attack batch, and cuts each chunk's
  examples into batches the same way in every process (`chunk_batches`);
- keys every batch's randomness to its chunk and its place in the chunk (the
  global RNG it reseeds, `attacks.base.keyed_batch` for AutoAttack's batch-level
  draws); attacks seeded per example (exp and the generators too) stay so.

So an example's flags do not depend on how many processes shared the work, on
which one took its chunk, or on a resume in between: a world of 2, `--shard 0/2` +
`--shard 1/2` + merge, and one process write the same per-example file. Attacks
whose budget is shared by the whole set (W-PGD) cannot be split and are refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np

from ..errors import UserError
from .result import EvalResult, jsonable
from .sanity import check_finite_logits, degenerate_model_checks, sanity_checks

#: examples per chunk; the default `--batch-size` too, so that a default batch is a whole chunk
CHUNK_SIZE = 256


def parse_shard(text: str | Sequence[int]) -> tuple[int, int]:
    """'1/4' -> (1, 4): shard 1 of 4 (shards count from 0)."""
    if isinstance(text, (tuple, list)):
        shown, parts = f"{text[0]}/{text[1]}", [str(v) for v in text]
    else:
        shown = str(text).strip()
        parts = shown.split("/")
    try:
        k, n = (int(v) for v in parts)
    except ValueError:
        k = n = -1
    if n < 1 or not 0 <= k < n:
        raise UserError(f"`shard` {shown}: write K/N with 0 <= K < N, e.g. `shard` 0/4 for the first of four jobs")
    return k, n


def check_chunk_size(chunk_size: Any) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0:
        raise UserError(f"`chunk_size` must be a positive whole number, got {chunk_size!r}")
    return int(chunk_size)


def shard_rows(n: int, chunk_size: int, shard: tuple[int, int]) -> np.ndarray:
    """Positions (sorted) of the examples in shard k of n: its whole chunks."""
    k, n_shards = shard
    return np.flatnonzero((np.arange(n) // chunk_size) % n_shards == k).astype(np.int64)


class Batch(NamedTuple):
    start: int   # slice [start, stop) of the positions handed to `chunk_batches`
    stop: int
    key: str     # "<chunk>.<batch within the chunk>": what the batch's randomness is keyed to


def chunk_batches(positions: np.ndarray, chunk_size: int, batch_size: int) -> list[Batch]:
    """Batches of at most `batch_size` of the sorted `positions` that never cross a chunk."""
    chunks = np.asarray(positions, dtype=np.int64) // chunk_size
    out: list[Batch] = []
    i = 0
    while i < len(chunks):
        c = int(chunks[i])
        end = int(np.searchsorted(chunks, c, side="right"))
        out += [Batch(s, min(s + batch_size, end), f"{c}.{j}") for j, s in enumerate(range(i, end, batch_size))]
        i = end
    return out


@dataclass
class ShardPart:
    """One shard's evaluation: the rows of its chunks, and what combining the shards needs."""

    result: EvalResult                          # this shard's rows only, no sanity checks yet
    positions: np.ndarray                       # (rows,) each row's position in the evaluated set
    n_total: int                                # examples in the whole evaluated set
    shard: tuple[int, int]                      # (k, n)
    chunk_size: int
    fingerprint: str                            # of the whole evaluation: equal in every shard of it
    ranges: dict[str, tuple[float, float]]      # per attack: min and max pixel of x' (the range check)
    black_box: list[str]                        # attacks that ignore gradients (the masking check)
    n_bad: int = 0                              # images with a non-finite clean logit
    predicted: np.ndarray | None = None         # (rows,) strict top class on the clean image, −1 for none
    n_classes: int | None = None                # logits per image

    @property
    def label(self) -> str:
        return f"shard {self.shard[0]}/{self.shard[1]}"

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {"shard": list(self.shard), "n_total": self.n_total, "chunk_size": self.chunk_size,
                "fingerprint": self.fingerprint, "positions": self.positions.tolist(),
                "indices": r.indices.tolist(), "labels": r.labels.tolist(), "clean": r.clean.astype(int).tolist(),
                "attacks": list(r.attacks), "flags": r.flags.tolist(), "eps": r.eps, "mode": r.mode, "seed": r.seed,
                "batch_size": r.batch_size, "device": r.device, "timings_s": dict(r.timings_s),
                "max_linf": dict(r.max_linf), "threat_model": r.threat_model, "attack_settings": jsonable(r.attack_settings), "amp": r.amp,
                "amp_attacks": list(r.amp_attacks), "excluded_from_a_rob": list(r.excluded_from_a_rob),
                "ranges": {a: list(v) for a, v in self.ranges.items()}, "black_box": list(self.black_box),
                "n_bad": self.n_bad, "n_classes": self.n_classes,
                "predicted": None if self.predicted is None else self.predicted.tolist()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ShardPart":
        n_cols = len(d["attacks"])
        flags = np.asarray(d["flags"], dtype=np.int8).reshape(len(d["positions"]), n_cols)
        result = EvalResult(
            attacks=list(d["attacks"]), indices=np.asarray(d["indices"], dtype=np.int64),
            labels=np.asarray(d["labels"], dtype=np.int64), clean=np.asarray(d["clean"], dtype=bool), flags=flags,
            eps=float(d["eps"]), mode=d["mode"], seed=int(d["seed"]), batch_size=int(d["batch_size"]),
            device=d["device"], timings_s=dict(d["timings_s"]), max_linf=dict(d["max_linf"]),
            attack_settings=d["attack_settings"], amp=bool(d["amp"]), amp_attacks=list(d["amp_attacks"]),
            excluded_from_a_rob=list(d["excluded_from_a_rob"]), chunk_size=int(d["chunk_size"]),
            threat_model=d.get("threat_model", "Linf"))
        return cls(result, np.asarray(d["positions"], dtype=np.int64), int(d["n_total"]), tuple(d["shard"]),
                   int(d["chunk_size"]), d["fingerprint"], {a: (float(v[0]), float(v[1])) for a, v in
                                                            d["ranges"].items()}, list(d["black_box"]),
                   int(d.get("n_bad", 0)),
                   None if d.get("predicted") is None else np.asarray(d["predicted"], dtype=np.int64),
                   None if d.get("n_classes") is None else int(d["n_classes"]))


def check_shards(parts: Sequence[ShardPart], names: Sequence[str] | None = None) -> None:
    """Refuse (one line, naming it) a missing or duplicated shard, or shards of different evaluations."""
    if not parts:
        raise UserError("no shards to merge: give the shard files (or their folder) that 'adt-ft eval `shard`' wrote")
    names = list(names) if names is not None else [p.label for p in parts]
    first, first_name = parts[0], names[0]
    for p, name in zip(parts[1:], names[1:]):
        if p.shard[1] != first.shard[1]:
            raise UserError(f"{name} is one of {p.shard[1]} shards but {first_name} one of {first.shard[1]}: "
                            "merge the shards of one evaluation")
        if p.fingerprint != first.fingerprint:
            raise UserError(f"{name} and {first_name} are shards of different evaluations (model, examples or "
                            "settings differ): merge the shards of one evaluation")
    seen: dict[int, str] = {}
    for p, name in zip(parts, names):
        if p.shard[0] in seen:
            raise UserError(f"shard {p.shard[0]}/{p.shard[1]} is given twice ({seen[p.shard[0]]} and {name}): "
                            "keep one of them")
        seen[p.shard[0]] = name
    n = first.shard[1]
    missing = [k for k in range(n) if k not in seen]
    if missing:
        raise UserError(f"shard {missing[0]}/{n} is missing" + (f" (and {len(missing) - 1} more)"
                                                               if len(missing) > 1 else "")
                        + f": run the evaluation with `shard` {missing[0]}/{n}, then merge again")


def combine(parts: Sequence[ShardPart], names: Sequence[str] | None = None) -> EvalResult:
    """One result from every shard of an evaluation (checked first), with its sanity checks."""
    check_shards(parts, names)
    parts = sorted(parts, key=lambda p: p.shard[0])
    first, n = parts[0], parts[0].n_total
    fr = first.result
    flags = np.full((n, len(fr.attacks)), -1, dtype=np.int8)
    clean, labels, indices = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    covered = np.zeros(n, dtype=np.int64)
    for p in parts:
        pos, r = p.positions, p.result
        covered[pos] += 1
        flags[pos], clean[pos], labels[pos], indices[pos] = r.flags, r.clean, r.labels, r.indices
    if not (covered == 1).all():  # cannot happen for complete shards of one evaluation
        raise UserError(f"the shards cover {int((covered == 0).sum())} example(s) not at all and "
                        f"{int((covered > 1).sum())} twice: merge the shards of one evaluation")
    timings = {a: float(sum(p.result.timings_s.get(a, 0.0) for p in parts)) for a in fr.timings_s}
    max_linf = {a: max(p.result.max_linf[a] for p in parts) for a in fr.max_linf}
    ranges = {a: (min(p.ranges[a][0] for p in parts), max(p.ranges[a][1] for p in parts)) for a in first.ranges}
    devices = list(dict.fromkeys(p.result.device for p in parts))
    # What an attack resolves when it prepares joins its settings; a shard with nothing to attack never prepares.
    settings = {a: {k: v for p in parts for k, v in p.result.attack_settings.get(a, {}).items()}
                for a in fr.attack_settings}
    result = EvalResult(
        attacks=list(fr.attacks), indices=indices, labels=labels, clean=clean, flags=flags, eps=fr.eps, mode=fr.mode,
        seed=fr.seed, batch_size=fr.batch_size, device=", ".join(devices), timings_s=timings, amp=fr.amp,
        amp_attacks=list(fr.amp_attacks), max_linf=max_linf, attack_settings=settings,
        wasserstein=fr.wasserstein, excluded_from_a_rob=list(fr.excluded_from_a_rob), chunk_size=first.chunk_size,
        threat_model=fr.threat_model, shards=len(parts), shard_timings_s=[dict(p.result.timings_s) for p in parts] if len(parts) > 1 else None)
    finite = check_finite_logits(sum(p.n_bad for p in parts), n)
    degenerate: list = []
    if all(p.predicted is not None for p in parts) and first.n_classes:
        predicted = np.full(n, -1, dtype=np.int64)
        for p in parts:
            predicted[p.positions] = p.predicted
        degenerate = degenerate_model_checks(result, predicted, first.n_classes)
    result.sanity = [finite] + degenerate + sanity_checks(result, ranges, black_box=set(first.black_box))
    return result
