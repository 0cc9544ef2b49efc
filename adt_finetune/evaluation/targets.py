"""What `adt-ft eval` evaluates and on which images: the model (a --model, a run,
or the workspace's current model) with what its leaderboard entry says about it,
the evaluated test images, and the training images some attacks learn from.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import as_tensors, canonical_name, dataset_info, is_image_folder, load_dataset
from ..errors import UserError
from ..imagenet_folder import SUBSET_SIZE, Preprocessing, preprocessing as named_preprocessing
from ..run_folder import load_run
from ..workspace import Workspace
from ..zoo import eval_preprocessing, is_checkpoint, model_from_ref, resolve_and_load, resolve_name
from .suites import GENERATOR_ATTACKS

DEFAULT_N_EXAMPLES = 1000
#: training images handed to the attacks that learn before they attack (a generator retrained against the model)
TRAIN_IMAGES_FOR_ATTACKS = 2000


@dataclass
class Target:
    """A model to evaluate, with what the leaderboard entry says about it."""

    label: str
    model: nn.Module | None               # None: described by merged shard files, not loaded
    dataset: str
    threat_model: str
    info: dict[str, Any]                  # RobustBench's descriptive fields
    context: dict[str, Any]               # the entry's "adt_ft" facts: base_model, method, run_id, ...
    default_entry: str
    generator_method: str | None = None   # the run's amortised generator (exp-am / imp-am), an attack for `full`
    generator_path: Path | None = None
    base: "Target | None" = None          # the run's base model, for --baseline
    preprocessing: Preprocessing | None = None  # ImageNet: the model's test-time preprocessing (None: others)


def _arch_label(arch: str) -> str:
    return arch.rpartition(":")[2] if ":" in arch else arch


def _zoo_info(entry) -> dict[str, Any]:
    return {"name": entry.title, "link": entry.link, "authors": entry.authors, "venue": entry.venue,
            "architecture": entry.architecture, "additional_data": bool(entry.additional_data),
            "number_forward_passes": int(entry.number_forward_passes or 1)}


def _ref_info(ref) -> dict[str, Any]:
    """RobustBench facts for a ModelRef: the zoo entry's when it is a zoo model."""
    if ref.source == "zoo" and ":" not in ref.arch:
        try:
            return _zoo_info(resolve_name(ref.arch, ref.dataset, ref.threat_model))
        except UserError:
            pass
    return {"name": ref.name, "architecture": _arch_label(ref.arch)}


def resolve_target(*, model: str | None = None, arch: str | None = None, arch_kwargs: dict[str, Any] | None = None,
                   run: str | None = None, dataset: str | None = None, threat_model: str = "Linf",
                   workspace: str | Path = ".", device: str | torch.device = "cpu",
                   baseline: bool = False, corruptions: bool = False) -> Target:
    """The model `adt-ft eval` evaluates: --model (zoo name or checkpoint file with
    --arch), else --run, else the workspace's latest run, else its current model.
    `corruptions`: for the corruptions suite, which takes a model of any leaderboard
    (and `threat_model` "corruptions" looks a zoo name up in the corruptions leaderboard).

    Never changes the workspace's current model or latest run.
    """

    ws = Workspace(workspace)
    if model is not None and run is not None:
        raise UserError("give `model` or `run`, not both")
    if (arch is not None or arch_kwargs) and model is None:
        raise UserError("`arch` and `arch_kwargs` describe a checkpoint file: use them together with `model` PATH")
    if baseline and model is not None:
        raise UserError("`baseline` compares a run with the model it started from: use it with `run` (or with no "
                        "`model` to take the latest run)")
    tm = {"linf": "Linf", "l2": "L2", "corruptions": "corruptions"}.get(threat_model.strip().lower(), threat_model)
    if tm not in ("Linf", "L2") and not (corruptions and tm == "corruptions"):
        raise UserError(f"threat model {threat_model!r}: adt-ft's attacks are L∞ and L2 attacks; choose Linf or L2"
                        + ("" if tm != "corruptions" else " (a corruptions model evaluates with `suite` corruptions)"))
    ball = None if corruptions else _require_norm_ball
    wanted = dataset_info(dataset).name if dataset is not None else None
    if model is not None:
        return _model_target(model, arch, arch_kwargs, wanted, tm, ws, device)
    if run is not None or ws.latest_run() is not None:
        return _run_target(run, wanted, dataset, ws, device, baseline, ball)
    if baseline:
        raise UserError(f"`baseline` needs a run, and workspace {ws.root} has none: train one with 'adt-ft train'")
    ref = ws.current_model()
    if ref is None:
        raise UserError(f"nothing to evaluate in workspace {ws.root}: no run and no current model; pass `model` "
                        "NAME|PATH or `run` RUN, or run 'adt-ft pull NAME' first")
    if wanted is not None and wanted != ref.dataset:
        raise UserError(f"the current model {ref.name} is a {ref.dataset} model; `dataset` {dataset} is {wanted}")
    if ball is not None:
        ball(ref.threat_model, f"the current model {ref.name}")
    net = model_from_ref(ref, device, source=f"current_model in {ws.state_path}")
    context = {"base_model": ref.name, "model_source": ref.source}
    return Target(ref.name, net, ref.dataset, ref.threat_model, _ref_info(ref), context, ref.name,
                  preprocessing=_preprocessing(ref))


