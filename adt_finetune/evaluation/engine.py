"""The evaluation engine: clean accuracy once, then every attack of a suite,
with a per-example robust flag for every (example, attack) pair.

Definitions: docs/evaluation.md, "Per-example accuracy". All accuracies are percentages in [0, 100].

- Clean logits are computed once. Attacks run only on clean-correct examples:
  a clean error is non-robust under every attack (x itself lies in the ball).
  A non-finite logit is never correct, and a model with any (or with non-finite
  weights) is refused before an attack runs (see `sanity`).
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
- Attacks that learn from training images first (`uses_training_data`, e.g. a
  generator trained against the evaluated model) get them from `train_data`,
  never from the evaluated images.

Batches never mix chunks of the evaluated set and their randomness is keyed to
the chunk, so that a sharded evaluation (`evaluate_shard`, see `shards`) gives the
same flags as one process. The per-example file is described in `result`.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from ..attacks import make_attack, verdict
from ..attacks.base import keyed_batch
from ..perturb.distributional import parse_budgets
from ..perturb.linf import predicted_class
from ..errors import UserError
from ..nets import eval_mode
from ..precision import amp_dtype_name
from ..progress import Reporter, as_reporter
from .result import EvalResult, jsonable
from .resume import _ResumeState, fingerprint
from .sanity import check_finite_logits, check_finite_weights
from .eval_request import EvalSettings
from .shards import CHUNK_SIZE, Batch, ShardPart, chunk_batches, combine, parse_shard, shard_rows
from .suites import PSEUDO
from .wasserstein_suite import wasserstein_suite


@dataclass
class _Plan:
    """A validated evaluation: examples on the CPU, attacks built, nothing run yet."""

    names: list[str]                 # as given, pseudo-attacks included
    attacks: dict[str, Any]          # registry attacks by name, in suite order
    settings: dict[str, Any]         # each attack's settings as recorded in the result
    excluded: list[str]              # columns outside A_rob
    x: torch.Tensor
    y: torch.Tensor
    indices: np.ndarray
    budgets: list[float] | None
    device: torch.device
    train_data: tuple[torch.Tensor, torch.Tensor] | None
    train_sha: str | None
    eps: float
    mode: str
    batch_size: int
    seed: int
    amp: bool
    threat_model: str = "Linf"


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
    reporter: Reporter | None = None,
    resume_dir: str | Path | None = None,
    indices: Sequence[int] | None = None,
    budgets: Sequence[float] | str | None = None,
    amp: bool = False,
    train_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int = CHUNK_SIZE,
    threat_model: str = "Linf",
) -> EvalResult:
    """Evaluate `model` on (x, y) under `attacks` (registry names, plus "clean"
    and "wasserstein"); see the module docstring for the definitions. `x` is float images
    in [0, 1], or uint8 ones (k for k/255: `data.as_tensors(compact=True)`, ImageNet's storage).

    `attack_settings[name]` overrides an attack's settings. With `resume_dir`,
    flags are saved there after every batch and a later call with the same
    model, examples and settings skips the finished work (a different model,
    example set or setting is refused). `budgets` are the W-PGD budgets of the
    "wasserstein" pseudo-attack (None: its defaults around ε). `indices` label
    the rows of the per-example file (default 0..N-1). `train_data` are training
    images for the attacks that learn before they attack. `chunk_size` fixes the
    chunks that batches stay inside and that batch-level randomness is keyed to
    (`shards`). `reporter` receives progress (None: silent). `threat_model` "L2" makes ε an L2 radius:
    the attacks run their L2 versions (the L∞-only ones refuse) and distances are L2 norms.
    """
    settings = EvalSettings(attacks=attacks, eps=eps, mode=mode, batch_size=batch_size, seed=seed, device=device,
                            attack_settings=attack_settings, indices=indices, budgets=budgets, amp=amp,
                            train_data=train_data, chunk_size=chunk_size, threat_model=threat_model)
    return combine([evaluate_with(model, x, y, settings, resume_dir=resume_dir, reporter=reporter)])


def evaluate_shard(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, shard: str | tuple[int, int] = (0, 1),
                   attacks: Sequence[str], eps: float, mode: str = "independent", batch_size: int = 256,
                   seed: int = 0, device: str | torch.device = "cpu",
                   attack_settings: dict[str, dict[str, Any]] | None = None, reporter: Reporter | None = None,
                   resume_dir: str | Path | None = None, indices: Sequence[int] | None = None,
                   budgets: Sequence[float] | str | None = None, amp: bool = False,
                   train_data: tuple[torch.Tensor, torch.Tensor] | None = None,
                   chunk_size: int = CHUNK_SIZE, threat_model: str = "Linf") -> ShardPart:
    """Shard k of n of `evaluate`: the same arguments, but only the examples of the chunks
    c with c mod n = k are evaluated (every attack still prepares on the whole set). The
    parts of all n shards combine (`shards.combine`) into what `evaluate` returns.
    `resume_dir` belongs to this shard alone."""
    settings = EvalSettings(attacks=attacks, eps=eps, mode=mode, batch_size=batch_size, seed=seed, device=device,
                            attack_settings=attack_settings, indices=indices, budgets=budgets, amp=amp,
                            train_data=train_data, chunk_size=chunk_size, threat_model=threat_model)
    return evaluate_with(model, x, y, settings, shard=shard, resume_dir=resume_dir, reporter=reporter)


def evaluate_with(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: EvalSettings, *,
                  shard: str | tuple[int, int] = (0, 1), resume_dir: str | Path | None = None,
                  reporter: Reporter | None = None) -> ShardPart:
    """`evaluate_shard` with its settings as one value (what `evaluate_workspace` passes through)."""
    k, n_shards = parse_shard(shard)
    chunk_size = settings.chunk_size
    plan = _plan(x, y, settings)
    if n_shards > 1:
        _check_shardable(plan)
    model = model.to(plan.device)
    check_finite_weights(model)
    extra = {"train_data": plan.train_sha} if plan.train_sha else {}
    if plan.threat_model != "Linf":
        extra["threat_model"] = plan.threat_model
    fp = fingerprint(model, plan.x, plan.y, attacks=plan.names, eps=plan.eps, mode=plan.mode, seed=plan.seed,
                     batch_size=plan.batch_size, settings=plan.settings, budgets=plan.budgets, amp=plan.amp,
                     chunk_size=chunk_size, **extra)
    # A shard's partial flags are its own: the state names the shard as well as the evaluation.
    state_fp = fp if n_shards == 1 else hashlib.sha256(f"{fp}:shard {k}/{n_shards}".encode()).hexdigest()
    state = _ResumeState(Path(resume_dir) / "state.json" if resume_dir is not None else None, state_fp)
    rep = as_reporter(reporter)
    rows = shard_rows(len(plan.x), chunk_size, (k, n_shards))
    run = _Run(model, plan, rows, state, rep, chunk_size=chunk_size,
               resume_dir=Path(resume_dir) if resume_dir is not None else None)
    with eval_mode(model), rep:
        clean_run = clean_pass(model, run.x, run.y, plan.batch_size, plan.device, positions=rows,
                               chunk_size=chunk_size)
        clean, n_bad = clean_run.correct, clean_run.n_bad
        check_finite_logits(n_bad, len(rows))
        columns, flags = run.attack_columns(clean)
        if "wasserstein" in plan.names:
            w_cols, w_flags = run.wasserstein(clean)
            columns += w_cols
            plan.excluded += w_cols
            flags = np.concatenate([flags, w_flags], axis=1)

    amp = plan.amp
    result = EvalResult(
        attacks=columns, indices=plan.indices[rows], labels=run.y.numpy().astype(np.int64), clean=clean, flags=flags,
        eps=float(plan.eps), mode=plan.mode, seed=plan.seed, batch_size=plan.batch_size, device=str(plan.device),
        timings_s=run.timings, amp=amp, amp_attacks=[a for a, ob in plan.attacks.items() if amp and ob.amp_search],
        max_linf=run.max_linf, attack_settings=plan.settings, wasserstein=run.wasserstein_json,
        threat_model=plan.threat_model,
        excluded_from_a_rob=plan.excluded, chunk_size=chunk_size)
    return ShardPart(result, rows, len(plan.x), (k, n_shards), chunk_size, fp, dict(run.ranges),
                     [a for a, ob in plan.attacks.items() if ob.black_box], n_bad, clean_run.predicted,
                     clean_run.n_classes)


def _check_shardable(plan: "_Plan") -> None:
    shared = [a for a in plan.names if a == "wasserstein" or (a in plan.attacks and plan.attacks[a].dataset_level)]
    if shared:
        raise UserError(f"attack {shared[0]!r} shares its budget across the whole evaluated set, so its work cannot "
                        "be split into shards: evaluate it in one process (no `shard`, no torchrun)")


def _plan(x, y, s: EvalSettings) -> _Plan:
    """Check every input and build every attack, so that a bad setting fails before any compute."""
    attacks, eps, budgets, amp, seed, indices = s.attacks, s.eps, s.budgets, s.amp, s.seed, s.indices
    if len(x) != len(y) or len(x) == 0:
        raise UserError(f"need a non-empty set of examples with one label each (got {len(x)} images, {len(y)} labels)")
    names = list(attacks)  # checked by EvalSettings
    attack_names = [a for a in names if a not in PSEUDO]
    settings = {k: dict(v) for k, v in (s.attack_settings or {}).items()}
    unknown = sorted(set(settings) - set(attack_names))
    if unknown:
        raise UserError(f"settings given for {unknown[0]!r}, which is not in the attack list")
    budget_list = None
    if "wasserstein" in names and budgets is not None:
        budget_list = parse_budgets(budgets)
    device = torch.device(s.device)
    if amp and amp_dtype_name(device, True) != "bf16":
        # fp16 without loss scaling underflows the input gradients of confident examples
        # (sign(0) = 0 stalls the attack): a weaker attack would report too high a number.
        raise UserError(f"`amp`: evaluation searches in bf16, which device {device} does not support; drop `amp`")
    x, y = x.detach().cpu(), y.detach().long().cpu()
    x = x if x.dtype == torch.uint8 else x.float()  # uint8: 8-bit images kept small (data.as_tensors `compact`)
    n = len(x)
    idx = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    if idx.shape != (n,):
        raise ValueError(f"indices must have one entry per example ({n}), got shape {idx.shape}")
    for a in attack_names:
        # One ε and one seed for every attack of an evaluation: per-attack ones would make columns incomparable.
        for key in ("eps", "seed", "threat_model"):
            if key in settings.get(a, {}):
                raise UserError(f"attack setting {a}.{key}: {key} is the evaluation's, the same for every attack; "
                                f"set the evaluation's {key} instead")
    objs = {a: make_attack(a, eps, seed=seed, threat_model=s.threat_model, **settings.get(a, {}))
            for a in attack_names}
    learners = [a for a, o in objs.items() if o.uses_training_data]
    required = [a for a in learners if not objs[a].training_data_optional]
    if required and s.train_data is None:
        raise UserError(f"attack {required[0]!r} learns from training images first: pass "
                        "train_data=(x_train, y_train), images other than the evaluated ones")
    train, train_sha = None, None
    if learners and s.train_data is not None:
        train = (s.train_data[0].detach().float().cpu(), s.train_data[1].detach().long().cpu())
        train_sha = _tensor_sha(*train)
    return _Plan(names=names, attacks=objs, settings={a: jsonable(o.settings()) for a, o in objs.items()},
                 excluded=[a for a, o in objs.items() if not o.linf_bounded], x=x, y=y, indices=idx,
                 budgets=budget_list, device=device, train_data=train, train_sha=train_sha, eps=float(eps), mode=s.mode,
                 batch_size=int(s.batch_size), seed=int(seed), amp=bool(amp), threat_model=s.threat_model)


class CleanPass(NamedTuple):
    correct: np.ndarray    # (N,) bool: `verdict` on the clean images
    n_bad: int             # images with a non-finite logit (never correct)
    predicted: np.ndarray  # (N,) int64: the strict top class, −1 where there is none (a tie, a NaN)
    n_classes: int         # logits per image


def clean_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device, *,
               positions: np.ndarray | None = None, chunk_size: int | None = None) -> CleanPass:
    """Clean-correct flags, the number of images with a non-finite logit, which never count as
    correct (the argmax of NaNs is an arbitrary class), and the predicted classes (for the
    degenerate-model checks). With `positions` (each row's place in the evaluated set) and
    `chunk_size`, batches stay inside chunks, as the attacks' do: every shard then sees the
    same batches."""
    if positions is None or chunk_size is None:
        positions, chunk_size = np.arange(len(x)), max(1, len(x))
    out, predicted, bad, n_classes = [np.zeros(0, dtype=bool)], [np.zeros(0, dtype=np.int64)], 0, 0
    with torch.no_grad():
        for b in chunk_batches(positions, chunk_size, batch_size):
            logits = model(images_on(x[b.start:b.stop], device))
            n_classes = int(logits.shape[1])
            bad += int((~torch.isfinite(logits).all(1)).sum())
            out.append(verdict(logits, y[b.start:b.stop].to(device)).cpu().numpy())
            predicted.append(predicted_class(logits).cpu().numpy().astype(np.int64))
    return CleanPass(np.concatenate(out).astype(bool), bad, np.concatenate(predicted), n_classes)


def images_on(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Images as the model takes them: float in [0, 1] on `device` (uint8 ones k become k/255, exactly
    what ToTensor makes of them, converted one batch at a time)."""
    x = x.to(device)
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def _tensor_sha(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _Run:
    """Runs a plan's attacks column by column on one shard's rows (every row when unsharded),
    saving flags to the resume state after every batch."""

    def __init__(self, model, plan: _Plan, rows: np.ndarray, state: _ResumeState, reporter: Reporter, *,
                 chunk_size: int, resume_dir: Path | None):
        self.model, self.plan, self.state, self.reporter = model, plan, state, reporter
        self.rows, self.chunk_size, self.resume_dir = rows, chunk_size, resume_dir
        whole = len(rows) == len(plan.x)
        self.x = plan.x if whole else plan.x[torch.from_numpy(rows)]
        self.y = plan.y if whole else plan.y[torch.from_numpy(rows)]
        self.timings: dict[str, float] = {}
        self.max_linf: dict[str, float] = {}
        self.ranges: dict[str, tuple[float, float]] = {}
        self.wasserstein_json: dict[str, Any] | None = None
        self._dev: tuple[torch.Tensor, torch.Tensor] | None = None

    def _pool(self, k: int, name: str, clean: np.ndarray, flags: np.ndarray, columns: list[str]) -> np.ndarray:
        attack, excluded = self.plan.attacks[name], self.plan.excluded
        if attack.dataset_level:
            # The budget is shared by the whole set, so it must see the whole set.
            return np.arange(len(clean))
        if self.plan.mode == "independent" or name in excluded:
            return np.flatnonzero(clean)
        earlier = [j for j in range(k) if columns[j] not in excluded]
        return np.flatnonzero(clean & (flags[:, earlier] == 1).all(axis=1))

    def attack_columns(self, clean: np.ndarray) -> tuple[list[str], np.ndarray]:
        columns = list(self.plan.attacks)
        flags = np.full((len(clean), len(columns)), -1, dtype=np.int8)
        flags[~clean, :] = 0
        for k, name in enumerate(columns):
            attack = self.plan.attacks[name]
            pool = self._pool(k, name, clean, flags, columns)
            st = self.state.attack(name)
            if not st["done"]:
                self._run_attack(attack, pool, st)
            elif "settings" in st:  # finished before an interruption: what its `prepare` resolved then
                self.plan.settings[name] = st["settings"]
            if len(st["robust"]) != len(pool):
                self._mismatch()
            flags[pool, k] = np.asarray(st["robust"], dtype=np.int8)
            flags[~clean, k] = 0  # a clean error stays an error, whatever a dataset-level attack reports
            self.timings[name] = float(st["time_s"])
            if attack.linf_bounded:
                self.max_linf[name] = float(st["max_linf"])
            self.ranges[name] = (float(st["min"]), float(st["max"]))
        return columns, flags

    def _mismatch(self):
        raise UserError(f"the partial evaluation state in {self.resume_dir} does not match this evaluation "
                        "(attack order or examples): rerun without `resume`")

    def _prepare(self, attack) -> None:
        """Hand the attack what it may use, then let it prepare on the whole evaluation set
        (every shard prepares alike: e.g. the feature attack's target pool is the same)."""
        if self._dev is None:
            self._dev = images_on(self.plan.x, self.plan.device), self.plan.y.to(self.plan.device)
        if attack.uses_training_data and self.plan.train_data is not None:
            attack.set_training_data(*self.plan.train_data)
        # What `prepare` builds (a retrained generator) is kept beside the partial flags, for --resume.
        cache = self.resume_dir / "attacks" / attack.name if self.resume_dir is not None else None
        attack.bind(reporter=self.reporter, cache_dir=cache)
        attack.prepare(self.model, *self._dev)
        # Settings an attack resolves in `prepare` (the feature attack's tap and target pool) join the record.
        self.plan.settings[attack.name] = jsonable(attack.settings())

    def _batches(self, attack, pool: np.ndarray):
        if attack.dataset_level:  # never sharded (see _check_shardable): one call with every example
            return [Batch(0, len(pool), "all")]
        return chunk_batches(self.rows[pool], self.chunk_size, self.plan.batch_size)

    def _run_attack(self, attack, pool: np.ndarray, st: dict) -> None:
        name, n_total, device = attack.name, len(self.x), self.plan.device
        done = len(st["robust"])
        batches = [b for b in self._batches(attack, pool) if b.start >= done]
        if done < len(pool) and (not batches or batches[0].start != done):
            self._mismatch()  # saved flags end inside a batch: not this evaluation's batches
        robust_so_far = int(sum(st["robust"]))
        self.reporter.start(name, name, total=len(pool), completed=done,
                            status=_running_acc(robust_so_far, done, len(pool), n_total))
        if batches:
            t0 = time.perf_counter()
            self._prepare(attack)
            st["time_s"] += time.perf_counter() - t0  # e.g. training a generator: part of the attack's cost
            st["settings"] = self.plan.settings[name]
        for b in batches:
            ids = torch.from_numpy(pool[b.start:b.stop])
            xb, yb = images_on(self.x[ids], device), self.y[ids].to(device)
            attack.follow(_within_batch(self.reporter, name, len(st["robust"]), len(ids)))
            try:
                robust = self._attack_batch(attack, xb, yb, b.key, st)
            finally:
                attack.follow(None)
            robust_so_far += int(robust.sum())
            if len(st["robust"]) == len(pool):
                st["done"] = True
            self.state.save()
            self.reporter.advance(name, len(ids), _running_acc(robust_so_far, len(st["robust"]), len(pool), n_total))
        st["done"] = True
        self.state.save()
        self.reporter.finish(name)

    def _attack_batch(self, attack, xb: torch.Tensor, yb: torch.Tensor, key: str, st: dict) -> torch.Tensor:
        device = self.plan.device
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=_rng_devices(device)), keyed_batch(key):
            torch.manual_seed(_batch_seed(self.plan.seed, attack.name, key))
            # The attack searches in bf16 only if it may (`amp_search`); its verdict is fp32's.
            res = attack(self.model, xb, yb, precision=amp_dtype_name(device, self.plan.amp))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        robust = res.robust.detach().reshape(-1).bool().cpu()
        if robust.shape[0] != len(xb) or res.x_adv.shape != xb.shape:
            raise RuntimeError(f"attack {attack.name!r} returned shapes {tuple(res.x_adv.shape)}/"
                               f"{tuple(robust.shape)} for a batch of {tuple(xb.shape)}")
        with torch.no_grad():
            x_adv = res.x_adv.detach()
            delta = (x_adv.float() - xb).flatten(1)
            # Recorded as `max_linf` for either norm: the result's threat model says which norm it is.
            dist = (delta.norm(p=2, dim=1) if self.plan.threat_model == "L2" else delta.abs().amax(1)).max().item()
            lo, hi = x_adv.min().item(), x_adv.max().item()
        st["robust"].extend(int(v) for v in robust.tolist())
        st["time_s"] += elapsed
        st["max_linf"] = max(st["max_linf"], dist)
        st["min"], st["max"] = min(st["min"], lo), max(st["max"], hi)
        return robust

    def wasserstein(self, clean: np.ndarray) -> tuple[list[str], np.ndarray]:
        """The W-PGD budget grid (the `wasserstein` pseudo-attack): its columns and flags."""
        st = self.state.attack("wasserstein")
        if not st["done"]:
            t0 = time.perf_counter()
            plan = self.plan
            report = wasserstein_suite(self.model, images_on(plan.x, "cpu"), plan.y, eps=plan.eps, budgets=plan.budgets,
                                       batch_size=plan.batch_size, device=plan.device, seed=plan.seed,
                                       reporter=self.reporter)
            st["time_s"] += time.perf_counter() - t0
            st["columns"] = {str(c): [int(v) for v in torch.as_tensor(f).bool().cpu().tolist()]
                             for c, f in report.flags.items()}
            st["report"] = jsonable(report.to_json())
            st["done"] = True
            self.state.save()
        cols = list(st["columns"])
        w_flags = np.zeros((len(clean), len(cols)), dtype=np.int8)
        for j, c in enumerate(cols):
            # A clean error stays an error: its flag is 0 whatever W-PGD's own bookkeeping says.
            w_flags[:, j] = np.asarray(st["columns"][c], dtype=bool) & clean
        self.timings["wasserstein"] = float(st["time_s"])
        self.wasserstein_json = st["report"]
        return cols, w_flags


def _batch_seed(seed: int, name: str, key: str) -> int:
    # Reseeding per batch, keyed to the batch's chunk (`shards`), makes a resumed or
    # sharded run draw the same random starts as one uninterrupted process for
    # attacks that use the global RNG.
    digest = hashlib.sha256(f"{seed}:{name}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _running_acc(robust: int, done: int, pool: int, n_total: int) -> str:
    # The rate among attacked examples scaled to the whole set: it ends at the
    # column's accuracy (independent) or the cumulative one (cascade).
    if done == 0:
        return "acc   —  "
    return f"acc {100.0 * robust / done * pool / n_total:6.2f}%"


#: the clock progress inside a batch is throttled by (tests put a fake one here)
progress_clock = time.monotonic
#: at most this many progress updates per second from inside a batch
PROGRESS_UPDATES_PER_S = 4.0


def _within_batch(reporter: Reporter, key: str, done: int, size: int):
    """The callback an attack reports its progress inside a batch to: `done` examples finished before
    this batch of `size`; updates at most PROGRESS_UPDATES_PER_S times a second (the first always)."""
    last = [-math.inf]

    def update(fraction: float, status: str) -> None:
        now = progress_clock()
        if now - last[0] >= 1.0 / PROGRESS_UPDATES_PER_S:
            last[0] = now
            reporter.update(key, done + fraction * size, status or None)

    return update


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []
