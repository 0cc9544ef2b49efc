"""The evaluation engine: clean accuracy once, then every attack of a suite,
with a per-example robust flag for every (example, attack) pair.

Definitions: docs/evaluation.md, "Per-example accuracy". All accuracies are percentages in [0, 100].

- Clean logits are computed once. Attacks run only on clean-correct examples:
  a clean error is non-robust under every attack (x itself lies in the ball).
- `independent` mode (default): every attack runs on every clean-correct
  example, so each attack's column is its own robust accuracy (the ADT paper's
  Table 1). `cascade` mode: each attack runs only on the examples still robust
  to every earlier attack, which is the fastest way to A_rob (as AutoAttack
  does); its per-attack columns are *cumulative* (robust to this attack and
  every earlier one), so `per_attack` is null and `cumulative` holds them.
- A_rob = mean over examples of the minimum over all pointwise attacks run
  (Carlini et al.'s per-example worst case). It is the same in both modes for
  attacks whose outcome on an example does not depend on which other examples
  share its batch.
- Distributional attacks (`wpgd`, and the W-PGD grid of the `wasserstein`
  suite with its pointwise PGD-20 reference at each budget δ) belong to other
  threat models or budgets: single images may move further than ε. Their
  columns are reported beside the others but are not part of A_rob, and they
  always see the whole set (the budget is shared by all images).

Per-example file (`<entry>.per-example.csv`, written by `EvalResult.write_csv`),
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
import hashlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..precision import amp_dtype_name, autocast_context
from ..nets import eval_mode
from ..utils import atomic_write_json, atomic_write_text, format_eps, sha256_file

PAPER = ["clean", "fgsm", "pgd20", "pgd100", "mim", "cw", "feature", "autoattack"]
SUITES: dict[str, list[str]] = {
    "paper": PAPER,
    "aa": ["clean", "autoattack"],
    "quick": ["clean", "fgsm", "pgd20"],
    "full": PAPER + ["spsa", "exp"],  # + the run's generator attack, see suite_attacks
    "wasserstein": ["clean", "wasserstein"],
}
MODES = ("independent", "cascade")
#: pseudo-attack names: `clean` is always evaluated; `wasserstein` is the W-PGD budget grid
PSEUDO = ("clean", "wasserstein")
GENERATOR_ATTACKS = ("exp-am", "imp-am")

LINF_TOLERANCE = 1e-6
RESUME_FORMAT = 1


# ---------------------------------------------------------------- suites and names

def valid_attack_names() -> list[str]:
    from ..attacks import ATTACKS

    return list(PSEUDO) + sorted(ATTACKS)


def parse_attack_list(text: str) -> list[str]:
    """'fgsm, pgd20,cw' -> ['clean', 'fgsm', 'pgd20', 'cw'], validated against the registry."""
    names = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    if not names:
        raise UserError("--attacks is empty: give a comma-separated list such as fgsm,pgd20")
    return check_attack_names(["clean"] + [n for n in names if n != "clean"])


def check_attack_names(names: Sequence[str]) -> list[str]:
    valid = valid_attack_names()
    for n in names:
        if n not in valid:
            raise UserError(f"unknown attack {n!r}: choose from {', '.join(valid)}")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise UserError(f"attack {n!r} is listed twice")
        seen.add(n)
    return list(names)


def suite_attacks(suite: str, *, generator_method: str | None = None) -> list[str]:
    """The attack names of a suite, in order. `full` adds the run's generator
    attack (exp-am or imp-am) when the run trained one."""
    key = str(suite).strip().lower()
    if key not in SUITES:
        raise UserError(f"unknown suite {suite!r}: choose from {', '.join(SUITES)}")
    names = list(SUITES[key])
    if key == "full" and generator_method in GENERATOR_ATTACKS:
        names.append(generator_method)
    return names


# ---------------------------------------------------------------- results

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
    max_linf: dict[str, float] = field(default_factory=dict)
    attack_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    sanity: list[SanityCheck] = field(default_factory=list)
    wasserstein: dict[str, Any] | None = None
    #: columns reported but not part of A_rob: other threat models (W-PGD) or budgets
    excluded_from_a_rob: list[str] = field(default_factory=list)
    amp: bool = False               # --amp given: the attacks in amp_attacks searched under bf16 autocast
    amp_attacks: list[str] = field(default_factory=list)  # (their verdicts are still fp32; the rest ran in fp32)

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
            "max_linf": dict(self.max_linf),
            "attack_settings": _jsonable(self.attack_settings),
            "sanity": [c.to_json() for c in self.sanity],
            "unreliable": self.unreliable,
            "wasserstein": self.wasserstein,
            "device": self.device,
            "amp": self.amp,
            "amp_attacks": list(self.amp_attacks),
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


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() <= 16:
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return repr(obj)


# ---------------------------------------------------------------- resume

def fingerprint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **settings: Any) -> str:
    """sha256 over the weights, the examples and every setting that changes a flag,
    so a resumed evaluation never mixes flags of different evaluations."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for t in (x, y):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(_jsonable(settings), sort_keys=True).encode())
    return h.hexdigest()


