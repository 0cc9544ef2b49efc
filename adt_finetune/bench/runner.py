"""Throughput benchmark: every training method and attack measured side by side.

`run_benchmark(arch, ...)` builds the architecture with random weights (no
download) and random inputs of the dataset's shape, then for each training
method × loss and each attack measures, after warm-up: time per step (median),
images per second, the classifier's forward and backward passes per step,
peak memory, and the ratio of its step time to the baseline's (`pgd-at` for
methods, `pgd20` for attacks) measured in the same run. Beside the measured
ratio it prints the ratio a FLOP cost model predicts, and the achieved TFLOP/s.

What a "step" is
    method: the trainer's full update on one batch: `method.zero_grad();
    opt.zero_grad(); out = method.step(model, x, y); out.loss.backward();
    opt.step(); method.after_backward()` (SGD with momentum for the classifier,
    the method's own optimisers for its generators).
    attack: one call `attack(model, x, y)` on one batch (after `attack.prepare`
    once on a pool of random images, timed separately as `prepare_s`). The
    labels are the random model's own clean predictions, so every example starts
    correctly classified and the attack does its full work; attacks that stop
    early once an example is broken (feature, spsa, exp, autoattack's later
    stages) are still cheaper on a random-weight model than on a robust one.

Timing: each item is set up and warmed up on its own (its peak memory is
measured then), then all items of a group are timed round-robin, one step each
per round, `steps` rounds: background load and clock drift hit every item alike,
so ratios stay fair on a shared machine.

Cost model (`predicted_ratio`)
    Every call of the classifier and of each generator module (the method's
    `modules()`) is logged with its input shapes and which backward it received:
    none (forward only), an *input-only* backward (during `method.step` or an
    attack: gradients w.r.t. the input, as attack steps take them; no weight
    gradients), or a *full* backward (in the trainer's `loss.backward()`:
    weight gradients plus input gradients where the input requires them).
    Each distinct (module, shapes, backward kind) is replayed once under
    `torch.utils.flop_counter.FlopCounterMode`; the predicted cost of a step is
    the sum over its logged passes, and `predicted_ratio` = cost / baseline cost
    (exactly 1.0 for the baseline itself). `counted_flops` is the whole step
    counted directly under FlopCounterMode (one untimed step), a check on the
    pass model; `tflops` = counted_flops / step_time_s / 1e12. FLOPs are
    FlopCounterMode's: matmuls and convolutions only (2 per multiply-add), so
    elementwise work (BatchNorm, activations, the attack's own arithmetic) is
    free in the model and is why measured ratios drift from predicted ones on
    small models.

JSON (`BenchResult.to_dict()`, written atomically by `save_json`)
    schema "adt-ft-bench/1"; device {type, name, threads}; torch; versions;
    arch, dataset, input_shape [C, H, W], num_classes, classifier_params;
    dtype (fp32|bf16|fp16), batch_size, channels_last, compile, steps, warmup,
    seed, config_overrides; classifier_gflop_per_image {forward,
    forward_input_backward, forward_full_backward}; peak_mem_meaning; created
    (ISO time); rows: a list of
      kind             "method" | "attack"
      name             method or attack name
      loss             "ce" | "trades" for methods, null for attacks
      status           "ok" | "skipped" | "error"; note says why
      images_per_s     batch_size / step_time_s
      step_time_s      median wall time over the timed steps
      step_times_s     every timed step
      step_cpu_s       CPU devices: median process CPU time per step (all threads); unlike
                       wall time it does not grow when other processes share the cores
      forward_passes   classifier forward passes per step (nets.PassCounter)
      backward_passes  classifier backward passes per step (gradient reaching its output)
      forward_images   images through the classifier per step (ADT-EXP runs k·B at once)
      module_passes    {module: {forward, backward}} for the method's own modules
      peak_mem_mb      see peak_mem_meaning
      baseline         "pgd-at" (methods) or "pgd20" (attacks)
      ratio_to_pgd_at  step time / pgd-at's (methods; null for attacks)
      ratio_to_pgd20   time per batch / pgd20's (attacks; null for methods)
      ratio            whichever of the two applies
      cpu_ratio        CPU devices: the same ratio from step_cpu_s
      predicted_ratio  the cost model's ratio to the same baseline
      predicted_flops  the cost model's FLOPs per step; predicted_flops_by_module splits it
      counted_flops    FLOPs of one whole step counted directly
      tflops           achieved TFLOP/s (counted_flops / step_time_s)
      prepare_s        attacks: time of attack.prepare (not in the step time)
      note             skip reason, error text, or remarks

Generator width: on CPU the methods run with `gen_width=32` unless
`config_overrides` says otherwise (`CPU_DEFAULT_OVERRIDES`): the paper's width-256
generator costs 16–21 GFLOP per image forward, which swamps a small classifier
and takes minutes per CPU step. The JSON's config_overrides records what ran.

Default attack list: on GPU the paper suite's attacks (fgsm, pgd20, pgd100, mim,
cw, feature, autoattack); on CPU the cheap ones only (fgsm, pgd20, pgd100, mim,
cw), because feature (200 targets × 50 steps), autoattack and spsa take minutes
per batch there; name them in `attacks` to include them. Attacks always run with
their real default settings; `steps` bounds only how many batches are timed.
"""
from __future__ import annotations

