"""`adt-ft eval --suite corruptions` as a function: resolve the model, check the corruption files, classify
the 75 corrupted copies of the first n test images, write the entry under `<dataset>/corruptions/`.

Any model evaluates with it: a model from RobustBench's corruptions leaderboard, and a Linf or L2 model or a
fine-tuned run too (its entry records the model's own threat model). Everything that can be refused is
refused before the first pass: missing or malformed files, settings that only attacks use.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import as_tensors, canonical_name, dataset_info, is_image_folder, load_dataset
from ..distributed import env_world
from ..errors import UserError
from ..leaderboard import CORRUPTIONS, check_entry_name, write_corruption_entry
from ..progress import Reporter
from ..utils import resolve_device
from ..workspace import Workspace
from .corruption_files import FOLDERS, SEVERITIES, open_corruption_files
from .corruptions import CorruptionResult, corruption_suite
from .entry_claims import _resume_dir, claim_entry
from .eval_request import EvalRequest
from .sanity import check_finite_weights
from .shards import CHUNK_SIZE
from .targets import DEFAULT_N_EXAMPLES, Target, resolve_target

SUITE = "corruptions"


@dataclass
class CorruptionRecord:
    target: Target
    result: CorruptionResult
    json_path: Path
    csv_path: Path
    suite: str
    data_source: str


def _refuse_attack_settings(a: EvalRequest) -> None:
    """The settings that only mean something to attacks, refused rather than silently ignored."""
    given = {"eps": a.eps is not None, "mode": a.mode != "independent", "budgets": a.budgets is not None,
             "set": bool(a.attack_settings), "amp": a.amp, "baseline": a.baseline, "shard": a.shard is not None,
             "shard_dir": a.shard_dir is not None, "seed": a.seed != 0, "chunk_size": a.chunk_size != CHUNK_SIZE}
    wrong = [k for k, v in given.items() if v]
    if wrong:
        raise UserError(f"`{wrong[0]}` has no meaning for the corruptions suite (no attack runs, no ε): drop it")
    if env_world()[1] > 1:
        raise UserError("the corruptions suite runs in one process: run it without torchrun")
    if a.dataset is not None and (is_image_folder(a.dataset) or canonical_name(a.dataset) not in FOLDERS):
        raise UserError(f"the corruptions suite reads CIFAR-10-C, CIFAR-100-C or ImageNet-C from `data_dir`, not "
                        f"`dataset` {a.dataset}: drop `dataset`")


def _clean_images(target: Target, data_dir, n: int, files) -> tuple[torch.Tensor | None, str]:
    """The same n test images uncorrupted, when the clean test set is in `data_dir` (RobustBench reports the
    clean accuracy beside the corruption accuracy, ImageNet's with the model's own preprocessing); else
    None and why."""
    dataset = target.dataset
    imagenet = dataset == "imagenet"
    try:
        clean = load_dataset(dataset, "test", data_dir=data_dir, download=False, augment=False,
                             n_examples=n if imagenet else None, preprocessing=target.preprocessing if imagenet
                             else None)
    except UserError as e:
        return None, f"not evaluated: {e}"
    x, y = as_tensors(clean, n, compact=imagenet)
    if not torch.equal(y, torch.from_numpy(files.labels[:n].copy()).long()):
        raise UserError(f"{files.folder / 'labels.npy'} does not hold the labels of the {dataset} test set in "
                        f"{data_dir}: the corruption files are not of that test set")
    return x, f"the first {n} images of the {dataset} test set in {data_dir}" + (
        f" ({target.preprocessing.name})" if dataset == "imagenet" and target.preprocessing is not None else "")


def evaluate_corruptions(a: EvalRequest, *, reporter: Reporter | None = None) -> CorruptionRecord:
    """`evaluate_workspace` for `suite="corruptions"` (docs/evaluation.md, "Common corruptions")."""
    _refuse_attack_settings(a)
    ws = Workspace(a.workspace)
    if a.entry is not None:
        check_entry_name(a.entry)
    device = resolve_device(a.device)
    target = resolve_target(model=a.model, arch=a.arch, arch_kwargs=a.arch_kwargs, run=a.run, dataset=a.dataset,
                            threat_model=a.threat_model, workspace=ws.root, device=device, corruptions=True)
    check_finite_weights(target.model, f"model {target.label}")
    if a.batch_size <= 0:
        raise UserError(f"`batch_size` must be positive, got {a.batch_size}")
    files = open_corruption_files(target.dataset, a.data_dir, dataset_info(target.dataset).num_classes)
    n = a.n_examples if a.n_examples is not None else min(DEFAULT_N_EXAMPLES, files.per_severity)
    if not 0 < n <= files.per_severity:
        raise UserError(f"`n_examples` must be between 1 and {files.per_severity} (the images per severity in "
                        f"{files.folder}), got {n}")
    files.check(n)
    clean_x, clean_note = _clean_images(target, a.data_dir, n, files)
    entry = a.entry or "_".join([f"{target.default_entry}_{SUITE}",
                                 *([f"n{n}"] if a.n_examples is not None and n != DEFAULT_N_EXAMPLES else [])])
    data_source = f"first {n} images of each corruption and severity in {files.folder}"
    context = dict(target.context, suite=SUITE, data=data_source, model_threat_model=target.threat_model)
    lock = claim_entry(ws, target.dataset, CORRUPTIONS, entry, a.overwrite)
    try:
        partial = ws.inside(_resume_dir(ws.root, target.dataset, CORRUPTIONS, entry), "partial results")
        if not a.resume and partial.exists():
            shutil.rmtree(partial)
        result = corruption_suite(target.model, files, n, clean_x=clean_x, clean_note=clean_note,
                                  batch_size=a.batch_size, device=device, reporter=reporter, resume_dir=partial)
        json_path = write_corruption_entry(result, root=ws.leaderboard_dir, dataset=target.dataset, entry=entry,
                                           info=dict(target.info), context=context)
        if partial.exists():
            shutil.rmtree(partial)
    finally:
        lock.release()
    return CorruptionRecord(target, result, json_path, json_path.with_name(f"{entry}.per-example.csv"), SUITE,
                            data_source)


__all__ = ["CorruptionRecord", "evaluate_corruptions", "SEVERITIES"]
