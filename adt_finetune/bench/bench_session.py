"""One architecture on one device: the random-weight model and batch, the pass logs,
and the run's metadata. Items (items.py) and their measurement (timing.py) share it."""
from __future__ import annotations

import copy
import datetime as _dt
from typing import Any

import torch
from torch import nn

from ..data import DatasetInfo
from ..nets import PassCounter, eval_mode, find_last_linear, num_params
from ..precision import maybe_compile, to_channels_last
from ..utils import set_seed, versions
from .cost import CostModel, PassLog, replay_flops
from .memory import PEAK_MEM_MEANING, device_name
from .model import build_model
from .bench_config import PREPARE_POOL, SCHEMA


class BenchSession:
    """The state every item of one benchmark run shares."""

    def __init__(self, arch: str, info: DatasetInfo, arch_kwargs: dict | None, dev: torch.device, dtype: str,
                 batch_size: int, channels_last: bool, compile: bool, steps: int, warmup: int, seed: int,
                 strict: bool):
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
        self.scope = "full"
        self.phase = ["step"]
        self.cost = CostModel()
        self.clf_log = PassLog("classifier", self.timed_model, self.phase)
        self.clf_log.module = self.model  # replays run on the eager module
        self.counter = PassCounter(self.timed_model)


    def synthetic_images(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n random images and labels standing in for the training set (wdat's Υ set): a step's cost
        does not depend on the pixel values."""
        g = torch.Generator().manual_seed(self.seed + 1)
        x = torch.rand(n, self.info.channels, self.info.size, self.info.size, generator=g)
        return x, torch.randint(0, self.info.num_classes, (n,), generator=g)
    def set_scope(self, scope: str) -> None:
        """What the trainer trains under `scope`: everything, or (last-layer) the head on a frozen
        body, whose skipped weight gradients are most of the cost difference."""
        self.scope = scope
        for p in self.model.parameters():
            p.requires_grad_(scope != "last-layer")
        for p in self.head.parameters():
            p.requires_grad_(True)

    def set_train_mode(self, net: nn.Module) -> None:
        """The trainer's modes: under last-layer the body stays in eval mode (BatchNorm frozen too)."""
        if self.scope == "last-layer":
            net.eval()
            self.head.train()
        else:
            net.train()

    def classifier(self) -> nn.Module:
        return self.model if self.eager_now else self.timed_model

    def close(self) -> None:
        self.clf_log.remove()
        self.counter.remove()

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

    def meta(self) -> dict[str, Any]:
        """The JSON's run-level fields (docs/bench.md, "JSON")."""
        per_image = {}
        for kind, rg in ((None, False), ("input", True), ("full", True)):
            sig = ((tuple(self.x.shape), rg, True),)
            per_image[kind] = replay_flops(self.model, ((self.x,), {}), sig, kind) / self.batch_size / 1e9
        info = self.info
        return {
            "schema": SCHEMA,
            "device": {"type": self.dev.type, "name": device_name(self.dev), "threads": torch.get_num_threads()},
            "torch": torch.__version__,
            "versions": versions(),
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