import copy
import datetime as _dt
import importlib
import inspect
import os
import platform
import resource
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..data import DatasetInfo, dataset_info
from ..errors import UserError
from ..nets import PassCounter, eval_mode, find_last_linear, num_params
from ..precision import autocast_context, check_dtype, make_grad_scaler, maybe_compile, to_channels_last, torch_dtype
from ..utils import atomic_write_json, set_seed

SCHEMA = "adt-ft-bench/1"
KNOWN_METHODS = ("pgd-at", "trades", "exp", "exp-am", "imp-am", "wdat")
# exp-am / imp-am as attacks need a trained generator (an ADT run's), so they are not benchmarked here.
KNOWN_ATTACKS = ("fgsm", "pgd20", "pgd100", "mim", "cw", "feature", "autoattack", "spsa", "exp", "wpgd")
PAPER_ATTACKS = ("fgsm", "pgd20", "pgd100", "mim", "cw", "feature", "autoattack")
CPU_DEFAULT_ATTACKS = ("fgsm", "pgd20", "pgd100", "mim", "cw")
LOSSES = ("ce", "trades")
# The paper's generator (width 256, residual blocks of 512) costs ~16–21 GFLOP per
# image forward, far more than a small classifier: at full width the amortised
# methods alone take minutes per CPU step. The CPU default narrows it (shown in the
# table's caption and the JSON); `--set gen_width=256` restores the paper's width.
CPU_DEFAULT_OVERRIDES = {"gen_width": 32}
METHOD_BASELINE = "pgd-at"
ATTACK_BASELINE = "pgd20"
DEFAULT_ARCH = "adt_finetune.models.small:SmallCNN"
# Enough images of every class for attacks that draw targets from the pool (feature: 200 per image).
PREPARE_POOL = 512

PEAK_MEM_MEANING = {
    "cuda": "torch.cuda.max_memory_allocated over the item's set-up and warm-up steps (absolute, includes the "
            "classifier's weights)",
    "cpu": "increase of the process's resident set size over the item's set-up and warm-up steps, sampled every "
           "2 ms from /proc/self/statm (memory the item needed beyond what was already resident; allocator caching "
           "can make it an underestimate)",
}


@dataclass
class BenchRow:
    kind: str
    name: str
    loss: str | None
    status: str = "ok"
    images_per_s: float | None = None
    step_time_s: float | None = None
    step_times_s: list[float] = field(default_factory=list)
    step_cpu_s: float | None = None
    forward_passes: int | None = None
    backward_passes: int | None = None
    forward_images: int | None = None
    module_passes: dict[str, dict[str, int]] = field(default_factory=dict)
    peak_mem_mb: float | None = None
    baseline: str | None = None
    ratio_to_pgd_at: float | None = None
    ratio_to_pgd20: float | None = None
    ratio: float | None = None
    cpu_ratio: float | None = None
    predicted_ratio: float | None = None
    predicted_flops: float | None = None
    predicted_flops_by_module: dict[str, float] = field(default_factory=dict)
    counted_flops: float | None = None
    tflops: float | None = None
    prepare_s: float | None = None
    note: str = ""