class _ResumeState:
    """Partial flags on disk: one JSON file rewritten atomically after each batch."""

    def __init__(self, path: Path | None, fp: str):
        self.path = path
        self.data: dict[str, Any] = {"format": RESUME_FORMAT, "fingerprint": fp, "attacks": {}}
        if path is not None and path.exists():
            try:
                saved = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise UserError(f"partial evaluation state {path} is unreadable ({e}): delete it and start again")
            if saved.get("fingerprint") != fp or saved.get("format") != RESUME_FORMAT:
                raise UserError(f"the partial evaluation in {path.parent} is for a different model, examples or "
                                "settings: rerun without --resume to start over")
            self.data = saved

    def attack(self, name: str) -> dict[str, Any]:
        return self.data["attacks"].setdefault(
            name, {"done": False, "robust": [], "time_s": 0.0, "max_linf": 0.0, "min": 1.0, "max": 0.0})

    def save(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, self.data)


# ---------------------------------------------------------------- the engine

def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attacks: Sequence[str],
    eps: float,
    mode: str = "independent",
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
    attack_settings: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
    resume_dir: str | Path | None = None,
    indices: Sequence[int] | None = None,
    budgets: Sequence[float] | str | None = None,
    amp: bool = False,
) -> EvalResult:
    """Evaluate `model` on (x, y) under `attacks` (registry names, plus "clean"
    and "wasserstein"); see the module docstring for the definitions.

    `attack_settings[name]` overrides an attack's settings. With `resume_dir`,
    flags are saved there after every batch and a later call with the same
    model, examples and settings skips the finished work (a different model,
    example set or setting is refused). `budgets` are the W-PGD budgets of the
    "wasserstein" pseudo-attack (None: its defaults around ε). `indices` label
    the rows of the per-example file (default 0..N-1).
    """
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}: choose independent or cascade")
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    if len(x) != len(y) or len(x) == 0:
        raise UserError(f"need a non-empty set of examples with one label each (got {len(x)} images, {len(y)} labels)")
    names = check_attack_names(list(attacks))
    attack_names = [a for a in names if a not in PSEUDO]
    settings = {k: dict(v) for k, v in (attack_settings or {}).items()}
    unknown = sorted(set(settings) - set(attack_names))
    if unknown:
        raise UserError(f"settings given for {unknown[0]!r}, which is not in the attack list")
    budget_list = None
    if "wasserstein" in names and budgets is not None:
        from ..perturb.wasserstein import parse_budgets

        budget_list = parse_budgets(budgets)
    device = torch.device(device)
    if amp and amp_dtype_name(device, True) != "bf16":
        # fp16 without loss scaling underflows the input gradients of confident examples
        # (sign(0) = 0 stalls the attack): a weaker attack would report too high a number.
        raise UserError(f"--amp: evaluation searches in bf16, which device {device} does not support; drop --amp")
    x = x.detach().float().cpu()
    y = y.detach().long().cpu()
    n = len(x)
    idx = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    if idx.shape != (n,):
        raise ValueError(f"indices must have one entry per example ({n}), got shape {idx.shape}")
    model = model.to(device)

    from ..attacks import make_attack

    # Built up front so that a bad setting fails before any compute.
    attack_objs = {a: make_attack(a, eps, seed=seed, **settings.get(a, {})) for a in attack_names}
    recorded_settings = {a: _jsonable(obj.settings()) for a, obj in attack_objs.items()}
    # Not in A_rob: attacks outside the pointwise ε-ball (W-PGD's shared budget).
    excluded = [a for a, obj in attack_objs.items() if not obj.linf_bounded]

    fp = fingerprint(model, x, y, attacks=names, eps=eps, mode=mode, seed=seed, batch_size=batch_size,
                     settings=recorded_settings, budgets=budget_list, amp=amp)
    state = _ResumeState(Path(resume_dir) / "state.json" if resume_dir is not None else None, fp)

    columns = list(attack_names)
    flags = np.full((n, len(columns)), -1, dtype=np.int8)
    timings: dict[str, float] = {}
    max_linf: dict[str, float] = {}
    ranges: dict[str, tuple[float, float]] = {}
    with eval_mode(model):
        clean = _clean_correct(model, x, y, batch_size, device)
        flags[~clean, :] = 0
        x_dev = y_dev = None
        with _Progress(progress) as bar:
            for k, name in enumerate(columns):
                attack = attack_objs[name]
                if attack.dataset_level:
                    # The budget is shared by the whole set, so it must see the whole set.
                    pool = np.arange(n)
                elif mode == "independent" or name in excluded:
                    pool = np.flatnonzero(clean)
                else:
                    earlier = [j for j in range(k) if columns[j] not in excluded]
                    pool = np.flatnonzero(clean & (flags[:, earlier] == 1).all(axis=1))
                st = state.attack(name)
                if not st["done"]:
                    if x_dev is None:
                        x_dev, y_dev = x.to(device), y.to(device)
                    step = max(1, len(pool)) if attack.dataset_level else batch_size
                    _run_attack(attack, model, x, y, x_dev, y_dev, pool, st, state, bar,
                                batch_size=step, seed=seed, device=device, n_total=n, amp=amp)
                if len(st["robust"]) != len(pool):
                    raise UserError(f"the partial evaluation state in {resume_dir} does not match this evaluation "
                                    "(attack order or examples): rerun without --resume")
                flags[pool, k] = np.asarray(st["robust"], dtype=np.int8)
                flags[~clean, k] = 0  # a clean error stays an error, whatever a dataset-level attack reports
                timings[name] = float(st["time_s"])
                if attack.linf_bounded:
                    max_linf[name] = float(st["max_linf"])
                ranges[name] = (float(st["min"]), float(st["max"]))

        wasserstein_json = None
        if "wasserstein" in names:
            # After the bars above are closed: rich allows one live display at a time.
            w_cols, w_flags, wasserstein_json, w_time = _run_wasserstein(
                model, x, y, clean, state, eps=eps, budgets=budget_list, batch_size=batch_size,
                device=device, seed=seed, progress=progress)
            columns += w_cols
            excluded += w_cols
            flags = np.concatenate([flags, w_flags], axis=1)
            timings["wasserstein"] = w_time

    result = EvalResult(
        attacks=columns, indices=idx, labels=y.numpy().astype(np.int64), clean=clean, flags=flags,
        eps=float(eps), mode=mode, seed=seed, batch_size=batch_size, device=str(device), timings_s=timings, amp=amp,
        amp_attacks=[a for a, o in attack_objs.items() if amp and o.amp_search],
        max_linf=max_linf, attack_settings=recorded_settings, wasserstein=wasserstein_json,
        excluded_from_a_rob=excluded)
    result.sanity = sanity_checks(result, ranges, black_box={a for a, o in attack_objs.items() if o.black_box})
    return result


