"""Peak memory of one item, the device's name, and waiting for queued GPU work."""
from __future__ import annotations

import os
import platform
import resource
import threading

import torch

PEAK_MEM_MEANING = {
    "cuda": "torch.cuda.max_memory_allocated over the item's set-up and warm-up steps (absolute, includes the "
            "classifier's weights)",
    "cpu": "increase of the process's resident set size over the item's set-up and warm-up steps, sampled every "
           "2 ms from /proc/self/statm (memory the item needed beyond what was already resident; allocator caching "
           "can make it an underestimate)",
}


class PeakMemory:
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

    def __enter__(self) -> "PeakMemory":
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


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall time covers it."""
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
