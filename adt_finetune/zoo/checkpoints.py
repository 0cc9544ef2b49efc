"""Reading checkpoints safely and fitting their keys to a model.

Checkpoints are only ever read with `torch.load(weights_only=True)`: a file that
needs anything beyond tensors and plain containers is refused rather than run.
"""
from __future__ import annotations

import io
import os
import pickletools
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError

# Wrappers training scripts put around a state dict; RobustBench unwraps the same
# ones ('last' is how Andriushchenko2020Understanding and Kireev2021 store theirs).
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "last")
# Prefixes left by DataParallel ('module.') and by normalisation wrappers ('model.').
_PREFIXES = ("module.", "model.")
_HTML_MARKERS = (b"<!doctype html", b"<html", b"<head", b"<body")


def _looks_like_html(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(2048).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    # Real checkpoints start with a zip or pickle header, never with '<'.
    return head.startswith(b"<") and any(marker in head for marker in _HTML_MARKERS)


# Globals a plain state dict's pickle may name; anything else is an object or a callable.
_TENSOR_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode")


def _foreign_globals(path: Path) -> list[str]:
    """Globals (callables, classes) that the checkpoint's pickle would import, other than torch's own.

    Only used to explain a refusal: torch.load(weights_only=True) already refused to run them.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                member = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                data = zf.read(member) if member else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile):
        return []
    found: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # not a complete pickle (garbage, truncated): nothing to explain
        return []
    return [g for g in found if not g.startswith(_TENSOR_GLOBALS)]


def _unwrap(obj: Any) -> Any:
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    return obj


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a checkpoint file, read with `weights_only=True` onto the CPU.

    Accepts `{"state_dict": ...}`, `{"model_state_dict": ...}`, `{"model": ...}`
    wrappers and `module.`/`model.` key prefixes (the latter are removed; see
    `load_weights`, which puts `model.` back where an architecture needs it).
    Raises UserError for a missing file, an HTML page, a pickle that would need to
    run code, and a corrupt or truncated file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: give the path of a .pt/.pth state dict file")
    if _looks_like_html(path):
        raise UserError(f"{path} is an HTML page, not a checkpoint (a failed Google-Drive download saves its error "
                        f"page under the checkpoint's name): download the real file and put it at {path}")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it may not parse; the error below says what matters.
            warnings.filterwarnings("ignore", message=r"Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    # Anything torch.load raises on a file it cannot parse means "not a checkpoint": a text file renamed
    # .pt makes its unpickler fail with KeyError or IndexError, not an UnpicklingError.
    except Exception as e:  # noqa: BLE001
        foreign = _foreign_globals(path)
        if foreign or "Unsupported global" in str(e):
            named = f" (it references {', '.join(foreign[:3])})" if foreign else ""
            raise UserError(f"refused: {path} contains code/objects, not just tensors{named}; loading it would run "
                            "code from the file: re-save it with torch.save(model.state_dict(), path)") from None
        first = next((line.strip() for line in str(e).splitlines() if "Unsupported operand" in line), None) \
            or (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({first}): the file is corrupt or "
                        "truncated, or was not written by torch.save; download or copy it again") from None
    state = _unwrap(obj)
    if not isinstance(state, Mapping):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict: save model.state_dict()")
    not_tensors = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserError(f"{path} is a dict but not a state dict (non-tensor entries: {', '.join(not_tensors[:5])}): "
                        "save model.state_dict(), or wrap it as {'state_dict': ...}")
    return _strip_prefixes(state)


def _fit_prefix(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Put back a 'model.' prefix that read_state_dict removed, when the architecture
    wraps its network in a `model` attribute (RobustBench's normalising ImageNet
    wrappers, or any user class with `self.model = ...`)."""
    wanted = set(model.state_dict())
    if set(state_dict) == wanted:
        return state_dict
    prefixed = {"model." + k: v for k, v in state_dict.items()}
    if set(prefixed) == wanted or (len(set(prefixed) & wanted) > len(set(state_dict) & wanted)):
        return prefixed
    return state_dict


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Load a state dict strictly; UserError naming missing/unexpected keys and shape mismatches."""
    state_dict = _fit_prefix(model, state_dict)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    # load_state_dict casts silently: integer weights (e.g. an all-int64 state dict) would become a
    # model of rounded, usually all-zero, weights that evaluates without complaint.
    kinds = [f"{k} ({str(state_dict[k].dtype).replace('torch.', '')})" for k, v in expected.items()
             if k in state_dict and v.is_floating_point() and not state_dict[k].is_floating_point()]
    if kinds:
        raise UserError(f"the weights in {source} are not floating point where {type(model).__name__}'s are: "
                        f"{_few(kinds, 3)}; this is not a trained model's state dict, use the original file")
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing keys {_few(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_few(unexpected)}")
        if shapes:
            problems.append(f"shape mismatches (checkpoint vs model) {_few(shapes, 3)}")
        raise UserError(f"the weights in {source} do not fit {type(model).__name__}: {'; '.join(problems)}; "
                        "check `arch` (and its arguments) and `dataset`")
    model.load_state_dict(state_dict, strict=True)
    return model


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