def _clean_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                   device: torch.device) -> np.ndarray:
    out = []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            pred = model(x[s:s + batch_size].to(device)).argmax(1).cpu()
            out.append((pred == y[s:s + batch_size]).numpy())
    return np.concatenate(out).astype(bool)


def _batch_seed(seed: int, name: str, start: int) -> int:
    # Per-batch reseeding makes a resumed run draw the same random starts as an
    # uninterrupted one for attacks that use the global RNG.
    digest = hashlib.sha256(f"{seed}:{name}:{start}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _run_attack(attack, model, x, y, x_dev, y_dev, pool: np.ndarray, st: dict, state: _ResumeState, bar,
                *, batch_size: int, seed: int, device: torch.device, n_total: int, amp: bool = False) -> None:
    name = attack.name
    done = len(st["robust"])
    robust_so_far = int(sum(st["robust"]))
    task = bar.add_task(name, total=len(pool), completed=done,
                        acc=_running_acc(robust_so_far, done, len(pool), n_total))
    if done < len(pool):
        attack.prepare(model, x_dev, y_dev)
    for start in range(done, len(pool), batch_size):
        ids = torch.from_numpy(pool[start:start + batch_size])
        xb, yb = x[ids].to(device), y[ids].to(device)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=_rng_devices(device)):
            torch.manual_seed(_batch_seed(seed, name, start))
            # The attack searches in bf16 only if it may (`amp_search`); its verdict is fp32's.
            res = attack(model, xb, yb, precision=amp_dtype_name(device, amp))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        robust = res.robust.detach().reshape(-1).bool().cpu()
        if robust.shape[0] != len(ids) or res.x_adv.shape != xb.shape:
            raise RuntimeError(f"attack {name!r} returned shapes {tuple(res.x_adv.shape)}/{tuple(robust.shape)} "
                               f"for a batch of {tuple(xb.shape)}")
        with torch.no_grad():
            x_adv = res.x_adv.detach()
            dist = (x_adv.float() - xb).abs().flatten(1).amax(1).max().item()
            lo, hi = x_adv.min().item(), x_adv.max().item()
        st["robust"].extend(int(v) for v in robust.tolist())
        st["time_s"] += elapsed
        st["max_linf"] = max(st["max_linf"], dist)
        st["min"], st["max"] = min(st["min"], lo), max(st["max"], hi)
        robust_so_far += int(robust.sum())
        if len(st["robust"]) == len(pool):
            st["done"] = True
        state.save()
        bar.update(task, advance=len(ids),
                   acc=_running_acc(robust_so_far, len(st["robust"]), len(pool), n_total))
    st["done"] = True
    state.save()


