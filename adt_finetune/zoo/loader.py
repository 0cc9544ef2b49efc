"""Building architectures, reading checkpoints safely, and pulling zoo models into a workspace.

Checkpoints are only ever read with `torch.load(weights_only=True)`: a file that
needs anything beyond tensors and plain containers is refused rather than run.
Downloads go through RobustBench's own loader (the real code, with its own
checkpoint fix-ups); a checkpoint already in the workspace is loaded here without
RobustBench's download code being reached.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..data import DATASETS, canonical_name, dataset_info, is_image_folder
from ..errors import UserError
from ..nets import unusable_weights
from ..utils import atomic_torch_save
from ..workspace import ModelRef, Workspace
from . import robustbench_compat as rb
from .architectures import _build, _build_zoo, build_architecture, check_arch, eval_preprocessing
from .catalog import ZooEntry, resolve_name
from .checkpoints import _fit_prefix, _looks_like_html, load_weights, read_state_dict
from .trust import check_trusted



def _as_workspace(workspace: Workspace | str | os.PathLike) -> Workspace:
    return workspace if isinstance(workspace, Workspace) else Workspace(workspace)


def _normalize_threat_model(threat_model: str) -> str:
    known = {"linf": "Linf", "l2": "L2", "corruptions": "corruptions"}
    return known.get(threat_model.strip().lower(), threat_model)


def _dataset_name(dataset: str) -> str:
    """Canonical dataset name for any dataset adt-ft knows, zoo or not (fashion-mnist has no zoo)."""
    if is_image_folder(dataset):  # an image folder stands for the known dataset its classes match
        return dataset_info(dataset).name
    return canonical_name(dataset)


# ---------------------------------------------------------------- zoo checkpoints in a workspace

def _checkpoint_files(entry: ZooEntry, path: Path) -> list[Path]:
    """The file(s) RobustBench keeps for an entry: `<Name>.pt`, or `<Name>.pt_m<i>.pt` for ensembles."""
    if entry.checkpoint == "ensemble":
        return [Path(f"{path}_m{i}.pt") for i in range(len(entry.gdrive_id or ()))]
    return [path]


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Force weights_only=True on every torch.load inside (RobustBench's own calls included),
    whatever torch's default or the caller's environment says."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",)}
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous
        for k, v in saved.items():
            if v is not None:
                os.environ[k] = v


def _load_zoo_file(entry: ZooEntry, path: Path) -> nn.Module:
    """The entry's model from checkpoint file(s) already on disk at `path`
    (<models>/<dataset>/<threat_model>/<Name>.pt); never downloads."""
    files = _checkpoint_files(entry, path)
    if entry.checkpoint == "ensemble":
        for f in files:
            if _looks_like_html(f):
                read_state_dict(f)  # raises the HTML message
        # Several sub-models with per-ensemble fix-ups: RobustBench's loader does them,
        # and with every file present it reads them instead of downloading.
        with _weights_only_loads():
            try:
                return rb.robustbench_utils().load_model(entry.name, model_dir=path.parents[2],
                                                         dataset=entry.dataset, threat_model=entry.threat_model)
            except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
                first = (str(e).splitlines() or [type(e).__name__])[0][:160]
                raise UserError(f"the ensemble checkpoint files {files[0]}... do not load ({first}): delete them "
                                f"and pull {entry.name} again") from None
    state_dict = read_state_dict(path)
    model = _build_zoo(entry)
    try:
        load_weights(model, state_dict, str(path))
    except UserError as mismatch:
        # RobustBench tolerates a few known checkpoints that lack normalisation
        # buffers or carry extra keys; accept exactly what it accepts, no more.
        try:
            rb.robustbench_utils()._safe_load_state_dict(model, entry.name, _fit_prefix(model, state_dict),
                                                         rb.enums(entry.dataset, entry.threat_model)[0])
        except RuntimeError:
            raise mismatch from None
    return model


def _missing_checkpoint(entry: ZooEntry, path: Path, why: str) -> UserError:
    if entry.checkpoint == "ensemble":
        files = _checkpoint_files(entry, path)
        what = f"its {len(files)} checkpoint files at {files[0]} ... {files[-1].name}"
    elif entry.checkpoint == "gdrive":
        what = f"the checkpoint (from https://drive.google.com/uc?id={entry.gdrive_id}) at {path}"
    else:
        what = f"a state dict of its architecture at {path}"
    return UserError(f"{entry.name} is not in the workspace and {why}: place {what}, then run the command again")


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed download made (deepest first), unless something else is in them now."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _download(entry: ZooEntry, ws: Workspace, progress: bool) -> nn.Module:
    """Fetch through RobustBench's loader; on any failure remove what it left and raise a UserError."""
    path = ws.model_path(entry.dataset, entry.threat_model, entry.name)
    ws.inside(path, f"the checkpoint of {entry.name}")
    made = [p for p in [path.parent, *path.parent.parents] if not p.exists()]  # removed again on failure
    path.parent.mkdir(parents=True, exist_ok=True)
    before = set(path.parent.iterdir())
    rb_utils = rb.robustbench_utils()
    # RobustBench prints to stdout and gdown draws a byte progress bar on stderr;
    # with progress off both go nowhere.
    quiet = contextlib.ExitStack()
    if progress:
        # stdout, like RobustBench's own message: stderr is kept for the error line and gdown's bar.
        print(f"downloading {entry.name} through RobustBench into {path}", flush=True)
    else:
        quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
        quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
    try:
        with quiet, _weights_only_loads():
            model = rb_utils.load_model(entry.name, model_dir=ws.models_dir, dataset=entry.dataset,
                                        threat_model=entry.threat_model)
    except BaseException as e:
        left = sorted(p for p in set(path.parent.iterdir()) - before if p.name.startswith(entry.name))
        html = [p for p in left if p.is_file() and _looks_like_html(p)]
        diagnosis: UserError | None = None
        # requests/urllib3/gdown failures are OSErrors: then whatever is left is a partial
        # download. Anything else means a file arrived and RobustBench could not load it.
        if not html and not isinstance(e, OSError) and any(p.is_file() for p in left):
            # Say why it does not load (code pickle, corrupt).
            try:
                for p in left:
                    read_state_dict(p)
            except UserError as bad:
                diagnosis = bad
        for p in left:
            p.unlink(missing_ok=True)
        _remove_empty(made)
        if not isinstance(e, Exception):  # Ctrl-C: files cleaned up, let it through
            raise
        if html:
            raise _missing_checkpoint(entry, path, "the download returned an HTML page instead of the checkpoint "
                                                   "(Google Drive's quota or confirmation page; removed it)") from None
        if diagnosis is not None:
            raise UserError(f"downloaded {entry.name} but it does not load (removed it): {diagnosis}") from None
        first = (str(e).splitlines() or [""])[0][:100] or type(e).__name__
        raise _missing_checkpoint(entry, path, f"the download failed ({type(e).__name__}: {first})") from None
    if entry.checkpoint in ("timm", "torchvision"):
        # timm/torchvision keep these in their own caches; a copy in the workspace
        # makes the next load local like every other zoo model.
        atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return model


