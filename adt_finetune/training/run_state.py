"""One run's live state: the model, its optimiser, the method, the data position and every RNG.

Per optimisation step, for every method:

    method.zero_grad(); opt.zero_grad()
    out = method.step(model, x, y)       # the method finds x' (classifier in eval mode) and returns the loss
    out.loss.backward()                  # the only backward through the training loss
    opt.step(); method.after_backward()  # the method steps its own optimisers on that same backward

Under torchrun (`parallel`) `model` is the classifier in DDP, the step's metrics are averaged
over the processes before the nan/inf check, the method's own gradients are averaged between
the backward and `after_backward`, and BatchNorm running statistics after the step.

A checkpoint stores the model, the optimiser, the method's state, every RNG state
and the position inside the epoch, all as tensors and plain types, so it loads
with `torch.load(weights_only=True)` and a resume is bit-identical.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from functools import partial
from itertools import repeat
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import TrainConfig
from ..data import DatasetInfo
from ..distributed import World, all_reduce_sum_
from ..errors import UserError
from ..methods import MethodContext, TrainMethod, make_method
from ..nets import eval_mode, find_last_linear, head_refusal, train_mode_refusal, unusable_tensors
from . import parallel
from .batches import _SeededAugmentation, epoch_batches

CHECKPOINT_FORMAT = 1
TOTAL_LOSS = "_total_loss"  # the loss back-propagated (with any regulariser), checked for nan/inf


# ---------------------------------------------------------------- RNG state (weights_only-safe)

def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# ---------------------------------------------------------------- non-finite values

def _float_tensors(obj: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)] if obj.is_floating_point() or obj.is_complex() else []
    if isinstance(obj, dict):
        return [t for k, v in obj.items() for t in _float_tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [t for i, v in enumerate(obj) for t in _float_tensors(v, f"{prefix}.{i}")]
    return []


def first_non_finite(state: Any) -> str | None:
    """The name of the first tensor in a (nested) state holding nan or inf, else None.

    One device synchronisation per device for the whole state, so checking every few dozen steps costs little.
    """
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for k, t in _float_tensors(state):
        if t.numel():
            by_device.setdefault(t.device, []).append((k, t))
    for named in by_device.values():
        flags = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu()
        if not bool(flags.all()):
            return next(k for (k, _), ok in zip(named, flags.tolist()) if not ok)
    return None


# ---------------------------------------------------------------- position

@dataclass
class Position:
    """Where training stands; everything here goes into the checkpoint."""

    epoch: int = 0                    # 0-based epoch in progress
    step_in_epoch: int = 0
    global_step: int = 0
    sums: dict[str, float] = field(default_factory=dict)     # Σ metric·batch size over this epoch so far
    counts: dict[str, int] = field(default_factory=dict)
    epoch_time_s: float = 0.0         # time spent in this epoch before the current process took over
    history: list[dict[str, Any]] = field(default_factory=list)

    def add(self, metrics: dict[str, float], batch: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * batch
            self.counts[k] = self.counts.get(k, 0) + batch

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.sums, self.counts, self.epoch_time_s = {}, {}, 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "sums": dict(self.sums), "counts": dict(self.counts), "epoch_time_s": self.epoch_time_s,
                "history": list(self.history)}

    @classmethod
    def from_dict(cls, p: dict[str, Any]) -> "Position":
        return cls(epoch=int(p["epoch"]), step_in_epoch=int(p["step_in_epoch"]), global_step=int(p["global_step"]),
                   sums=dict(p["sums"]), counts=dict(p["counts"]), epoch_time_s=float(p["epoch_time_s"]),
                   history=list(p["history"]))


# ---------------------------------------------------------------- the session

class Session:
    """The model, data, optimiser and method of one run, set up identically for a fresh start and a resume."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, train_set: Dataset, info: DatasetInfo,
                 device: torch.device, *, eps: float, reinit_head: bool, world: World | None = None,
                 threat_model: str = "Linf",
                 train_images: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.cfg = cfg
        self.device = device
        self.world = world or World(0, 1, 0, device, None)
        self.model = model.to(device)
        self.train_set = train_set
        self.augmented = _SeededAugmentation(train_set, cfg.seed) if info.augment != "none" else None
        # Through the seeded wrapper when there is one, so finding the head draws nothing from the global RNG.
        first_image = (self.augmented if self.augmented is not None else train_set)[0][0]
        self.head_name, self.head = find_last_linear(self.model, first_image.unsqueeze(0).to(device))
        self._refuse_untrainable(info, device)
        self._set_scope(reinit_head)
        # --sync-bn only matters with several processes; one process keeps its plain BatchNorm.
        self.sync_bn = cfg.sync_bn and self.world.size > 1 and cfg.scope == "full"
        if self.sync_bn:
            parallel.convert_sync_bn(self.model, device)

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        ctx = MethodContext(eps=eps, in_channels=info.channels, num_classes=info.num_classes,
                            image_size=info.size, device=device, head=self.head,
                            amp_dtype=torch.bfloat16 if cfg.amp else None,
                            all_reduce=partial(all_reduce_sum_, self.world) if self.world.size > 1 else None,
                            train_images=train_images, threat_model=threat_model)
        self.method = make_method(cfg, ctx)
        self.method.train(True)
        self.n_examples = len(train_set)  # type: ignore[arg-type]
        self.steps_per_epoch = len(self.batches(0))
        # What the methods train: the classifier itself, or wrapped in DDP by `parallelise`.
        self.trained: nn.Module = self.model
        self.sync = parallel.StepSync(self.world, self.model, list(self.method.modules().values()),
                                      sync_model_buffers=cfg.scope == "full" and not self.sync_bn)

    def parallelise(self) -> None:
        """Under torchrun: wrap the classifier in DDP and start every process from rank 0's networks
        (collectives: every rank calls this once, after the session is built or restored)."""
        self.trained = parallel.wrap(self.model, self.world)
        self.sync.start()

    def _refuse_untrainable(self, info: DatasetInfo, device: torch.device) -> None:
        """One line, before anything trains, for a model this scope cannot train: a last linear layer that
        is not the classifier head, or a forward pass that refuses train mode (MixedNUTS ensembles)."""
        refusal = head_refusal(self.head, self.head_name, info.num_classes)
        if refusal is not None:
            raise UserError(f"cannot fine-tune this model: {refusal}")
        if len(self.train_set) < 2:  # type: ignore[arg-type]
            return  # too few images to run BatchNorm in train mode; the run itself says so
        two = torch.stack([self.train_set[i][0] for i in range(2)]).to(device)
        only = self.head if self.cfg.scope == "last-layer" else None
        refusal = train_mode_refusal(self.model, two, only=only)
        if refusal is not None:
            hint = "; scope last-layer keeps the body in eval mode" if only is None else ""
            raise UserError(f"cannot fine-tune this model with scope {self.cfg.scope}: {refusal}{hint}")

    def _set_scope(self, reinit_head: bool) -> None:
        if self.cfg.scope == "last-layer":
            for p in self.model.parameters():
                p.requires_grad_(False)
            for p in self.head.parameters():
                p.requires_grad_(True)
        else:
            for p in self.model.parameters():
                p.requires_grad_(True)
        if reinit_head:
            self.head.reset_parameters()  # seeded: set_seed(cfg.seed) ran before the session was built

    def perturb_weights(self, sigma: float, seed: int) -> None:
        """The fine-tuning protocol's small perturbation before training: every trained tensor
        w += σ·rms(w)·N(0, 1), drawn from its own generator (the global RNG is untouched)."""
        if not sigma:
            return
        g = torch.Generator().manual_seed(int(seed) + 0x77E1)
        with torch.no_grad():
            for p in self.model.parameters():
                if p.requires_grad and p.numel():
                    noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.device, p.dtype)
                    p.add_(sigma * p.detach().float().pow(2).mean().sqrt().to(p.dtype) * noise)

    @property
    def measures_diagnostics(self) -> bool:
        """Whether the method reports epoch diagnostics (the base class's default reports none)."""
        return type(self.method).epoch_diagnostics is not TrainMethod.epoch_diagnostics

    def set_train_modes(self) -> None:
        # Methods switch the classifier to eval mode while they search perturbations and
        # restore it; setting the modes every step keeps that contract local.
        if self.cfg.scope == "last-layer":
            self.model.eval()  # frozen body: BatchNorm running statistics stay as loaded
            self.head.train()
        else:
            self.model.train()
        parallel.set_training(self.trained, self.model)

    def batches(self, epoch: int) -> list[list[int]]:
        """This process's batches of `epoch` (indices into the training set)."""
        return epoch_batches(self.n_examples, self.cfg.batch_size, self.cfg.seed, epoch, self.world.rank,
                             self.world.size)

    def loader(self, epoch: int, start_step: int) -> DataLoader:
        batches = self.batches(epoch)[start_step:]
        dataset = self.train_set
        if self.augmented is not None:
            self.augmented.epoch = epoch
            dataset = self.augmented
        # A private generator: without one, creating the iterator draws from the global RNG.
        return DataLoader(dataset, batch_sampler=batches, num_workers=self.cfg.workers,
                          pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(0))

    def epoch_data(self, epoch: int, start_step: int) -> Iterator[tuple[list[int] | None, torch.Tensor, torch.Tensor]]:
        """(example keys, x, y) per step from `start_step` on; the keys (one per image, unique over
        the run: epoch·N + index) only when the run draws per-example randomness."""
        keys: Iterable[list[int] | None] = repeat(None)
        if self.cfg.example_seeds:
            keys = ([epoch * self.n_examples + i for i in b] for b in self.batches(epoch)[start_step:])
        for k, (x, y) in zip(keys, self.loader(epoch, start_step)):
            yield k, x, y

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float, keys: list[int] | None = None,
             global_step: int = 0) -> dict[str, float]:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.set_train_modes()
        if self.cfg.example_seeds:  # keyed randomness: the rest of the step's draws are keyed to the step
            parallel.reseed(self.cfg.seed, global_step, self.world.rank)
        self.method.example_keys = keys
        self.method.zero_grad()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp):
            out = self.method.step(self.trained, x, y)
        local = {"loss": out.loss.item(), **out.metrics}
        # Over every process's share of the batch, so all of them take the same decision here.
        reduced = self.sync.metrics({**local, TOTAL_LOSS: out.loss.item()}, len(y))
        loss = reduced.pop(TOTAL_LOSS)
        if not math.isfinite(loss):
            raise UserError(f"training diverged (loss {loss}): lower `lr`, or drop `amp`")
        out.loss.backward()
        self.sync.method_gradients()
        self.optimizer.step()
        self.method.after_backward()
        self.sync.buffers_after_step()
        return {k: reduced[k] for k in local}

    def diagnostics(self, probe: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, float]:
        """The method's epoch diagnostics on the probe batch, leaving training exactly as it was:
        the RNG streams are forked, every module is in eval mode (BatchNorm statistics stay),
        and whatever gradients the measurement left are cleared as the next step would."""
        if probe is None:
            return {}
        x, y = probe[0].to(self.device), probe[1].to(self.device)
        devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else []
        self.method.train(False)
        try:
            with torch.random.fork_rng(devices=devices), eval_mode(self.model):
                found = self.method.epoch_diagnostics(self.model, x, y)
        finally:
            self.method.train(True)
            self.method.zero_grad()
            self.optimizer.zero_grad(set_to_none=True)
        return {str(k): float(v) for k, v in found.items()}

    def checkpoint(self, pos: Position) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "position": pos.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "method": self.method.state_dict(), "rng": rng_state()}

    def non_finite(self) -> str | None:
        """What makes the run's state unusable, if anything: "<name> holds nan/inf values" (a weight,
        buffer or optimiser/method state) or "<name> holds a negative variance" (a BatchNorm running
        variance: finite, yet every eval-mode prediction through it is NaN)."""
        bad = first_non_finite({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                "method": self.method.state_dict()})
        if bad is not None:
            return f"{bad} holds nan/inf values"
        invalid = unusable_tensors(self.model.named_buffers())
        return invalid[0] if invalid else None

    def restore(self, ckpt: dict[str, Any]) -> Position:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.method.load_state_dict(ckpt["method"])
        set_rng_state(ckpt["rng"])
        return Position.from_dict(ckpt["position"])