def _running_acc(robust: int, done: int, pool: int, n_total: int) -> str:
    # The rate among attacked examples scaled to the whole set: it ends at the
    # column's accuracy (independent) or the cumulative one (cascade).
    if done == 0:
        return "acc   —  "
    return f"acc {100.0 * robust / done * pool / n_total:6.2f}%"


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def _run_wasserstein(model, x, y, clean: np.ndarray, state: _ResumeState, *, eps, budgets, batch_size, device,
                     seed, progress):
    st = state.attack("wasserstein")
    if not st["done"]:
        from .wasserstein import wasserstein_suite

        t0 = time.perf_counter()
        report = wasserstein_suite(model, x, y, eps=eps, budgets=budgets, batch_size=batch_size, device=device,
                                   seed=seed, progress=progress)
        st["time_s"] += time.perf_counter() - t0
        st["columns"] = {str(c): [int(v) for v in torch.as_tensor(f).bool().cpu().tolist()]
                         for c, f in report.flags.items()}
        st["report"] = _jsonable(report.to_json())
        st["done"] = True
        state.save()
    cols = list(st["columns"])
    w_flags = np.zeros((len(clean), len(cols)), dtype=np.int8)
    for j, c in enumerate(cols):
        # A clean error stays an error: its flag is 0 whatever W-PGD's own bookkeeping says.
        w_flags[:, j] = np.asarray(st["columns"][c], dtype=bool) & clean
    return cols, w_flags, st["report"], float(st["time_s"])