def _obtain(entry: ZooEntry, ws: Workspace, download: bool, progress: bool) -> nn.Module:
    if not entry.loadable:
        _build_zoo(entry)  # raises the "leaderboard-only" UserError
    path = ws.model_path(entry.dataset, entry.threat_model, entry.name)
    files = _checkpoint_files(entry, path)
    if all(f.is_file() for f in files):
        return _load_zoo_file(entry, path)
    if not download:
        raise _missing_checkpoint(entry, path, "downloading is switched off")
    if os.environ.get("ADT_FT_OFFLINE"):
        raise _missing_checkpoint(entry, path, "ADT_FT_OFFLINE is set")
    return _download(entry, ws, progress)


def check_usable(model: nn.Module, source: str) -> None:
    """Refuse (UserError) weights no model can predict with: NaN/inf, or a negative BatchNorm variance."""
    bad = unusable_weights(model)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise UserError(f"the weights in {source} are unusable ({bad[0]}{more}): every prediction of this model "
                        "would be NaN or meaningless, so it was not pulled; use an undamaged checkpoint")


def _zoo_ref(entry: ZooEntry, ws: Workspace) -> ModelRef:
    return ModelRef(name=entry.name, arch=entry.name, dataset=entry.dataset, threat_model=entry.threat_model,
                    path=str(ws.model_path(entry.dataset, entry.threat_model, entry.name)), source="zoo")


