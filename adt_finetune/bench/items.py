"""What one step of each item is (docs/bench.md, "What a step is"): a method's full
training update on one batch, or one attack call on one batch.

Each maker returns the item's row and a `make_step()` that builds the item and
returns `(step, own_modules)`: the step to time, and a callable listing the
modules of the item's own (a method's generators) whose passes the cost model logs.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..attacks import make_attack
from ..methods import MethodContext, make_method
from ..nets import eval_mode
from ..precision import autocast_context, make_grad_scaler, to_channels_last, torch_dtype
from .memory import sync
from .results import BenchRow
from .bench_session import BenchSession
from .bench_config import ATTACK_BASELINE, METHOD_BASELINE

Item = tuple[BenchRow, Callable]


def method_item(s: BenchSession, cfg) -> Item:
    """A training method's step: `method.zero_grad(); opt.zero_grad(); out = method.step(model, x, y);
    out.loss.backward(); opt.step(); method.after_backward()`, as the trainer does it."""
    row = BenchRow("method", cfg.method, cfg.loss, baseline=METHOD_BASELINE)
    dev, dtype, model, x, y = s.dev, s.dtype, s.model, s.x, s.y

    def make_step():
        ctx = MethodContext(eps=s.info.eps, in_channels=s.info.channels, num_classes=s.info.num_classes,
                            image_size=s.info.size, device=dev, head=s.head, amp_dtype=torch_dtype(dtype),
                            train_images=s.synthetic_images)
        method = make_method(cfg, ctx)
        for m in method.modules().values():
            m.to(dev)
            if s.channels_last:
                to_channels_last(m)
        method.train(True)
        # What the trainer does: SGD with momentum on the classifier, one backward per step.
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                              weight_decay=2e-4)
        scaler = make_grad_scaler(dev, dtype)

        def step():
            net = s.classifier()
            s.set_train_mode(net)
            method.zero_grad()
            opt.zero_grad(set_to_none=True)
            with autocast_context(dev, dtype):
                out = method.step(net, x, y)
            s.phase[0] = "backward"
            try:
                scaler.scale(out.loss).backward()
            finally:
                s.phase[0] = "step"
            scaler.step(opt)
            scaler.update()
            method.after_backward()

        return step, method.modules

    return row, make_step


def attack_item(s: BenchSession, name: str) -> Item:
    """One `attack(model, x, y)` call on the batch; `attack.prepare` runs once on the pool
    before, timed on its own as the row's `prepare_s`. Needs `s.prepare_attack_inputs()`."""
    row = BenchRow("attack", name, None, baseline=ATTACK_BASELINE)
    dev, dtype = s.dev, s.dtype

    def make_step():
        attack = make_attack(name, s.info.eps, seed=s.seed)
        t0 = time.perf_counter()
        with eval_mode(s.model), autocast_context(dev, dtype):
            attack.prepare(s.classifier(), *s.pool)
        sync(dev)
        row.prepare_s = time.perf_counter() - t0

        def step():
            with eval_mode(s.model), autocast_context(dev, dtype):
                attack(s.classifier(), s.x, s.y_attack)

        return step, dict

    return row, make_step