class _Progress:
    """rich progress bars on stderr (stdout stays clean for tables and JSON)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            from ..cli.common import err_console

            self._bar = Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[acc]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=err_console, transient=False)
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def add_task(self, name: str, **kw):
        return self._bar.add_task(name, **kw) if self._bar is not None else None

    def update(self, task, **kw):
        if self._bar is not None:
            self._bar.update(task, **kw)


# ---------------------------------------------------------------- sanity checks

def sanity_checks(result: EvalResult, ranges: dict[str, tuple[float, float]],
                  black_box: set[str]) -> list[SanityCheck]:
    """The sanity checks of docs/evaluation.md, "Sanity checks". A failed check marks the result unreliable."""
    checks: list[SanityCheck] = []
    eps = result.eps
    pointwise = [result.attacks[k] for k in result.pointwise]

    bounded = [a for a in result.max_linf if a in pointwise]
    if bounded:
        worst = max(bounded, key=lambda a: result.max_linf[a])
        d = result.max_linf[worst]
        ok = d <= eps + LINF_TOLERANCE
        rounding = " (up to float32 rounding)" if ok and d > eps else ""
        checks.append(SanityCheck("linf", ok, f"max ‖x'−x‖∞ = {d:.6g} ({worst}) {'≤' if ok else '>'} ε = {eps:.6g}"
                                  + (rounding if ok else ": the attack leaves the threat model, its numbers are invalid")))
    # An attack that ran on no example leaves its initial (empty) range: min > max.
    ran = {a: r for a, r in ranges.items() if r[0] <= r[1]}
    if ran:
        lo, hi = min(r[0] for r in ran.values()), max(r[1] for r in ran.values())
        outside = [a for a, r in ran.items() if r[0] < 0.0 or r[1] > 1.0]
        checks.append(SanityCheck("range", not outside,
                                  f"every x' in [0, 1] (min {lo:.6g}, max {hi:.6g})" if not outside else
                                  f"x' leaves [0, 1] under {', '.join(outside)} (min {lo:.6g}, max {hi:.6g})"))

    if "pgd20" in pointwise and "pgd100" in pointwise:
        if result.mode == "independent":
            acc = result.per_attack
            slack = max(100.0 / result.n_examples, 0.5)
            ok = acc["pgd100"] <= acc["pgd20"] + slack
            checks.append(SanityCheck(
                "pgd100 ≤ pgd20", ok,
                f"pgd100 {acc['pgd100']:.2f}% vs pgd20 {acc['pgd20']:.2f}% (slack {slack:.2f} pp)" if ok else
                f"pgd100 {acc['pgd100']:.2f}% is above pgd20 {acc['pgd20']:.2f}% by more than {slack:.2f} pp: "
                "more steps should not help the model; suspect the attack or gradient masking"))
        else:
            checks.append(SanityCheck("pgd100 ≤ pgd20", None, "not comparable in cascade mode"))

    bb = [a for a in pointwise if a in black_box]
    wb = [a for a in pointwise if a not in black_box]
    if bb and wb:
        cols = {a: result.attacks.index(a) for a in pointwise}
        wb_robust = np.all([result.flags[:, cols[a]] == 1 for a in wb], axis=0)
        bb_broken = np.any([result.flags[:, cols[a]] == 0 for a in bb], axis=0)
        only_bb = int((wb_robust & bb_broken).sum())
        limit = max(2, math.ceil(0.01 * result.n_examples))
        ok = only_bb < limit
        checks.append(SanityCheck(
            "black-box vs white-box", ok,
            f"{only_bb} example(s) broken only by black-box attacks ({', '.join(bb)})" if ok else
            f"black-box attacks ({', '.join(bb)}) broke {only_bb} example(s) ({100.0 * only_bb / result.n_examples:.2f}%) "
            "that every white-box attack missed: the gradients may be masked; trust the lower numbers"))
    return checks


# ---------------------------------------------------------------- printing

def results_table(rows: Sequence[tuple[str, EvalResult]], title: str | None = None):
    """A rich table like the ADT paper's Table 1: one row per model, columns
    clean, each attack, A_rob; with two rows, a third shows the change."""
    from rich.table import Table

    columns: list[str] = []
    for _, r in rows:
        columns += [a for a in r.attacks if a not in columns]
    cascade = any(r.mode == "cascade" for _, r in rows)
    table = Table(title=title, caption=("cascade mode: attack columns are cumulative (robust to it and every "
                                        "earlier attack)" if cascade else None))
    table.add_column("model", min_width=min(24, max(len(label) for label, _ in rows)))
    for c in ["clean", *columns, "A_rob"]:
        numeric_style = dict(justify="right", no_wrap=True, min_width=len(c))
        marked = cascade and any(r.in_a_rob(c) for _, r in rows)
        table.add_column(c + ("*" if marked else ""), style="bold" if c == "A_rob" else None, **numeric_style)
    for label, r in rows:
        table.add_row(label, *[_fmt(r.display_value(c)) for c in ["clean", *columns, "A_rob"]])
    if len(rows) == 2:
        (_, before), (_, after) = rows
        deltas = []
        for c in ["clean", *columns, "A_rob"]:
            b, a = before.display_value(c), after.display_value(c)
            deltas.append("" if a is None or b is None else f"{a - b:+.2f}")
        table.add_row("change", *deltas, style="italic")
    return table


def print_wide(console, renderable) -> None:
    """Print a table whole: into a pipe or file at the width it needs (rich would
    otherwise crop it at 80 columns); on a terminal, rich fits it to the window."""
    from rich.console import Console

    need = console.measure(renderable, options=console.options.update(width=10_000)).maximum
    if need > console.width and not console.is_terminal:
        Console(file=console.file, width=need, color_system=None).print(renderable)
    else:
        console.print(renderable)


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def print_sanity(result: EvalResult, console) -> None:
    from rich.markup import escape

    for c in result.sanity:
        detail = escape(c.detail)
        if c.ok is None:
            console.print(f"  [dim]– {c.name}: {detail}[/]", highlight=False, soft_wrap=True)
        elif c.ok:
            console.print(f"  [green]✓[/] {c.name}: {detail}", highlight=False, soft_wrap=True)
        else:
            console.print(f"  [bold yellow]⚠ WARNING[/] {c.name}: {detail}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- workspace-level evaluation (what `adt-ft eval` runs)

DEFAULT_N_EXAMPLES = 1000
_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-"


@dataclass
class Target:
    """A model to evaluate, with what the leaderboard entry says about it."""

    label: str
    model: nn.Module
    dataset: str
    threat_model: str
    info: dict[str, Any]                  # RobustBench's descriptive fields
    context: dict[str, Any]               # the entry's "adt_ft" facts: base_model, method, run_id, ...
    default_entry: str
    generator_method: str | None = None   # the run's amortised generator (exp-am / imp-am), an attack for `full`
    generator_path: Path | None = None
    base: "Target | None" = None          # the run's base model, for --baseline


@dataclass
class EvalRecord:
    target: Target
    result: EvalResult
    baseline: EvalResult | None
    json_path: Path
    csv_path: Path
    suite: str
    data_source: str


def _clean_name(text: str) -> str:
    out = "".join(c if c in _NAME_CHARS else "-" for c in text).strip("-.")
    return out or "entry"


def _arch_label(arch: str) -> str:
    return arch.rpartition(":")[2] if ":" in arch else arch


def _zoo_info(entry) -> dict[str, Any]:
    return {"name": entry.title, "link": entry.link, "authors": entry.authors, "venue": entry.venue,
            "architecture": entry.architecture, "additional_data": bool(entry.additional_data),
            "number_forward_passes": int(entry.number_forward_passes or 1)}


def _ref_info(ref) -> dict[str, Any]:
    """RobustBench facts for a ModelRef: the zoo entry's when it is a zoo model."""
    if ref.source == "zoo" and ":" not in ref.arch:
        from ..zoo import resolve_name

        try:
            return _zoo_info(resolve_name(ref.arch, ref.dataset, ref.threat_model))
        except UserError:
            pass
    return {"name": ref.name, "architecture": _arch_label(ref.arch)}


