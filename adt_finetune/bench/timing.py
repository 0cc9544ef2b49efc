"""Measuring a group of items: each is set up and warmed up on its own (its peak memory
and its FLOP-counting step then), and all are timed round-robin, one step each per
round, so that background load and clock drift hit every item alike."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError
from ..utils import set_seed
from .cost import GlobalFlopCounter, Pass, PassLog, top_level_modules
from .items import Item
from .memory import PeakMemory, sync
from .results import NOT_IMPLEMENTED, BenchRow, clear_numbers, join_notes
from .bench_session import BenchSession


@dataclass
class _Live:
    """An item that is set up and still running, with what its timed steps measured."""
    row: BenchRow
    step: Callable[[], None]
    own_logs: list[PassLog]
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    counts: tuple[int, int, int] = (0, 0, 0)
    clf_passes: list[Pass] = field(default_factory=list)


def run_group(s: BenchSession, items: list[Item], say: Callable[[str], None]) -> None:
    """Set up and warm up each item in turn, then time them interleaved, `s.steps` rounds."""
    live: list[_Live] = []
    for row, make_step in items:
        say(f"benchmarking {row.kind} {row.name}" + (f" ({row.loss})" if row.loss else "") + "…")
        item = _guard(s, row, lambda: _prepare(s, row, make_step))
        if item is not None:
            live.append(item)
    if live:
        say(f"timing {len(live)} item{'s' if len(live) > 1 else ''} interleaved, {s.steps} "
            f"step{'s' if s.steps > 1 else ''} each…")
    for _ in range(s.steps):
        for item in list(live):
            if _guard(s, item.row, lambda: _timed_step(s, item)) is None:
                live.remove(item)
                for log in item.own_logs:
                    log.remove()
    for item in live:
        _finish(s, item)
    for item in live:
        for log in item.own_logs:
            log.remove()


def _guard(s: BenchSession, row: BenchRow, fn: Callable):
    """Run one part of an item; a failure becomes the row's status instead of ending the run."""
    try:
        return fn() or True
    except NotImplementedError as e:
        row.status, row.note = "skipped", join_notes(NOT_IMPLEMENTED, str(e))
    except UserError:
        raise
    except Exception as e:
        if s.strict:
            raise
        row.status, row.note = "error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    clear_numbers(row)
    s.clf_log.reset()
    return None


def _prepare(s: BenchSession, row: BenchRow, make_step) -> _Live:
    """Build the item, run its FLOP-counting step (untimed, the first warm-up) and the rest
    of the warm-up, measuring its peak memory over all of that."""
    set_seed(s.seed)
    s.model.load_state_dict(s.init_state)
    with PeakMemory(s.dev) as mem:
        step, own_modules = make_step()
        s.eager_now = s.compile
        try:
            with GlobalFlopCounter() as fc:
                step()
        finally:
            s.eager_now = False
        row.counted_flops = float(fc.get_total_flops())
        # Logged only now: a method may build its generator lazily in its first step.
        item = _Live(row, step, [PassLog(n, m, s.phase) for n, m in top_level_modules(own_modules()).items()])
        # A compiled model still needs its own warm-up: the counting step ran eagerly.
        for _ in range(max(s.warmup - (0 if s.compile else 1), 0)):
            step()
    row.peak_mem_mb = mem.mb
    s.clf_log.reset()
    return item


def _timed_step(s: BenchSession, item: _Live) -> None:
    s.clf_log.reset()
    for log in item.own_logs:
        log.reset()
    s.counter.reset()
    sync(s.dev)
    wall, cpu = time.perf_counter(), time.process_time()
    item.step()
    sync(s.dev)
    item.times.append(time.perf_counter() - wall)
    item.cpu_times.append(time.process_time() - cpu)
    # Pass counts and the cost model describe the item's last timed step.
    item.counts = (s.counter.forward, s.counter.backward, s.counter.images_forward)
    item.clf_passes = list(s.clf_log.passes)
    s.clf_log.reset()


def _finish(s: BenchSession, item: _Live) -> None:
    row = item.row
    row.step_times_s = item.times
    row.step_time_s = statistics.median(item.times)
    if s.dev.type == "cpu":
        row.step_cpu_s = statistics.median(item.cpu_times)
    row.images_per_s = s.batch_size / row.step_time_s
    row.tflops = row.counted_flops / row.step_time_s / 1e12
    row.forward_passes, row.backward_passes, row.forward_images = item.counts
    row.module_passes = {log.name: {"forward": len(log.passes),
                                    "backward": sum(1 for p in log.passes if p.grad_phases)}
                         for log in item.own_logs}
    try:
        by_module = s.cost.step_flops([(s.clf_log, item.clf_passes),
                                       *[(log, log.passes) for log in item.own_logs]])
    except Exception as e:  # a call that cannot be replayed: no prediction, not a failed item
        row.note = join_notes(row.note, f"no cost model ({type(e).__name__}: {e})")
    else:
        row.predicted_flops_by_module = by_module
        row.predicted_flops = sum(by_module.values())
