"""The `corruptions` suite: RobustBench's common-corruptions protocol (docs/evaluation.md, "Common corruptions").

The model classifies the first n test images under each of the 15 corruptions at each of the 5 severities
(75 passes over n images, read from the published files by `corruption_files`). The entry's number is
RobustBench's `corruptions_acc`: the mean of the 75 accuracies, which, every cell having the same n images,
is also the mean of the 15 per-corruption means. No attack runs and there is no ε.
"""
from __future__ import annotations

import csv
import hashlib
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..nets import eval_mode
from ..progress import Reporter, as_reporter
from .corruption_files import CORRUPTIONS, SEVERITIES, CorruptionFiles
from .engine import clean_pass
from .result import SanityCheck
from .resume import _ResumeState, fingerprint
from .sanity import check_finite_logits, degenerate_model_checks

TASK = "corruptions"  # the reporter's key for the suite's one progress task


def cell_name(corruption: str, severity: int) -> str:
    """A per-example column: 'fog@3'."""
    return f"{corruption}@{severity}"


@dataclass
class CorruptionResult:
    """Per-example flags of one corruptions evaluation; every number derives from them."""

    dataset: str
    labels: np.ndarray                      # (N,) int64
    flags: np.ndarray                       # (N, 15, 5) bool: correct under corruption k at severity s
    clean: np.ndarray | None                # (N,) bool, None when the clean test set was not there
    clean_note: str                         # where the clean accuracy comes from, or why there is none
    batch_size: int
    device: str
    files: dict[str, Any]                   # folder, images per severity, sha256 of the rows read
    timings_s: dict[str, float] = field(default_factory=dict)
    sanity: list[SanityCheck] = field(default_factory=list)
    non_finite: int = 0                     # corrupted images with a non-finite logit (counted as wrong)

    @property
    def n_examples(self) -> int:
        return int(len(self.labels))

    @property
    def accuracy(self) -> dict[str, dict[str, float]]:
        """{corruption: {"1": %, ..., "5": %}}."""
        return {c: {str(s): _pct(self.flags[:, k, j]) for j, s in enumerate(SEVERITIES)}
                for k, c in enumerate(CORRUPTIONS)}

    @property
    def per_corruption(self) -> dict[str, float]:
        return {c: _pct(self.flags[:, k, :]) for k, c in enumerate(CORRUPTIONS)}

    @property
    def corruptions_acc(self) -> float:
        """The mean of the 75 accuracies (RobustBench's `corruptions_acc`, in %)."""
        cells = [_pct(self.flags[:, k, j]) for k in range(len(CORRUPTIONS)) for j in range(len(SEVERITIES))]
        return float(np.mean(cells))

    @property
    def clean_acc(self) -> float | None:
        return None if self.clean is None else _pct(self.clean)

    @property
    def unreliable(self) -> bool:
        return any(c.ok is False for c in self.sanity)

    def to_json(self) -> dict[str, Any]:
        return {
            "suite": "corruptions",
            "n_examples": self.n_examples,
            "batch_size": self.batch_size,
            "clean_acc": self.clean_acc,
            "clean_note": self.clean_note,
            "corruptions_acc": self.corruptions_acc,
            "corruptions_mean_rule": "mean of the 15 × 5 accuracies (each on the same images)",
            "per_corruption": self.per_corruption,
            "corruptions": self.accuracy,
            "corruption_files": dict(self.files),
            "non_finite_images": self.non_finite,
            "timings_s": dict(self.timings_s),
            "sanity": [c.to_json() for c in self.sanity],
            "unreliable": self.unreliable,
            "device": self.device,
        }

    def csv_text(self) -> str:
        """index, label, clean (empty when not evaluated), one 1/0 column per corruption@severity, and
        corruptions_acc: the share of the image's 75 versions classified correctly."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        cells = [(k, j) for k in range(len(CORRUPTIONS)) for j in range(len(SEVERITIES))]
        writer.writerow(["index", "label", "clean", *(cell_name(CORRUPTIONS[k], SEVERITIES[j]) for k, j in cells),
                         "corruptions_acc"])
        for i in range(self.n_examples):
            clean = "" if self.clean is None else str(int(self.clean[i]))
            row = self.flags[i]
            writer.writerow([i, int(self.labels[i]), clean, *(int(row[k, j]) for k, j in cells),
                             f"{row.mean():.6g}"])
        return buf.getvalue()


def _pct(mask: np.ndarray) -> float:
    return float(100.0 * np.asarray(mask, dtype=bool).mean()) if mask.size else 0.0


def corruption_suite(model: nn.Module, files: CorruptionFiles, n_examples: int, *,
                     clean_x: torch.Tensor | None = None, clean_note: str = "", batch_size: int = 256,
                     device: str | torch.device = "cpu", reporter: Reporter | None = None,
                     resume_dir: str | Path | None = None) -> CorruptionResult:
    """Classify the first `n_examples` images of every corruption × severity (and `clean_x`, the same test
    images uncorrupted, when given). With `resume_dir`, each finished pass is saved there and a rerun with
    the same model, files and settings continues after the last one."""
    n = int(n_examples)
    dev = torch.device(device)
    y = torch.from_numpy(files.labels[:n].copy())
    digests = files.digests(n)
    fp = fingerprint(model, torch.empty(0), y, suite="corruptions", files=digests, batch_size=int(batch_size),
                     clean=clean_x is not None and _tensor_digest(clean_x))
    state = _ResumeState(Path(resume_dir) / "state.json" if resume_dir is not None else None, fp)
    rep = as_reporter(reporter)
    cells = [(c, s) for c in CORRUPTIONS for s in SEVERITIES]
    flags = np.zeros((n, len(CORRUPTIONS), len(SEVERITIES)), dtype=bool)
    predicted: list[np.ndarray] = []
    timings: dict[str, float] = {}
    non_finite, n_classes = 0, 0
    with eval_mode(model), rep:
        clean = None
        if clean_x is not None:
            run = clean_pass(model, clean_x, y, batch_size, dev)
            check_finite_logits(run.n_bad, n)
            clean, clean_predicted, n_classes = run.correct, run.predicted, run.n_classes
        done = sum(bool(state.attack(cell_name(c, s))["done"]) for c, s in cells)
        rep.start(TASK, "corruptions", total=len(cells), completed=done, status=f"{len(cells)} passes of {n} images")
        for k, c in enumerate(CORRUPTIONS):
            for j, s in enumerate(SEVERITIES):
                saved = state.attack(cell_name(c, s))
                if not saved["done"]:
                    t0 = time.perf_counter()
                    run = clean_pass(model, files.images(c, s, n), y, batch_size, dev)
                    saved.update(done=True, robust=run.correct.astype(int).tolist(), bad=run.n_bad,
                                 predicted=run.predicted.tolist(), classes=run.n_classes,
                                 time_s=time.perf_counter() - t0)
                    state.save()
                    rep.advance(TASK, 1, cell_name(c, s))
                flags[:, k, j] = np.asarray(saved["robust"], dtype=bool)
                predicted.append(np.asarray(saved["predicted"], dtype=np.int64))
                non_finite += int(saved["bad"])
                n_classes = n_classes or int(saved["classes"])
                timings[c] = timings.get(c, 0.0) + float(saved["time_s"])
        rep.finish(TASK)
    result = CorruptionResult(files.dataset, y.numpy().astype(np.int64), flags, clean, clean_note, int(batch_size),
                              str(dev), {"folder": str(files.folder), "images_per_severity": files.per_severity,
                                         "sha256": digests}, timings, non_finite=non_finite)
    result.sanity = _sanity(result, clean_predicted if clean is not None else np.concatenate(predicted), n_classes)
    return result


def _tensor_digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _sanity(result: CorruptionResult, predicted: np.ndarray, n_classes: int) -> list[SanityCheck]:
    """The degenerate-model checks (a collapsed model, accuracy not above chance): on the clean images when
    they were evaluated, else on the 75·N corrupted ones pooled. The ε-ball checks do not apply."""
    if result.clean is not None:
        return degenerate_model_checks(SimpleNamespace(labels=result.labels, clean=result.clean), predicted,
                                       n_classes)
    # `predicted` holds the passes in (corruption, severity) order, each over the N images.
    flags = result.flags.transpose(1, 2, 0).reshape(-1)
    pooled = SimpleNamespace(labels=np.tile(result.labels, len(CORRUPTIONS) * len(SEVERITIES)), clean=flags)
    return [SanityCheck(c.name, c.ok, c.detail.replace("clean", "corrupted") + " (no clean test set: the "
                        f"{len(flags)} corrupted images pooled)") for c in degenerate_model_checks(pooled, predicted,
                                                                                                  n_classes)]
