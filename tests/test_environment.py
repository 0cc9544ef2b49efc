"""The installed environment is what the project declares: no test-only package has
overwritten a runtime dependency's files (torchattacks' wheel ships its own robustbench/)."""
from __future__ import annotations

import base64
import hashlib
from importlib import metadata


def _record_mismatches(dist_name: str) -> list[str]:
    dist = metadata.distribution(dist_name)
    bad = []
    for f in dist.files or []:
        if f.hash is None or f.hash.mode != "sha256" or not str(f).endswith(".py"):
            continue
        path = f.locate()
        try:
            data = path.read_bytes()
        except OSError:
            bad.append(f"{f} (missing)")
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        if digest != f.hash.value:
            bad.append(str(f))
    return bad


def test_robustbench_files_match_its_own_record():
    """Every .py file of the installed robustbench has the sha256 its wheel's RECORD lists; a package
    installed later that writes into robustbench/ (as torchattacks 3.5.1 does) makes this fail."""
    assert metadata.version("robustbench") == "1.1.1"
    assert _record_mismatches("robustbench") == []


def test_record_check_detects_a_changed_file(tmp_path, monkeypatch):
    """The check itself can fail: a file whose bytes differ from its RECORD hash is reported."""
    dist = metadata.distribution("robustbench")
    target = next(f for f in dist.files if str(f).endswith("robustbench/utils.py"))
    real = target.locate()
    original = real.read_bytes()
    fake = tmp_path / "utils.py"
    fake.write_bytes(original + b"\n# changed\n")
    monkeypatch.setattr(type(target), "locate", lambda self: fake if self == target else real.parent.parent / self)
    assert "robustbench/utils.py" in _record_mismatches("robustbench")