def pull_model(name: str, *, dataset: str = "cifar10", threat_model: str = "Linf",
               workspace: Workspace | str | os.PathLike = ".", download: bool = True,
               progress: bool = True) -> tuple[ModelRef, nn.Module, ZooEntry]:
    """`pull`, also returning the loaded model and the resolved zoo entry (for callers that print them)."""
    ws = _as_workspace(workspace)
    entry = resolve_name(name, dataset, threat_model)
    model = _obtain(entry, ws, download, progress).eval()
    ref = _zoo_ref(entry, ws)
    check_usable(model, ref.path)
    ws.set_current_model(ref)
    return ref, model, entry


def pull(name: str, *, dataset: str = "cifar10", threat_model: str = "Linf",
         workspace: Workspace | str | os.PathLike = ".", download: bool = True, progress: bool = True) -> ModelRef:
    """Resolve a zoo name, make sure its checkpoint is in `workspace/models/` and loads
    into its architecture, and make it the workspace's current model.

    A checkpoint already in the workspace is used without touching the network.
    Otherwise RobustBench's loader downloads it (unless `download=False` or
    $ADT_FT_OFFLINE is set); a failure removes whatever it left and raises a UserError
    naming the path where the file can be placed by hand.
    """
    return pull_model(name, dataset=dataset, threat_model=threat_model, workspace=workspace, download=download,
                      progress=progress)[0]


def check_file_model(path: str | os.PathLike, arch: str, *, dataset: str, threat_model: str = "Linf",
                     name: str | None = None, arch_kwargs: dict | None = None) -> ModelRef:
    """The ModelRef of a local state dict, after checking that it loads into `arch`."""
    return _file_model(path, arch, dataset=dataset, threat_model=threat_model, name=name, arch_kwargs=arch_kwargs)[0]


def _file_model(path: str | os.PathLike, arch: str, *, dataset: str, threat_model: str, name: str | None,
                arch_kwargs: dict | None) -> tuple[ModelRef, nn.Module]:
    file = Path(path).expanduser().resolve()
    dataset = _dataset_name(dataset)
    threat_model = _normalize_threat_model(threat_model)
    arch = check_arch(arch, dataset, threat_model)
    state_dict = read_state_dict(file)
    model = build_architecture(arch, dataset, threat_model, arch_kwargs)
    load_weights(model, state_dict, str(file))
    check_fits_dataset(model.eval(), dataset, str(file))
    ref = ModelRef(name=name or file.stem, arch=arch, dataset=dataset, threat_model=threat_model, path=str(file),
                   source="file", arch_kwargs=dict(arch_kwargs or {}))
    return ref, model.eval()


def check_fits_dataset(model: nn.Module, dataset: str, source: str) -> None:
    """Refuse a model that cannot take `dataset`'s images or does not give one score per class (a
    1-channel model recorded as a CIFAR-10 one fails later, mid-evaluation, or never loads at all).
    One forward pass of two blank images (ImageNet's at 224×224, the size of its default preprocessing)."""
    info = DATASETS.get(dataset)
    if info is None:
        return
    blank = torch.zeros(2, info.channels, info.size, info.size)
    shape = f"{info.channels}×{info.size}×{info.size}"
    try:
        with torch.no_grad():
            out = model(blank)
    except (RuntimeError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"the model in {source} does not take {dataset}'s {shape} images ({first}): give the "
                        "dataset it was trained for (`dataset`)") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, info.num_classes):
        got = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"the model in {source} gives outputs of shape {got} for {dataset}'s images, not one score "
                        f"for each of its {info.num_classes} classes: give the dataset it was trained for (`dataset`)")


def pull_file_model(path: str | os.PathLike, arch: str, *, dataset: str, threat_model: str = "Linf",
                    workspace: Workspace | str | os.PathLike = ".", name: str | None = None,
                    arch_kwargs: dict | None = None) -> tuple[ModelRef, nn.Module]:
    """`pull_from_file`, also returning the loaded model."""
    ws = _as_workspace(workspace)
    ref, model = _file_model(path, arch, dataset=dataset, threat_model=threat_model, name=name,
                             arch_kwargs=arch_kwargs)
    check_usable(model, ref.path)
    ws.set_current_model(ref)
    return ref, model