def _preprocessing(ref) -> Preprocessing | None:
    """An ImageNet model's test-time preprocessing: its zoo architecture's (RobustBench's), else the default."""
    return eval_preprocessing(ref.arch, ref.dataset, ref.threat_model)


def _require_norm_ball(threat_model: str, what: str) -> None:
    """Refuse attacks on a model from RobustBench's corruptions leaderboard: it has no threat model
    (no norm, no ε) to attack it in, and its entry would be filed under corruptions with numbers from
    norm-ball attacks (Linf and L2 models evaluate in their own norm)."""
    if threat_model not in ("Linf", "L2"):
        raise UserError(f"{what} is a RobustBench {threat_model} model: it has no norm ball for adt-ft's L∞ and L2 "
                        "attacks, so it is not attacked; evaluate it with `suite` corruptions")


def _model_target(model: str, arch, arch_kwargs, wanted: str | None, tm: str, ws, device) -> Target:
    """--model NAME|FILE through the resolver `train` uses too (zoo.resolve_model)."""
    ref, net = resolve_and_load(model, arch=arch, arch_kwargs=arch_kwargs, dataset=wanted, threat_model=tm,
                                workspace=ws)
    net = net.to(device).eval()
    if is_checkpoint(model):
        path = Path(ref.path)
        if ":" in ref.arch:
            info = {"name": path.stem, "architecture": _arch_label(ref.arch)}
        else:
            info = dict(_zoo_info(resolve_name(ref.arch, ref.dataset, ref.threat_model)), name=path.stem, link="",
                        authors="", venue="")
        context = {"base_model": path.stem, "model_source": f"file {path} ({arch})"}
        return Target(path.stem, net, ref.dataset, ref.threat_model, info, context, path.stem,
                      preprocessing=_preprocessing(ref))
    entry = resolve_name(ref.arch, ref.dataset, ref.threat_model)
    context = {"base_model": entry.name, "model_source": "zoo"}
    return Target(entry.name, net, entry.dataset, entry.threat_model, _zoo_info(entry), context, entry.name,
                  preprocessing=_preprocessing(ref))


def _run_target(run: str | None, wanted: str | None, dataset: str | None, ws, device, baseline: bool,
                ball) -> Target:
    """A finished run: its fine-tuned model, its base model (for --baseline) and its generator."""
    info_run = load_run(run, ws.root)
    if info_run.model is None:  # load_run refuses unfinished runs; this guards a hand-edited run.json
        raise UserError(f"run {info_run.id} has no final model: finish it with 'adt-ft train `resume`'")
    ref, base_ref, meta = info_run.model, info_run.base_model, info_run.meta
    if wanted is not None and wanted != ref.dataset:
        raise UserError(f"run {info_run.id} fine-tuned a {ref.dataset} model; `dataset` {dataset} is {wanted}")
    if ball is not None:
        ball(ref.threat_model, f"run {info_run.id}'s base model {base_ref.name}")
    recorded_in = str(info_run.path / "run.json")
    net = model_from_ref(ref, device, source=recorded_in)
    method = meta.get("method")
    base_info = _ref_info(base_ref)
    info = {k: v for k, v in base_info.items() if k in ("architecture", "additional_data", "number_forward_passes")}
    info["name"] = (f"{str(method).upper()} fine-tune of {base_ref.name} "
                    f"(loss {meta.get('loss')}, scope {meta.get('scope')}, {meta.get('epochs')} epochs)")
    context = {"base_model": base_ref.name, "method": method, "loss": meta.get("loss"), "scope": meta.get("scope"),
               "epochs": meta.get("epochs"), "recipe": meta.get("recipe"), "run_id": info_run.id,
               "train_seed": meta.get("seed"),
               "model_source": "run"}
    base = None
    if baseline:
        base_net = model_from_ref(base_ref, device, source=recorded_in)
        base = Target(base_ref.name, base_net, base_ref.dataset, base_ref.threat_model, base_info,
                      {"base_model": base_ref.name}, base_ref.name, preprocessing=_preprocessing(base_ref))
    gen_method = method if method in GENERATOR_ATTACKS and info_run.generator_path is not None else None
    return Target(f"{info_run.id}", net, ref.dataset, ref.threat_model, info, context, info_run.id,
                  generator_method=gen_method, generator_path=info_run.generator_path, base=base,
                  preprocessing=_preprocessing(ref))