def resolve_target(*, model: str | None = None, arch: str | None = None, arch_kwargs: dict[str, Any] | None = None,
                   run: str | None = None,
                   dataset: str | None = None, threat_model: str = "Linf", workspace: str | Path = ".",
                   device: str | torch.device = "cpu", baseline: bool = False) -> Target:
    """The model `adt-ft eval` evaluates: --model (zoo name or checkpoint file with
    --arch), else --run, else the workspace's latest run, else its current model.

    Never changes the workspace's current model or latest run.
    """
    from .. import zoo
    from ..data import dataset_info
    from ..workspace import Workspace

    ws = Workspace(workspace)
    if model is not None and run is not None:
        raise UserError("give --model or --run, not both")
    if (arch is not None or arch_kwargs) and model is None:
        raise UserError("--arch and --arch-kwargs describe a checkpoint file: use them together with --model PATH")
    if baseline and model is not None:
        raise UserError("--baseline compares a run with the model it started from: use it with --run (or with no "
                        "--model to take the latest run)")
    tm = {"linf": "Linf", "l2": "L2"}.get(threat_model.strip().lower(), threat_model)
    if tm != "Linf":
        raise UserError(f"threat model {threat_model!r}: adt-ft's attacks are L∞ attacks; only Linf is supported")
    wanted = dataset_info(dataset).name if dataset is not None else None

    if model is not None:
        path = Path(model).expanduser()
        if path.is_file() or path.suffix in (".pt", ".pth", ".ckpt"):
            if not path.is_file():
                raise UserError(f"checkpoint {path} does not exist")
            if arch is None:
                raise UserError(f"{path} is a checkpoint file: also give --arch (a zoo name such as "
                                "Zhang2019Theoretically, or package.module:Class)")
            if wanted is None and ":" in arch:
                raise UserError(f"--arch {arch} does not say which dataset the model is for: give --dataset "
                                "(a dataset name or an image folder)")
            ds = wanted or "cifar10"
            net = zoo.load_model(path, arch=arch, dataset=ds, threat_model=tm, workspace=ws.root,
                                 arch_kwargs=arch_kwargs)
            if ":" in arch:
                info = {"name": path.stem, "architecture": _arch_label(arch)}
            else:
                info = dict(_zoo_info(zoo.resolve_name(arch, ds, tm)), name=path.stem, link="", authors="",
                            venue="")
            context = {"base_model": path.stem, "model_source": f"file {path.resolve()} ({arch})"}
            return Target(path.stem, net.to(device).eval(), ds, tm, info, context, path.stem)
        if arch is not None or arch_kwargs:
            raise UserError(f"--arch goes with a checkpoint file, and {model!r} is not a file: give the file's path, "
                            "or drop --arch to use the zoo model of that name")
        entry = zoo.resolve_name(model, wanted or "cifar10", tm)
        net = zoo.load_model(entry.name, dataset=entry.dataset, threat_model=entry.threat_model, workspace=ws.root)
        context = {"base_model": entry.name, "model_source": "zoo"}
        return Target(entry.name, net.to(device).eval(), entry.dataset, entry.threat_model, _zoo_info(entry),
                      context, entry.name)

    if run is not None or ws.latest_run() is not None:
        from ..runs import load_run

        info_run = load_run(run, ws.root)
        if info_run.model is None:  # load_run refuses unfinished runs; this guards a hand-edited run.json
            raise UserError(f"run {info_run.id} has no final model: finish it with 'adt-ft train --resume'")
        ref, base_ref, meta = info_run.model, info_run.base_model, info_run.meta
        if wanted is not None and wanted != ref.dataset:
            raise UserError(f"run {info_run.id} fine-tuned a {ref.dataset} model; --dataset {dataset} is {wanted}")
        net = zoo.model_from_ref(ref, device)
        method = meta.get("method")
        base_info = _ref_info(base_ref)
        info = {k: v for k, v in base_info.items() if k in ("architecture", "additional_data",
                                                              "number_forward_passes")}
        info["name"] = (f"{str(method).upper()} fine-tune of {base_ref.name} "
                        f"(loss {meta.get('loss')}, scope {meta.get('scope')}, {meta.get('epochs')} epochs)")
        context = {"base_model": base_ref.name, "method": method, "loss": meta.get("loss"),
                   "scope": meta.get("scope"), "epochs": meta.get("epochs"), "recipe": meta.get("recipe"),
                   "run_id": info_run.id, "model_source": "run"}
        base = None
        if baseline:
            base_net = zoo.model_from_ref(base_ref, device)
            base = Target(base_ref.name, base_net, base_ref.dataset, base_ref.threat_model, base_info,
                          {"base_model": base_ref.name}, base_ref.name)
        gen_method = method if method in GENERATOR_ATTACKS and info_run.generator_path is not None else None
        return Target(f"{info_run.id}", net, ref.dataset, ref.threat_model, info, context, info_run.id,
                      generator_method=gen_method, generator_path=info_run.generator_path, base=base)

    if baseline:
        raise UserError(f"--baseline needs a run, and workspace {ws.root} has none: train one with 'adt-ft train'")
    ref = ws.current_model()
    if ref is None:
        raise UserError(f"nothing to evaluate in workspace {ws.root}: no run and no current model; pass --model "
                        "NAME|PATH or --run RUN, or run 'adt-ft pull NAME' first")
    if wanted is not None and wanted != ref.dataset:
        raise UserError(f"the current model {ref.name} is a {ref.dataset} model; --dataset {dataset} is {wanted}")
    net = zoo.model_from_ref(ref, device)
    context = {"base_model": ref.name, "model_source": ref.source}
    return Target(ref.name, net, ref.dataset, ref.threat_model, _ref_info(ref), context, ref.name)


