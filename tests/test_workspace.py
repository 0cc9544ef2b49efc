"""The workspace's state file: concurrent updates, hostile or broken records, relative paths."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from adt_finetune.errors import UserError
from adt_finetune.workspace import ModelRef, Workspace

WRITER = """
import sys
from adt_finetune.workspace import Workspace
ws = Workspace(sys.argv[1])
for _ in range(int(sys.argv[2])):
    ws.update_state(lambda st: st.update(count=st.get("count", 0) + 1))
"""


def test_concurrent_updates_are_not_lost(tmp_path):
    """Two processes each increment a counter in state.json N times: every increment survives
    (without the lock, read-modify-write races lose a large share of them)."""
    n = 150
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(n)]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert Workspace(tmp_path).state()["count"] == 2 * n


@pytest.mark.parametrize("record,problem", [
    ("not a dict", "not a model record"),
    ({"name": "m", "dataset": "cifar10"}, "'arch'"),
    ({"name": "m", "arch": 3, "dataset": "cifar10"}, "'arch'"),
    ({"name": "m", "arch": "Standard", "dataset": "cifar10", "path": ["x"]}, "'path'"),
    ({"name": "m", "arch": "Standard", "dataset": "cifar10", "arch_kwargs": "w=3"}, "arch_kwargs"),
])
def test_broken_current_model_records_are_one_clear_error(tmp_path, record, problem):
    ws = Workspace(tmp_path)
    ws.state_path.parent.mkdir(parents=True)
    ws.state_path.write_text(json.dumps({"current_model": record}))
    with pytest.raises(UserError, match=problem):
        ws.current_model()


def test_state_file_that_is_not_an_object_or_a_folder_that_is_a_file(tmp_path):
    ws = Workspace(tmp_path / "a")
    ws.state_path.parent.mkdir(parents=True)
    ws.state_path.write_text("[1, 2]")
    with pytest.raises(UserError, match="not a JSON object"):
        ws.state()
    ws2 = Workspace(tmp_path / "b")
    ws2.root.mkdir()
    (ws2.root / ".adt-ft").write_text("oops")
    with pytest.raises(UserError, match="is a file"):
        ws2.set_latest_run("r1")
    ws3 = Workspace(tmp_path / "c")
    ws3.state_path.parent.mkdir(parents=True)
    ws3.state_path.write_text(json.dumps({"latest_run": "../../etc"}))
    with pytest.raises(UserError, match="not a run id"):
        ws3.latest_run()


def test_paths_inside_the_workspace_are_recorded_relative(tmp_path):
    """A copied or moved workspace reads its own model file, not the original's."""
    ws = Workspace(tmp_path / "one")
    model = ws.model_path("cifar10", "Linf", "M")
    ws.set_current_model(ModelRef(name="M", arch="Standard", dataset="cifar10", path=str(model)))
    raw = json.loads(ws.state_path.read_text())["current_model"]["path"]
    assert raw == "models/cifar10/Linf/M.pt"
    (tmp_path / "one").rename(tmp_path / "two")
    assert Workspace(tmp_path / "two").current_model().path == str((tmp_path / "two" / raw).resolve())
    outside = tmp_path / "elsewhere.pt"
    ws2 = Workspace(tmp_path / "three")
    ws2.set_current_model(ModelRef(name="E", arch="Standard", dataset="cifar10", path=str(outside)))
    assert json.loads(ws2.state_path.read_text())["current_model"]["path"] == str(outside.resolve())
