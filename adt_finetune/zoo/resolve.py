"""The one model resolver shared by `train` and `eval`: what a `--model` value names.

    --model NAME         a RobustBench zoo entry (alias, prefix); fetched into models/ when missing
    --model FILE.pt      a local state dict; needs --arch (zoo name or package.module:Class) and,
                         for a package.module:Class architecture, --dataset
    (none)               the caller decides (the workspace's current model, or its latest run)

The result is a `ModelRef`, the record from which `model_from_ref` rebuilds the
model. Resolving never changes the workspace: `train` makes the model current
afterwards (as `pull` does), `eval` never does.
"""
from __future__ import annotations

import os
from typing import Any

from ..errors import UserError
from ..utils import looks_like_checkpoint
from ..workspace import ModelRef, Workspace
from .catalog import resolve_name


def is_checkpoint(model: str | os.PathLike) -> bool:
    """Whether a --model value is a checkpoint file rather than a zoo name."""
    return looks_like_checkpoint(model)


def resolve_model(model: str | os.PathLike, *, arch: str | None = None, arch_kwargs: dict[str, Any] | None = None,
                  dataset: str | None = None, threat_model: str = "Linf",
                  workspace: Workspace | str | os.PathLike = ".", download: bool = True) -> ModelRef:
    """A ModelRef for a zoo name or a checkpoint file, checked to load (see the module docstring).

    A zoo checkpoint missing from the workspace is downloaded unless `download` is False
    or $ADT_FT_OFFLINE is set; a checkpoint file must load into `arch`.
    """
    return resolve_and_load(model, arch=arch, arch_kwargs=arch_kwargs, dataset=dataset, threat_model=threat_model,
                            workspace=workspace, download=download)[0]


def resolve_and_load(model: str | os.PathLike, *, arch: str | None = None, arch_kwargs: dict[str, Any] | None = None,
                     dataset: str | None = None, threat_model: str = "Linf",
                     workspace: Workspace | str | os.PathLike = ".", download: bool = True) -> tuple[ModelRef, Any]:
    """`resolve_model`, also returning the model it loaded to check the ref (eval mode, CPU), so a
    caller that needs the model does not load a large checkpoint twice."""
    from .loader import _as_workspace, _file_model, _obtain, _zoo_ref

    ws = _as_workspace(workspace)
    if is_checkpoint(model):
        path = os.fspath(model)
        if not os.path.isfile(os.path.expanduser(path)):
            raise UserError(f"checkpoint {path} does not exist: give an existing file or a zoo name")
        if not arch:
            raise UserError(f"{path} is a checkpoint file: also give `arch` (a zoo name such as "
                            "Zhang2019Theoretically, or package.module:Class)")
        if dataset is None and ":" in arch:
            raise UserError(f"`arch` {arch} does not say which dataset the model is for: give `dataset` "
                            "(a dataset name or an image folder)")
        return _file_model(path, arch, dataset=dataset or "cifar10", threat_model=threat_model, name=None,
                           arch_kwargs=arch_kwargs)
    if arch is not None or arch_kwargs:
        raise UserError(f"`arch` goes with a checkpoint file, and {str(model)!r} is not a file: give the file's "
                        "path, or drop `arch` to use the zoo model of that name")
    entry = resolve_name(str(model), dataset or "cifar10", threat_model)
    net = _obtain(entry, ws, download, progress=True).eval()
    return _zoo_ref(entry, ws), net