def load_examples(model_dataset: str, dataset: str | None = None, n_examples: int | None = None, *,
                  data_dir: str | Path | None = None, workspace: str | Path = ".") -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first N test examples of the model's dataset, or of an image folder whose
    class names must be that dataset's. Default N: 1000 or the whole set if smaller."""
    from ..data import as_tensors, canonical_name, is_image_folder, load_dataset

    if dataset is not None and is_image_folder(dataset):
        source: str = str(dataset)
        full = load_dataset(dataset, "test", expect=model_dataset)
        label = f"image folder {Path(dataset).resolve()}"
    else:
        if dataset is not None and canonical_name(dataset) != model_dataset:
            raise UserError(f"the model is a {model_dataset} model; --dataset {dataset} does not match")
        source = model_dataset
        full = load_dataset(source, "test", data_dir=data_dir, workspace=workspace, augment=False)
        label = f"{model_dataset} test set"
    if n_examples is None:
        n_examples = min(DEFAULT_N_EXAMPLES, len(full))
    if n_examples <= 0:
        raise UserError(f"--n-examples must be positive, got {n_examples}")
    if n_examples > len(full):
        raise UserError(f"--n-examples {n_examples} is larger than the {label} ({len(full)} images)")
    x, y = as_tensors(full, n_examples)
    return x, y, f"first {n_examples} of the {label}"