def pull_from_file(path: str | os.PathLike, arch: str, *, dataset: str, threat_model: str = "Linf",
                   workspace: Workspace | str | os.PathLike = ".", name: str | None = None,
                   arch_kwargs: dict | None = None) -> ModelRef:
    """Check that a local state dict loads into `arch` (zoo name or package.module:Class),
    record it in the workspace (the file stays where it is) and make it current."""
    return pull_file_model(path, arch, dataset=dataset, threat_model=threat_model, workspace=workspace, name=name,
                           arch_kwargs=arch_kwargs)[0]


def model_from_ref(ref: ModelRef, device: str | torch.device = "cpu", *, source: str | None = None) -> nn.Module:
    """Rebuild the model a ModelRef describes, in eval mode on `device`. Never downloads.

    A ModelRef usually comes from a file (state.json, run.json: `source` names it), so its
    architecture is only imported when `trust.check_trusted` allows it.
    """
    source = source or f"the record of model {ref.name!r}"
    check_trusted(ref.arch, source)
    path = Path(ref.path)
    if ref.source == "zoo" and ":" not in ref.arch:
        entry = resolve_name(ref.arch, ref.dataset, ref.threat_model)
        files = _checkpoint_files(entry, path)
        if not all(f.is_file() for f in files):
            raise UserError(f"the checkpoint of {ref.name} is missing at {files[0]}: run 'adt-ft pull {ref.name}' again")
        model = _load_zoo_file(entry, path)
    else:
        if not path.is_file():
            raise UserError(f"the checkpoint of model {ref.name!r} is missing at {path}: pull or train it again")
        state_dict = read_state_dict(path)
        model = _build(ref.arch, ref.dataset, ref.threat_model, ref.arch_kwargs or None, source=source)
        load_weights(model, state_dict, str(path))
    return model.to(device).eval()


def load_model(name_or_path: str | os.PathLike, *, dataset: str = "cifar10", threat_model: str = "Linf",
               arch: str | None = None, workspace: Workspace | str | os.PathLike = ".",
               download: bool = True, arch_kwargs: dict | None = None) -> nn.Module:
    """A ready model (eval mode, CPU) for a notebook.

    `name_or_path` is a zoo name (checkpoint fetched into `workspace/models/` when
    missing, exactly as `pull` does) or a checkpoint file (then `arch` is required).
    Unlike `pull`, this never changes the workspace's current model, so loading a
    few models side by side leaves the CLI's state alone.
    """
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file() or str(name_or_path).endswith((".pt", ".pth", ".ckpt")):
        if arch is None:
            raise UserError(f"{name_or_path} is a checkpoint file: also give its architecture (arch=zoo name or "
                            "package.module:Class)")
        state_dict = read_state_dict(candidate)
        dataset = _dataset_name(dataset)
        model = build_architecture(arch, dataset, _normalize_threat_model(threat_model), arch_kwargs)
        return load_weights(model, state_dict, str(candidate)).eval()
    entry = resolve_name(str(name_or_path), dataset, threat_model)
    return _obtain(entry, _as_workspace(workspace), download, progress=True).eval()


def register_model(model: nn.Module, *, name: str, arch: str, arch_kwargs: dict | None = None, dataset: str,
                   threat_model: str = "Linf", workspace: Workspace | str | os.PathLike = ".",
                   source: str = "local", make_current: bool = True) -> ModelRef:
    """Save `model`'s weights into the workspace (models/<dataset>/<threat_model>/<name>.pt,
    atomically) and record how to rebuild it; by default it becomes the current model."""
    ws = _as_workspace(workspace)
    dataset = _dataset_name(dataset)
    threat_model = _normalize_threat_model(threat_model)
    arch = check_arch(arch, dataset, threat_model)
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise UserError(f"model name {name!r} must be a plain file name (no slashes, not starting with a dot)")
    path = ws.inside(ws.model_path(dataset, threat_model, name), f"model {name}")
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    ref = ModelRef(name=name, arch=arch, dataset=dataset, threat_model=threat_model, path=str(path), source=source,
                   arch_kwargs=dict(arch_kwargs or {}))
    if make_current:
        ws.set_current_model(ref)
    return ref


__all__ = ["build_architecture", "check_arch", "eval_preprocessing", "read_state_dict", "load_weights", "pull", "pull_model",
           "pull_from_file", "pull_file_model", "model_from_ref", "load_model", "register_model"]
