"""`adt-ft study`: a smoke study run by several workers at once, a worker killed mid-job, and the
report from entries alone (including the committed robust-base study's tables)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from adt_finetune.models import SmallCNN
from adt_finetune.study import Claims, load_study, plan
from adt_finetune.study.stats import holm

from conftest import standard_train

REPO = Path(__file__).resolve().parent.parent


def _study_file(tmp_path: Path, base_ckpt: Path, out: Path) -> Path:
    """3 arms × 2 seeds from a checkpoint base, tiny budget, PGD-20 on 16 images."""
    data = {
        "study": "smoke", "title": "Smoke study", "seed": 0, "device": "cpu", "dataset": "fashion-mnist",
        "base": {"name": "smoke-base", "checkpoint": str(base_ckpt), "arch": "adt_finetune.models.small:SmallCNN",
                 "arch_kwargs": {"width": 4}},
        "finetune": {"train_subset": 64, "epochs": 1, "batch_size": 32, "lr": 0.01},
        "seeds": {"full": [0, 1]},
        "arms": ["pgd-at/ce", "trades/trades", "exp/ce"], "control": "pgd-at/ce",
        "eval": {"pointwise": {"attacks": "pgd20", "mode": "independent", "n_examples": 16, "batch_size": 16}},
        "report": {"out": str(out)},
    }
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory, fmnist_train):
    x, y = fmnist_train
    model = SmallCNN(width=4)
    standard_train(model, x[:2000], y[:2000], epochs=1)
    path = tmp_path_factory.mktemp("base") / "base.pt"
    torch.save(model.state_dict(), path)
    return path


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, ADT_FT_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _study(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "adt_finetune", "study", *args], env=_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _results_part(readme: Path) -> str:
    """The report up to its cost section (job times differ between two runs of the same study)."""
    text = readme.read_text()
    return text.split("## Cost")[0].split("Regenerate with:")[1].split("\n", 3)[3]


@pytest.mark.slow
def test_two_workers_run_every_job_once_and_a_killed_worker_is_taken_over(tmp_path, base_checkpoint):
    # 1. one worker: the reference report
    (tmp_path / "one").mkdir()
    one = _study_file(tmp_path / "one", base_checkpoint, tmp_path / "out-one")
    p = _study(["run", str(one), "-w", str(tmp_path / "ws-one"), "--no-progress", "--poll", "0.5"])
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    reference = _results_part(tmp_path / "out-one" / "README.md")
    assert "| trades/trades |" in reference and "| exp/ce |" in reference

    # 2. two workers started at once on one workspace: every job starts exactly once
    (tmp_path / "two").mkdir()
    two = _study_file(tmp_path / "two", base_checkpoint, tmp_path / "out-two")
    p = _study(["run", str(two), "-w", str(tmp_path / "ws-two"), "--workers", "2", "--poll", "0.5"])
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    spec = load_study(two)
    events = Claims(tmp_path / "ws-two" / ".adt-ft" / "study" / "smoke", "reader").read_events()
    starts = [e["job"] for e in events if e["event"] == "start"]
    assert sorted(starts) == sorted(j.key for j in plan(spec))  # every job, none twice
    assert len({e["worker"] for e in events}) == 2              # and both workers did some
    assert _results_part(tmp_path / "out-two" / "README.md") == reference

    # 3. a worker killed mid-job; another one, started later, takes the job over and finishes
    (tmp_path / "three").mkdir()
    three = _study_file(tmp_path / "three", base_checkpoint, tmp_path / "out-three")
    ws3 = tmp_path / "ws-three"
    fast = {"ADT_FT_STUDY_HEARTBEAT_S": "0.3", "ADT_FT_STUDY_EXPIRY_S": "2"}
    first = _study(["run", str(three), "-w", str(ws3), "--no-progress", "--poll", "0.5"], **fast)
    claims = Claims(ws3 / ".adt-ft" / "study" / "smoke", "reader")
    deadline = time.time() + 300
    while time.time() < deadline:
        started = [e["job"] for e in claims.read_events() if e["event"] == "start"]
        if any(j.startswith("train:") for j in started):
            break
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    killed = [e["job"] for e in claims.read_events() if e["event"] == "start"][-1]
    assert killed not in [e["job"] for e in claims.read_events() if e["event"] == "done"]
    second = _study(["run", str(three), "-w", str(ws3), "--no-progress", "--poll", "0.5"], **fast)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out
    events = claims.read_events()
    assert any(e["event"] == "takeover" and e["job"] == killed for e in events)
    done = [e["job"] for e in events if e["event"] == "done"]
    assert sorted(done) == sorted(j.key for j in plan(load_study(three)))  # each finished once
    assert _results_part(tmp_path / "out-three" / "README.md") == reference


def test_a_live_claim_is_never_taken_and_a_stale_one_is_taken_once(tmp_path):
    a = Claims(tmp_path, "a", heartbeat_s=0.1, expiry_s=0.5)
    b = Claims(tmp_path, "b", heartbeat_s=0.1, expiry_s=0.5)
    held = a.try_claim("train:x")
    assert held is not None
    time.sleep(1.0)  # a's heartbeat keeps it alive past the expiry
    assert b.try_claim("train:x") is None
    held._stop.set()
    held._thread.join()  # a dies without releasing
    time.sleep(0.8)
    taken = b.try_claim("train:x")
    assert taken is not None and a.try_claim("train:x") is None
    taken.release()
    assert a.try_claim("train:x") is not None


def test_holm_matches_a_hand_computed_case():
    # Holm: sorted p (0.01, 0.02, 0.04) × (3, 2, 1) = (0.03, 0.04, 0.04 → max with previous 0.04); order kept
    assert holm([0.04, 0.01, None, 0.02]) == pytest.approx([0.04, 0.03, None, 0.04])


def test_bad_study_files_are_one_line(tmp_path, cli):
    path = tmp_path / "s.yaml"
    path.write_text("study: x\ndataset: fashion-mnist\nbase: {zoo: A, checkpoint: b}\nfinetune: {}\n"
                    "seeds: {full: [0]}\narms: [pgd-at/ce]\ncontrol: pgd-at/ce\neval: {pointwise: {attacks: pgd20}}\n")
    code, _, err = cli("study", "status", str(path), "-w", str(tmp_path / "ws"))
    assert code == 2 and "exactly one of" in err and "Traceback" not in err
    path.write_text(path.read_text().replace("base: {zoo: A, checkpoint: b}", "base: {zoo: A}")
                    .replace("control: pgd-at/ce", "control: trades/trades"))
    code, _, err = cli("study", "status", str(path), "-w", str(tmp_path / "ws"))
    assert code == 2 and "control" in err
    code, _, err = cli("study", "run", str(tmp_path / "missing.yaml"))
    assert code == 2 and "does not exist" in err


@pytest.mark.slow
@pytest.mark.parametrize("study, out", [("robust-base", "robust-base"), ("robust-base-wdat", "robust-base-wdat")])
def test_report_regenerates_the_committed_robust_base_tables(tmp_path, study, out):
    """From the committed entries alone: every table of the committed README comes out the same (for
    robust-base: the tables the study script wrote before the study command existed, with Holm-adjusted
    p-values added; robust-base-wdat: the W-DAT re-run on a regenerated base)."""
    from adt_finetune.study import write_report

    spec = load_study(REPO / "recipes" / "studies" / f"{study}.yaml")
    folder = tmp_path / out
    folder.mkdir()
    for f in (REPO / "leaderboard" / out).iterdir():
        if f.suffix in (".json", ".csv"):
            (folder / f.name).write_bytes(f.read_bytes())
    write_report(spec, folder, command=f"adt-ft study report recipes/studies/{study}.yaml")
    assert (folder / "README.md").read_text() == (REPO / "leaderboard" / out / "README.md").read_text()
    assert (folder / "index.html").read_text().count("<table>") >= 5


def test_status_estimates_an_unstarted_arm_from_the_control_and_the_bench_ratios(tmp_path, base_checkpoint):
    from adt_finetune.study import Progress, status_rows
    from adt_finetune.workspace import Workspace

    spec = load_study(_study_file(tmp_path, base_checkpoint, tmp_path / "out"))
    progress = Progress(spec, Workspace(tmp_path / "ws"))
    claims = Claims(progress.state, "w")
    for seed, seconds in ((0, 10.0), (1, 14.0)):  # the control's two runs: median 12 s
        claims.log("done", f"train:smoke-pgd-at-ce-full-s{seed}", seconds=seconds)
    claims.log("done", "train:smoke-trades-trades-full-s0", seconds=30.0)
    progress.bench_path("full").write_text(json.dumps({"rows": [
        {"kind": "method", "name": "pgd-at", "loss": "ce", "ratio": 1.0},
        {"kind": "method", "name": "exp", "loss": "ce", "ratio": 4.5}]}))
    rows = {r["job"]: r for r in status_rows(spec, progress, claims)}
    assert rows["train:smoke-exp-ce-full-s0"]["estimate"] == pytest.approx(12.0 * 4.5)
    assert rows["train:smoke-trades-trades-full-s1"]["estimate"] == pytest.approx(30.0)  # its arm's own run
    assert rows["train:smoke-pgd-at-ce-full-s0"]["state"] == "waiting"  # a logged time is not a finished run
    assert rows["eval:smoke-base_aa"]["estimate"] is None and rows["eval:smoke-base_aa"]["state"] == "waiting"


@pytest.mark.slow
def test_a_study_trains_under_torchrun_when_asked(tmp_path, base_checkpoint):
    path = _study_file(tmp_path, base_checkpoint, tmp_path / "out")
    data = yaml.safe_load(path.read_text())
    data["finetune"]["nproc"] = 2
    data["arms"], data["control"], data["seeds"] = ["pgd-at/ce"], "pgd-at/ce", {"full": [0]}
    data["eval"]["pointwise"]["n_examples"] = 8
    path.write_text(yaml.safe_dump(data))
    p = _study(["run", str(path), "-w", str(tmp_path / "ws"), "--no-progress", "--poll", "0.5"])
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    meta = json.loads((tmp_path / "ws" / "runs" / "smoke-pgd-at-ce-full-s0" / "run.json").read_text())
    assert meta["world_size"] == 2 and meta["status"] == "finished"
    assert (tmp_path / "out" / "README.md").exists()


def test_only_reruns_the_named_arms_and_the_base(tmp_path, base_checkpoint, cli):
    path = _study_file(tmp_path, base_checkpoint, tmp_path / "out")
    keys = {j.key for j in plan(load_study(path, only="trades/trades"))}
    assert keys == {"base", "train:smoke-trades-trades-full-s0", "train:smoke-trades-trades-full-s1",
                    "eval:smoke-base_aa", "eval:smoke-trades-trades-full-s0_aa", "eval:smoke-trades-trades-full-s1_aa"}
    assert len(plan(load_study(path))) > len(keys)
    code, _, err = cli("study", "status", str(path), "--only", "wdat/trades", "-w", str(tmp_path / "ws"))
    assert code == 2 and "wdat/trades" in err and "pgd-at/ce" in err


@pytest.mark.slow
def test_a_study_audits_its_models_when_asked(tmp_path, base_checkpoint, cli):
    path = _study_file(tmp_path, base_checkpoint, tmp_path / "out")
    data = yaml.safe_load(path.read_text())
    data["arms"], data["control"], data["seeds"] = ["pgd-at/ce"], "pgd-at/ce", {"full": [0]}
    data["eval"]["pointwise"]["n_examples"] = 8
    data["audit"] = {"n_examples": 8, "checks": ["gradient health", "saturated softmax", "randomness"]}
    path.write_text(yaml.safe_dump(data))
    code, _, err = cli("study", "run", str(path), "-w", str(tmp_path / "ws"), "--no-progress", "--poll", "0.2")
    assert code == 0, err
    spec = load_study(path)
    assert {"audit:smoke-base", "audit:smoke-pgd-at-ce-full-s0"} <= {j.key for j in plan(spec)}
    for model in spec.models():
        audit = json.loads((tmp_path / "out" / f"{model}_aa.json").read_text())["adt_ft"]["audit"]
        assert {c["name"] for c in audit["checks"]} == {"gradient health", "saturated softmax", "randomness"}