def load_examples(model_dataset: str, dataset: str | None = None, n_examples: int | None = None, *,
                  data_dir: str | Path | None = None, workspace: str | Path = ".",
                  preprocessing: Preprocessing | str | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first N test examples of the model's dataset, or of an image folder whose
    class names must be that dataset's. Default N: 1000 or the whole set if smaller.
    ImageNet: the first N of RobustBench's 5,000-image list, preprocessed with `preprocessing`
    (the model's; default Res256Crop224), held as uint8 (`data.as_tensors` `compact`)."""
    if model_dataset == "imagenet" and not (dataset is not None and is_image_folder(dataset)):
        return _imagenet_examples(dataset, n_examples, data_dir, workspace, preprocessing)
    if dataset is not None and is_image_folder(dataset):
        full = load_dataset(dataset, "test", expect=model_dataset)
        label = f"image folder {Path(dataset).resolve()}"
    else:
        if dataset is not None and canonical_name(dataset) != model_dataset:
            raise UserError(f"the model is a {model_dataset} model; `dataset` {dataset} does not match")
        full = load_dataset(model_dataset, "test", data_dir=data_dir, workspace=workspace, augment=False)
        label = f"{model_dataset} test set"
    if len(full) == 0:
        raise UserError(f"the {label} holds no images: put the test images in its class folders")
    if n_examples is None:
        n_examples = min(DEFAULT_N_EXAMPLES, len(full))
    if n_examples <= 0:
        raise UserError(f"`n_examples` must be positive, got {n_examples}")
    if n_examples > len(full):
        raise UserError(f"`n_examples` {n_examples} is larger than the {label} ({len(full)} images)")
    x, y = as_tensors(full, n_examples)
    return x, y, f"first {n_examples} of the {label}"


def _imagenet_examples(dataset: str | None, n_examples: int | None, data_dir, workspace,
                       preprocessing: Preprocessing | str | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    if dataset is not None and canonical_name(dataset) != "imagenet":
        raise UserError(f"the model is an imagenet model; `dataset` {dataset} does not match")
    n = min(DEFAULT_N_EXAMPLES, SUBSET_SIZE) if n_examples is None else n_examples
    prep = named_preprocessing(preprocessing)
    # n is checked (1..5000) and the first n listed files are looked for before any image is decoded.
    full = load_dataset("imagenet", "test", data_dir=data_dir, workspace=workspace, n_examples=n,
                        preprocessing=prep)
    x, y = as_tensors(full, n, compact=True)
    return x, y, f"first {n} of RobustBench's {SUBSET_SIZE}-image ImageNet validation list, {prep.name}"


def training_sample_indices(n_train: int, n: int, seed: int) -> list[int]:
    """Which training images the learning attacks get: `n` of `n_train`, drawn without
    replacement by a torch generator seeded with `seed`, in increasing order."""
    gen = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(n_train, generator=gen)[:min(n, n_train)].tolist())


def load_attack_training_data(model_dataset: str, *, seed: int, n: int = TRAIN_IMAGES_FOR_ATTACKS,
                              data_dir: str | Path | None = None,
                              workspace: str | Path = ".") -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """A seeded random sample of the model's dataset's TRAIN split (never the evaluated
    test images), and a record of which images it holds for the leaderboard entry."""
    from torch.utils.data import Subset

    full = load_dataset(model_dataset, "train", data_dir=data_dir, workspace=workspace, augment=False)
    indices = training_sample_indices(len(full), n, seed)
    x, y = as_tensors(Subset(full, indices))
    record = {"dataset": model_dataset, "split": "train", "n_images": len(indices), "of": len(full), "seed": int(seed),
              "selection": "sorted(torch.randperm(of, generator=torch.Generator().manual_seed(seed))[:n_images])",
              "indices_sha256": hashlib.sha256(",".join(map(str, indices)).encode()).hexdigest()}
    return x, y, record