@dataclass
class BenchResult:
    meta: dict[str, Any]
    rows: list[BenchRow]

    def to_dict(self) -> dict[str, Any]:
        return {**self.meta, "rows": [asdict(r) for r in self.rows]}

    def save_json(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    def row(self, kind: str, name: str, loss: str | None = None) -> BenchRow:
        for r in self.rows:
            if r.kind == kind and r.name == name and (loss is None or r.loss == loss):
                return r
        raise KeyError((kind, name, loss))

    def table(self):
        """A rich Table of the rows (what `adt-ft bench` prints)."""
        from rich import box
        from rich.table import Table
        from rich.text import Text  # names and error notes are data, not markup

        m = self.meta
        title = (f"{m['arch']} on {m['dataset']} shapes {tuple(m['input_shape'])}, batch {m['batch_size']}, "
                 f"{m['dtype']}{', channels-last' if m['channels_last'] else ''}"
                 f"{', compiled' if m['compile'] else ''} — {m['device']['name']}")
        t = Table(title=Text(title), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
        notes = any(r.note for r in self.rows)
        t.add_column("item", no_wrap=True)
        t.add_column("loss", no_wrap=True)
        cpu = m["device"]["type"] == "cpu"
        for col in ("img/s", "ms/step", "f/b", "MB", "ratio", *(["cpu×"] if cpu else []), "pred.", "TFLOP/s"):
            t.add_column(col, justify="right", no_wrap=True)
        if notes:
            t.add_column("note", overflow="fold")

        def f(v, fmt):
            return "—" if v is None else format(v, fmt)

        kind = None
        for r in self.rows:
            if kind is not None and r.kind != kind:
                t.add_section()
            kind = r.kind
            cells = [Text(r.name), r.loss or "", f(r.images_per_s, ",.1f"),
                     f(None if r.step_time_s is None else 1e3 * r.step_time_s, ",.1f"),
                     "—" if r.forward_passes is None else f"{r.forward_passes}/{r.backward_passes}",
                     f(r.peak_mem_mb, ",.0f"), f(r.ratio, ".2f"), *([f(r.cpu_ratio, ".2f")] if cpu else []),
                     f(r.predicted_ratio, ".2f"), f(r.tflops, ".2g")]
            t.add_row(*cells, *([Text(r.note)] if notes else []))
        caption = [f"ratio: wall time ÷ {METHOD_BASELINE}'s (methods), ÷ {ATTACK_BASELINE}'s (attacks)"
                   + ("; cpu×: the same with process CPU time" if cpu else "")
                   + "; pred.: FLOP cost model; f/b: classifier forward/backward passes per step; MB: peak memory",
                   f"torch {m['torch']}, {m['device']['threads']} threads",
                   f"{m['steps']} timed steps after {m['warmup']} warm-up (median, items interleaved)",
                   f"classifier {m['classifier_gflop_per_image']['forward']:.3g} GFLOP/image forward"]
        if m["config_overrides"]:
            caption.append("settings " + ", ".join(f"{k}={v}" for k, v in m["config_overrides"].items()))
        t.caption = Text("; ".join(caption))
        return t


# ---------------------------------------------------------------- pass log and FLOP replay

@dataclass
class _Pass:
    module: str
    images: int
    sig: tuple
    grad_phases: set = field(default_factory=set)


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


# True while a pass is replayed under the FLOP counter: those calls are not the step's.
_replaying = [False]


class _PassLog:
    """Logs every call of one module: images, input shapes, and in which phase
    ("step" = inside method.step or an attack, "backward" = the trainer's
    loss.backward()) a gradient reached its output. Keeps one copy of the inputs
    per distinct signature so the pass can be replayed under the FLOP counter."""

    def __init__(self, name: str, module: nn.Module, phase: list[str]):
        self.name = name
        self.module = module
        self.passes: list[_Pass] = []
        self.samples: dict[tuple, tuple[tuple, dict]] = {}
        self._phase = phase  # shared, mutable: the bench flips it around loss.backward()
        self._handle = module.register_forward_hook(self._on_forward, with_kwargs=True)

    def _on_forward(self, module, args, kwargs, output):
        if _replaying[0]:
            return
        ins = _tensors((args, kwargs))
        sig = tuple((tuple(t.shape), t.requires_grad, t.is_floating_point()) for t in ins)
        rec = _Pass(self.name, int(ins[0].shape[0]) if ins and ins[0].dim() else 0, sig)
        self.passes.append(rec)
        if sig not in self.samples:
            self.samples[sig] = _map_tensors((args, kwargs), lambda t: t.detach().clone())
        for out in _tensors(output):
            if out.requires_grad:
                out.register_hook(lambda grad, rec=rec: self._on_grad(rec, grad))

    def _on_grad(self, rec: _Pass, grad):
        rec.grad_phases.add(self._phase[0])
        return grad

    def reset(self) -> None:
        self.passes.clear()

    def remove(self) -> None:
        self._handle.remove()


class _NoModuleTracker:
    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class GlobalFlopCounter(FlopCounterMode):
    """FlopCounterMode counting totals only.

    Its per-module attribution installs multi-grad hooks that make
    `torch.autograd.grad` with a leaf input fail ("A leaf node was passed to
    _will_engine_execute_node ..."), and every attack step is exactly such a
    call; without the tracker every FLOP lands under "Global".
    """

    def __init__(self):
        super().__init__(display=False)
        self.mod_tracker = _NoModuleTracker()


def _backward_kind(p: _Pass) -> str | None:
    if not p.grad_phases:
        return None
    return "full" if "backward" in p.grad_phases else "input"


def _replay_flops(module: nn.Module, sample: tuple[tuple, dict], sig: tuple, kind: str | None) -> int:
    """FLOPs of one call of `module` on `sample`'s shapes, with the given backward kind."""
    rg_flags = iter([rg for _, rg, _ in sig])

    def prep(t: torch.Tensor) -> torch.Tensor:
        rg = next(rg_flags)
        t = t.detach().clone()
        return t.requires_grad_(rg and kind is not None and t.is_floating_point())

    args, kwargs = _map_tensors(sample, prep)
    inputs = [t for t in _tensors((args, kwargs)) if t.requires_grad]
    params = [p for p in module.parameters() if p.requires_grad]
    if kind == "input" and not inputs:
        kind = "full"  # a gradient reached the output without an input to flow to: it went to the weights
    targets = inputs + (params if kind == "full" else [])
    # Eval mode: the FLOPs are the same, and BatchNorm's running statistics stay untouched.
    _replaying[0] = True
    try:
        with eval_mode(module), GlobalFlopCounter() as counter:
            _call_for_flops(module, args, kwargs, kind, targets)
    finally:
        _replaying[0] = False
    return int(counter.get_total_flops())


def _call_for_flops(module, args, kwargs, kind, targets) -> None:
    if kind is None or not targets:
        with torch.no_grad():
            module(*args, **kwargs)
        return
    out = module(*args, **kwargs)
    outs = [o for o in _tensors(out) if o.requires_grad]
    if outs:
        torch.autograd.grad(sum(o.float().sum() for o in outs), targets, allow_unused=True)


class _CostModel:
    """Caches replayed FLOPs per (module, signature, backward kind)."""

    def __init__(self):
        self._cache: dict[tuple, int] = {}

    def pass_flops(self, log: _PassLog, p: _Pass) -> int:
        kind = _backward_kind(p)
        key = (id(log.module), p.sig, kind)
        if key not in self._cache:
            self._cache[key] = _replay_flops(log.module, log.samples[p.sig], p.sig, kind)
        return self._cache[key]

    def step_flops(self, logged: Sequence[tuple[_PassLog, list[_Pass]]]) -> dict[str, float]:
        return {log.name: float(sum(self.pass_flops(log, p) for p in passes)) for log, passes in logged}


# ---------------------------------------------------------------- memory and timing

class _PeakMemory:
    """Peak memory of one item; see PEAK_MEM_MEANING."""

    def __init__(self, device: torch.device):
        self.device = device
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = 0
        self._start = 0

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            # No /proc (macOS): the lifetime high-water mark is the best we have.
            scale = 1 if platform.system() == "Darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self._rss())

    def __enter__(self) -> "_PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._start = self._peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._rss())

    @property
    def mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return max(0, self._peak - self._start) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


# ---------------------------------------------------------------- inputs

def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: the benchmark runs on cpu or cuda")
    return dev


def _pick(names: Iterable[str] | None, known: Sequence[str], registry: dict, what: str,
          default: Sequence[str]) -> list[str]:
    if names is None:
        return list(default)
    names = list(names)
    if not names or [n.strip().lower() for n in names] == ["none"]:
        return []  # the group is not benchmarked
    out: list[str] = []
    for n in names:
        n = n.strip()
        if not n:
            continue
        if n not in registry and n not in known:
            choices = sorted(set(known) | set(registry))
            raise UserError(f"unknown {what} {n!r}: choose from {', '.join(choices)}")
        if n not in out:
            out.append(n)
    return out


def _fill_shape_kwargs(arch: str, info: DatasetInfo, arch_kwargs: dict | None) -> dict | None:
    """For `module:Class` architectures whose constructor takes `in_channels` /
    `num_classes`, fill them from the dataset unless given, so that e.g. SmallCNN
    benchmarks on CIFAR shapes without extra flags."""
    if ":" not in arch:
        return arch_kwargs
    module_name, _, attr = arch.partition(":")
    try:
        ctor = getattr(importlib.import_module(module_name), attr)
        params = inspect.signature(ctor).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return arch_kwargs  # build_architecture reports the problem in its own words
    kwargs = dict(arch_kwargs or {})
    for key, value in (("in_channels", info.channels), ("num_classes", info.num_classes)):
        if key in params and key not in kwargs:
            kwargs[key] = value
    return kwargs or None


def build_model(arch: str, info: DatasetInfo, arch_kwargs: dict | None = None) -> nn.Module:
    """The architecture with random weights, checked against the dataset's shapes."""
    from ..zoo import build_architecture

    model = build_architecture(arch, info.name, "Linf", _fill_shape_kwargs(arch, info, arch_kwargs))
    probe = torch.rand(2, info.channels, info.size, info.size)
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(probe)
    except RuntimeError as e:
        raise UserError(f"--arch {arch} does not run on {info.name} inputs of shape "
                        f"{(info.channels, info.size, info.size)}: {str(e).splitlines()[0]} "
                        f"(pick another --dataset, or pass --arch-kwargs)") from None
    if not isinstance(out, torch.Tensor) or out.shape != (2, info.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"--arch {arch} outputs {shape} for a batch of 2, not (2, {info.num_classes}) "
                        f"logits for {info.name}")
    return model


# ---------------------------------------------------------------- the benchmark

def run_benchmark(
    arch: str,
    *,
    dataset: str = "cifar10",
    methods: Sequence[str] | None = None,
    losses: Sequence[str] = LOSSES,
    attacks: Sequence[str] | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    dtype: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
    steps: int = 5,
    warmup: int = 1,
    seed: int = 0,
    arch_kwargs: dict | None = None,
    config_overrides: dict[str, Any] | None = None,
    strict: bool = False,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Benchmark `methods` (each with every loss in `losses` it accepts) and `attacks`.

    `methods=None` means every known method and `attacks=None` the device's
    default list (module docstring); pass `[]` to skip a group. The baselines
    (pgd-at, pgd20) are added when their group is benchmarked, because ratios are
    measured against them in the same run. `config_overrides` sets TrainConfig
    fields for the methods (e.g. `{"gen_width": 64}`), on top of the device's
    defaults (`CPU_DEFAULT_OVERRIDES` on CPU, none on GPU). `warmup` counts the
    untimed steps; the first of them is always run (it is the FLOP-counting step).
    Items whose method or attack is not implemented in this build are kept as rows
    with status "skipped"; an item that raises becomes status "error" (or raises,
    with `strict`).
    """
    from ..attacks import ATTACKS
    from ..config import TrainConfig
    from ..methods import METHODS

    if int(batch_size) < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if int(steps) < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if int(warmup) < 0:
        raise UserError(f"--warmup must be 0 or more, got {warmup}")
    dev = _resolve_device(device)
    dtype = check_dtype(dev, dtype)
    info = dataset_info(dataset)
    bad_loss = [l for l in losses if l not in LOSSES]
    if bad_loss:
        raise UserError(f"unknown loss {bad_loss[0]!r}: choose ce or trades")
    method_names = _pick(methods, KNOWN_METHODS, METHODS, "method", KNOWN_METHODS)
    attack_names = _pick(attacks, KNOWN_ATTACKS, ATTACKS, "attack",
                         PAPER_ATTACKS if dev.type == "cuda" else CPU_DEFAULT_ATTACKS)
    if method_names and METHOD_BASELINE not in method_names:
        method_names.insert(0, METHOD_BASELINE)
    if attack_names and ATTACK_BASELINE not in attack_names:
        attack_names.insert(0, ATTACK_BASELINE)
    overrides = {**(CPU_DEFAULT_OVERRIDES if dev.type == "cpu" else {}), **(config_overrides or {})}
    for chosen in ("method", "loss"):
        if chosen in overrides:
            raise UserError(f"setting {chosen!r} is chosen by the benchmark: use --methods / --losses")
    base_cfg = TrainConfig().updated({**overrides, "dataset": info.name, "batch_size": int(batch_size),
                                      "seed": seed, "device": str(dev), "amp": dtype != "fp32"})

    bench = _Bench(arch, info, arch_kwargs, dev, dtype, int(batch_size), channels_last, compile, int(steps),
                   int(warmup), seed, strict)
    say = progress or (lambda msg: None)
    meta = bench.meta()
    meta["config_overrides"] = overrides
    rows: list[BenchRow] = []
    try:
        items = []
        for name in method_names:
            if name not in METHODS:
                rows.append(BenchRow("method", name, None, status="skipped", baseline=METHOD_BASELINE,
                                     note="not implemented in this build"))
                continue
            accepted = tuple(getattr(METHODS[name], "accepts_loss", LOSSES))
            # A method with one intrinsic loss (pgd-at: ce, trades: trades) runs with it even
            # when `losses` names only the other: the baseline must run, and silently dropping
            # the pointwise TRADES row would hide a method the user asked for.
            for loss in [l for l in losses if l in accepted] or [accepted[0]]:
                items.append(bench.method_item(base_cfg.updated({"method": name, "loss": loss})))
                rows.append(items[-1][0])
        bench.run_group(items, say)
        if attack_names:
            bench.prepare_attack_inputs()
        items = []
        for name in attack_names:
            if name not in ATTACKS:
                rows.append(BenchRow("attack", name, None, status="skipped", baseline=ATTACK_BASELINE,
                                     note="not implemented in this build"))
                continue
            items.append(bench.attack_item(name))
            rows.append(items[-1][0])
        bench.run_group(items, say)
    finally:
        bench.close()
    _fill_ratios(rows)
    return BenchResult(meta, rows)


class _Bench:
    """One architecture on one device: the model, the random batch, the pass logs,
    and the measurement of groups of items."""

    def __init__(self, arch, info: DatasetInfo, arch_kwargs, dev, dtype, batch_size, channels_last, compile,
                 steps, warmup, seed, strict):
        self.arch, self.info, self.arch_kwargs, self.dev, self.dtype = arch, info, arch_kwargs, dev, dtype
        self.batch_size, self.channels_last, self.compile = batch_size, channels_last, compile
        self.steps, self.warmup, self.seed, self.strict = steps, warmup, seed, strict
        set_seed(seed)
        self.model = build_model(arch, info, arch_kwargs).to(dev)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(batch_size, info.channels, info.size, info.size, generator=g).to(dev)
        self.y = torch.randint(0, info.num_classes, (batch_size,), generator=g).to(dev)
        if channels_last:
            self.model, self.x = to_channels_last(self.model, self.x)
        # Every item is set up from the same weights; the interleaved timed steps then share
        # the model, which changes the values but not the cost of anyone's step.
        self.init_state = copy.deepcopy(self.model.state_dict())
        self.timed_model = maybe_compile(self.model, compile)
        self.head = find_last_linear(self.model, self.x)[1]
        # With --compile the FLOP-counting step runs eagerly (FlopCounterMode does not see
        # inside a compiled graph); this flag picks which module a step calls.
        self.eager_now = False
        self.phase = ["step"]
        self.cost = _CostModel()
        self.clf_log = _PassLog("classifier", self.timed_model, self.phase)
        self.clf_log.module = self.model  # replays run on the eager module
        self.counter = PassCounter(self.timed_model)

    def classifier(self) -> nn.Module:
        return self.model if self.eager_now else self.timed_model

    def close(self) -> None:
        self.clf_log.remove()
        self.counter.remove()

    def meta(self) -> dict[str, Any]:
        per_image = {}
        for kind, rg in ((None, False), ("input", True), ("full", True)):
            sig = ((tuple(self.x.shape), rg, True),)
            per_image[kind] = _replay_flops(self.model, ((self.x,), {}), sig, kind) / self.batch_size / 1e9
        info = self.info
        return {
            "schema": SCHEMA,
            "device": {"type": self.dev.type, "name": device_name(self.dev), "threads": torch.get_num_threads()},
            "torch": torch.__version__,
            "versions": _versions(),
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "dataset": info.name,
            "input_shape": [info.channels, info.size, info.size],
            "num_classes": info.num_classes,
            "classifier_params": num_params(self.model),
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "channels_last": bool(self.channels_last),
            "compile": bool(self.compile),
            "steps": self.steps,
            "warmup": self.warmup,
            "seed": self.seed,
            "config_overrides": {},
            "classifier_gflop_per_image": {"forward": per_image[None], "forward_input_backward": per_image["input"],
                                           "forward_full_backward": per_image["full"]},
            "peak_mem_meaning": PEAK_MEM_MEANING[self.dev.type],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    # ------------------------------------------------ items

    def method_item(self, cfg) -> tuple[BenchRow, Callable]:
        from ..methods import MethodContext, make_method

        row = BenchRow("method", cfg.method, cfg.loss, baseline=METHOD_BASELINE)
        dev, dtype, model, x, y = self.dev, self.dtype, self.model, self.x, self.y

        def make_step():
            ctx = MethodContext(eps=self.info.eps, in_channels=self.info.channels,
                                num_classes=self.info.num_classes, image_size=self.info.size, device=dev,
                                head=self.head, amp_dtype=torch_dtype(dtype))
            method = make_method(cfg, ctx)
            for m in method.modules().values():
                m.to(dev)
                if self.channels_last:
                    to_channels_last(m)
            method.train(True)
            # What the trainer does: SGD with momentum on the classifier, one backward per step.
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                  weight_decay=2e-4)
            scaler = make_grad_scaler(dev, dtype)

            def step():
                net = self.classifier()
                net.train()
                method.zero_grad()
                opt.zero_grad(set_to_none=True)
                with autocast_context(dev, dtype):
                    out = method.step(net, x, y)
                self.phase[0] = "backward"
                try:
                    scaler.scale(out.loss).backward()
                finally:
                    self.phase[0] = "step"
                scaler.step(opt)
                scaler.update()
                method.after_backward()

            return step, method.modules

        return row, make_step

    def prepare_attack_inputs(self) -> None:
        """Labels = the random model's clean predictions (every example starts robust, so
        attacks do their full work), and a class-balanced pool for `attack.prepare`."""
        with torch.no_grad(), eval_mode(self.model):
            self.y_attack = self.model(self.x).argmax(1)
        g = torch.Generator().manual_seed(self.seed + 1)
        pool_x = torch.rand(PREPARE_POOL, *self.x.shape[1:], generator=g).to(self.dev)
        pool_y = (torch.arange(PREPARE_POOL) % self.info.num_classes).to(self.dev)
        if self.channels_last:
            pool_x = to_channels_last(x=pool_x)
        self.pool = (torch.cat([self.x, pool_x]), torch.cat([self.y_attack, pool_y]))

    def attack_item(self, name: str) -> tuple[BenchRow, Callable]:
        from ..attacks import make_attack

        row = BenchRow("attack", name, None, baseline=ATTACK_BASELINE)
        dev, dtype = self.dev, self.dtype

        def make_step():
            attack = make_attack(name, self.info.eps, seed=self.seed)
            t0 = time.perf_counter()
            with eval_mode(self.model), autocast_context(dev, dtype):
                attack.prepare(self.classifier(), *self.pool)
            _sync(dev)
            row.prepare_s = time.perf_counter() - t0

            def step():
                with eval_mode(self.model), autocast_context(dev, dtype):
                    attack(self.classifier(), self.x, self.y_attack)

            return step, dict

        return row, make_step

    # ------------------------------------------------ measurement

    def run_group(self, items: list[tuple[BenchRow, Callable]], say: Callable[[str], None]) -> None:
        """Set up and warm up each item in turn, then time them interleaved.

        Round-robin timing (one step of each item, `steps` times over) exposes every
        item to the same background load and clock drift, so the ratios between them
        stay fair on a shared or thermally throttling machine.
        """
        live: list[_Item] = []
        for row, make_step in items:
            say(f"{row.kind} {row.name}" + (f" ({row.loss})" if row.loss else ""))
            item = self._guard(row, lambda: self._prepare(row, make_step))
            if item is not None:
                live.append(item)
        if live:
            say(f"timing {len(live)} item{'s' if len(live) > 1 else ''} interleaved, {self.steps} "
                f"step{'s' if self.steps > 1 else ''} each")
        for _ in range(self.steps):
            for item in list(live):
                if self._guard(item.row, lambda: self._timed_step(item)) is None:
                    live.remove(item)
                    for log in item.own_logs:
                        log.remove()
        for item in live:
            self._finish(item)
        for item in live:
            for log in item.own_logs:
                log.remove()

    def _guard(self, row: BenchRow, fn: Callable):
        """Run one part of an item; a failure becomes the row's status instead of ending the run."""
        try:
            return fn() or True
        except NotImplementedError as e:
            row.status, row.note = "skipped", _join("not implemented in this build", str(e))
        except UserError:
            raise
        except Exception as e:
            if self.strict:
                raise
            row.status, row.note = "error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        _clear_numbers(row)
        self.clf_log.reset()
        return None

    def _prepare(self, row: BenchRow, make_step) -> "_Item":
        """Build the item, run its FLOP-counting step (untimed, the first warm-up) and the rest
        of the warm-up, measuring its peak memory over all of that."""
        set_seed(self.seed)
        self.model.load_state_dict(self.init_state)
        with _PeakMemory(self.dev) as mem:
            step, own_modules = make_step()
            self.eager_now = self.compile
            try:
                with GlobalFlopCounter() as fc:
                    step()
            finally:
                self.eager_now = False
            row.counted_flops = float(fc.get_total_flops())
            # Logged only now: a method may build its generator lazily in its first step.
            item = _Item(row, step, [_PassLog(n, m, self.phase) for n, m in _top_level_modules(own_modules()).items()])
            # A compiled model still needs its own warm-up: the counting step ran eagerly.
            for _ in range(max(self.warmup - (0 if self.compile else 1), 0)):
                step()
        row.peak_mem_mb = mem.mb
        self.clf_log.reset()
        return item

    def _timed_step(self, item: "_Item") -> None:
        self.clf_log.reset()
        for log in item.own_logs:
            log.reset()
        self.counter.reset()
        _sync(self.dev)
        wall, cpu = time.perf_counter(), time.process_time()
        item.step()
        _sync(self.dev)
        item.times.append(time.perf_counter() - wall)
        item.cpu_times.append(time.process_time() - cpu)
        # Pass counts and the cost model describe the item's last timed step.
        item.counts = (self.counter.forward, self.counter.backward, self.counter.images_forward)
        item.clf_passes = list(self.clf_log.passes)
        self.clf_log.reset()

    def _finish(self, item: "_Item") -> None:
        row = item.row
        row.step_times_s = item.times
        row.step_time_s = statistics.median(item.times)
        if self.dev.type == "cpu":
            row.step_cpu_s = statistics.median(item.cpu_times)
        row.images_per_s = self.batch_size / row.step_time_s
        row.tflops = row.counted_flops / row.step_time_s / 1e12
        row.forward_passes, row.backward_passes, row.forward_images = item.counts
        row.module_passes = {log.name: {"forward": len(log.passes),
                                        "backward": sum(1 for p in log.passes if p.grad_phases)}
                             for log in item.own_logs}
        try:
            by_module = self.cost.step_flops([(self.clf_log, item.clf_passes),
                                              *[(log, log.passes) for log in item.own_logs]])
        except Exception as e:  # a call that cannot be replayed: no prediction, not a failed item
            row.note = _join(row.note, f"no cost model ({type(e).__name__}: {e})")
        else:
            row.predicted_flops_by_module = by_module
            row.predicted_flops = sum(by_module.values())


@dataclass
class _Item:
    row: BenchRow
    step: Callable[[], None]
    own_logs: list[_PassLog]
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    counts: tuple[int, int, int] = (0, 0, 0)
    clf_passes: list[_Pass] = field(default_factory=list)


def _clear_numbers(row: BenchRow) -> None:
    for k in ("images_per_s", "step_time_s", "step_cpu_s", "forward_passes", "backward_passes", "forward_images",
              "peak_mem_mb", "predicted_flops", "counted_flops", "tflops"):
        setattr(row, k, None)
    row.step_times_s, row.module_passes, row.predicted_flops_by_module = [], {}, {}


def _fill_ratios(rows: list[BenchRow]) -> None:
    def ok(r):
        return r.status == "ok" and r.step_time_s is not None

    base_m = next((r for r in rows if r.kind == "method" and r.name == METHOD_BASELINE and ok(r)), None)
    base_a = next((r for r in rows if r.kind == "attack" and r.name == ATTACK_BASELINE and ok(r)), None)
    for r in rows:
        base = base_m if r.kind == "method" else base_a
        if not ok(r) or base is None:
            continue
        r.ratio = r.step_time_s / base.step_time_s
        if r.step_cpu_s is not None and base.step_cpu_s:
            r.cpu_ratio = r.step_cpu_s / base.step_cpu_s
        if r.kind == "method":
            r.ratio_to_pgd_at = r.ratio
        else:
            r.ratio_to_pgd20 = r.ratio
        if r.predicted_flops is not None and base.predicted_flops:
            r.predicted_ratio = r.predicted_flops / base.predicted_flops
    if base_m is None and any(r.kind == "method" and ok(r) for r in rows):
        for r in rows:
            if r.kind == "method" and ok(r):
                r.note = _join(r.note, f"no ratio: {METHOD_BASELINE} did not run")


def _top_level_modules(mods: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Drop modules nested inside another listed one, so no pass is counted twice."""
    out = {}
    for name, m in mods.items():
        if not isinstance(m, nn.Module):
            continue
        nested = any(other is not m and any(sub is m for sub in other.modules()) for other in mods.values()
                     if isinstance(other, nn.Module))
        if not nested:
            out[name] = m
    return out


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a and b else a or b


def _versions() -> dict[str, str | None]:
    from ..utils import versions

    return versions()


def parse_list(text: str | None) -> list[str] | None:
    """'a,b, c' -> ['a', 'b', 'c']; None stays None (the default list)."""
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """KEY=VALUE strings (values read as YAML scalars: 64, 0.1, true) into a dict."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: write KEY=VALUE, e.g. --set gen_width=64")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: cannot read the value {value!r}") from None
    return out


