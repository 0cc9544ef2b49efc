"""Small shared helpers: atomic writes, ε parsing, seeding, provenance."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import random
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only on success.

    A crash or Ctrl-C therefore never leaves a half-written file under the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp creates the file owner-only (0600); results are meant to be shared, so give
    # it the mode a plain open() would have under the user's umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_eps(text: str | float | int) -> float:
    """Parse an L∞ budget: '8/255', '0.031', 0.1 (a number passes through `check_eps`). Raises
    UserError on anything else."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return check_eps(float(text), text)
    s = str(text).strip()
    try:
        value = float(Fraction(s)) if "/" in s else float(s)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"cannot parse ε {text!r}: give a number like 0.031 or a fraction like 8/255") from None
    return check_eps(value, text)


def check_eps(value: float, shown: Any = None) -> float:
    """The one rule for an L∞ budget ε: a number in [0, 1], because images live in [0, 1]. `shown` is
    how the caller gave it (the text before parsing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value <= 1):
        raise UserError(f"ε {value if shown is None else shown!r} is outside [0, 1]: images live in [0, 1], "
                        "give e.g. 8/255")
    return float(value)


def format_eps(eps: float) -> str:
    """RobustBench writes budgets as '8/255' when they are a whole number of 255ths."""
    n = eps * 255
    if abs(n - round(n)) < 1e-6 and round(n) > 0:
        return f"{round(n)}/255"
    return f"{eps:.4g}"


# Seeds reach numpy, whose seeds are 32-bit, and torch generators as seed × a constant in 64 bits.
SEED_LIMIT = 2**32


def check_seed(seed: int) -> None:
    """UserError for a seed the random generators cannot take (torch's is 64-bit, numpy's 32-bit)."""
    if not 0 <= seed < SEED_LIMIT:
        raise UserError(f"seed must be a whole number in [0, {SEED_LIMIT - 1}], got {seed}")


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def git_commit() -> str | None:
    """The project's git commit, or None outside a checkout (e.g. an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    commit = out.stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return commit + ("-dirty" if dirty else "")


def versions() -> dict[str, str | None]:
    """Versions of everything that can change a number, recorded with every result."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("adt-ft", "torch", "torchvision", "robustbench", "pyautoattack", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    out["git_commit"] = git_commit()
    return out


def resolve_device(name: str):
    """A torch.device from 'auto', 'cpu', 'cuda' or 'cuda:N'; UserError when it cannot be used here.

    Library-level twin of the CLI's option handling, so that `train()` called from a
    notebook resolves '--device auto' exactly as the command does.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"`device` {name}: no CUDA device is available here; use `device` cpu")
    return dev


def parse_json_object(text: str | None, flag: str = "--arch-kwargs") -> dict[str, Any] | None:
    """A JSON object given on the command line (e.g. --arch-kwargs '{"width": 16}'); None stays None."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{flag} {text!r} is not JSON ({e.msg}): write e.g. '{{\"width\": 16}}'") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object such as '{{\"width\": 16}}', got {text!r}")
    return value


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def child_env() -> dict[str, str]:
    """The environment for an `adt-ft` child process (`python -m ...`): `python -m` puts the current
    folder (often a workspace someone shares) first on sys.path, where a stray numpy.py would be
    imported. The child finds adt-ft where this process did, and never the current folder
    (PYTHONSAFEPATH, Python 3.11+; docs/security.md)."""
    import site

    package_root = str(Path(__file__).resolve().parents[1])
    extra = "" if package_root in site.getsitepackages() else package_root  # a source checkout
    return {**os.environ, "PYTHONSAFEPATH": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (extra, os.environ.get("PYTHONPATH", "")) if p)}


def looks_like_checkpoint(name: str | os.PathLike) -> bool:
    """Whether a --model value names a checkpoint file (an existing file, or a checkpoint suffix)
    rather than a zoo name. The one rule for train, eval and the Python API."""
    path = Path(name).expanduser()
    return path.is_file() or path.suffix in CHECKPOINT_SUFFIXES


def format_pct(value: float | None, digits: int = 2, missing: str = "—") -> str:
    """A percentage already in [0, 100] as text; `missing` for None."""
    return missing if value is None else f"{value:.{digits}f}"