def _resume_dir(workspace: Path, dataset: str, threat_model: str, entry: str) -> Path:
    return workspace / ".adt-ft" / "eval" / dataset / threat_model / entry


def evaluate_workspace(
    *, model: str | None = None, arch: str | None = None, arch_kwargs: dict[str, Any] | None = None,
    run: str | None = None, suite: str = "paper",
    attacks: str | None = None, n_examples: int | None = None, eps: str | float | None = None,
    mode: str = "independent", batch_size: int = 256, seed: int = 0, device: str = "auto",
    baseline: bool = False, dataset: str | None = None, data_dir: str | Path | None = None,
    budgets: str | None = None, entry: str | None = None, resume: bool = False, workspace: str | Path = ".",
    attack_settings: dict[str, dict[str, Any]] | None = None, progress: bool = True, amp: bool = False,
) -> EvalRecord:
    """`adt-ft eval` as a function: resolve the model and examples, evaluate (and
    the run's base model with `baseline`), write the leaderboard entry.

    Partial results go to `<workspace>/.adt-ft/eval/...` after every batch;
    `resume=True` continues from there, otherwise a new evaluation starts.
    """
    import shutil

    from ..data import DATASETS
    from ..leaderboard import check_entry_name, write_entry
    from ..utils import parse_eps, resolve_device
    from ..workspace import Workspace

    ws = Workspace(workspace)
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}: choose independent or cascade")
    eps_value = parse_eps(eps) if eps is not None else None
    if entry is not None:
        check_entry_name(entry)
    dev = resolve_device(device)
    target = resolve_target(model=model, arch=arch, arch_kwargs=arch_kwargs, run=run, dataset=dataset, workspace=ws.root, device=dev,
                            baseline=baseline)
    if attacks is not None:
        names, suite_label = parse_attack_list(attacks), "custom"
    else:
        names, suite_label = suite_attacks(suite, generator_method=target.generator_method), str(suite).lower()
    settings = {k: dict(v) for k, v in (attack_settings or {}).items()}
    for gen in GENERATOR_ATTACKS:
        if gen in names and "path" not in settings.get(gen, {}):
            if target.generator_path is None:
                raise UserError(f"attack {gen} needs a trained generator: evaluate an {gen} run, or give "
                                f"--set {gen}.path=RUN/generator.pt")
            settings.setdefault(gen, {})["path"] = str(target.generator_path)
    if eps_value is None:
        eps_value = DATASETS[target.dataset].eps if target.dataset in DATASETS else None
        if eps_value is None:
            raise UserError(f"no default ε for dataset {target.dataset}: give --eps")
    x, y, data_source = load_examples(target.dataset, dataset, n_examples, data_dir=data_dir, workspace=ws.root)

    entry_name = entry or _clean_name(f"{target.default_entry}_{suite_label}")
    common = dict(amp=amp, attacks=names, eps=eps_value, mode=mode, batch_size=batch_size, seed=seed, device=dev,
                  attack_settings=settings, progress=progress, budgets=budgets)
    main_dir = _resume_dir(ws.root, target.dataset, target.threat_model, entry_name)
    base_dir = _resume_dir(ws.root, target.dataset, target.threat_model, entry_name + ".baseline")
    if not resume:
        for d in (main_dir, base_dir):
            if d.exists():
                shutil.rmtree(d)
    result = evaluate(target.model, x, y, resume_dir=main_dir, **common)
    base_result = None
    if target.base is not None:
        base_result = evaluate(target.base.model, x, y, resume_dir=base_dir, **common)

    context = dict(target.context)
    context.update(suite=suite_label, data=data_source)
    json_path = write_entry(result, root=ws.leaderboard_dir, dataset=target.dataset,
                            threat_model=target.threat_model, entry=entry_name, info=dict(target.info),
                            context=context, baseline=base_result,
                            baseline_label=target.base.label if target.base is not None else None)
    for d in (main_dir, base_dir):
        if d.exists():
            shutil.rmtree(d)
    return EvalRecord(target, result, base_result, json_path, json_path.with_name(f"{entry_name}.per-example.csv"),
                      suite_label, data_source)
