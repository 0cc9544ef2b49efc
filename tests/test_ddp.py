"""Training under torchrun: two CPU processes with gloo, spawned once for every test here.

(a) one pgd-at step on 2 processes × B/2 images with --sync-bn equals one single-process step on B;
(b) every method × loss trains under world 2 (both scopes) and writes one run, the ranks in sync;
(c) a world-2 run killed mid-epoch and resumed ends bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from adt_finetune.config import TrainConfig
from adt_finetune.errors import UserError
from adt_finetune.models import SmallCNN
from adt_finetune.training import train

ARCH = "adt_finetune.models.small:SmallCNN"
WORLD = 2

# (a): B = 16 images, one step; the same run on two processes takes 8 each
STEP = dict(method="pgd-at", loss="ce", epochs=1, train_subset=16, pgd_steps=3, lr=0.5, device="cpu", seed=3)
# and three steps from the random start alone (sign steps would amplify rounding): DDP's later buckets
STEPS = dict(STEP, train_subset=48, pgd_steps=0)
# TRADES' two training passes (clean, adversarial) through DDP, from its keyed start, two steps
TRADES2 = dict(STEP, method="trades", loss="trades", train_subset=32, trades_steps=0)
# wdat after one step: every process computes the same Υ over the same training images, and each
# image's budget is its own, so the step is the one-process step
WDAT1 = dict(STEP, method="wdat", loss="ce", wdat_steps=1, wdat_upsilon_images=16)

# (b): every method × loss, both scopes, --sync-bn on some full-scope ones; 2 steps of 2 × 4 images
TINY = dict(epochs=1, train_subset=16, batch_size=4, pgd_steps=1, trades_steps=1, exp_steps=1, exp_samples=1,
            wdat_steps=2, gen_width=2, z_dim=4, device="cpu", lr=0.05)
COMBOS = [("pgd-at", "ce", "full", dict(sync_bn=True)), ("trades", "trades", "last-layer", {}),
          ("exp", "ce", "last-layer", {}), ("exp", "trades", "full", {}),
          ("exp-am", "ce", "full", dict(sync_bn=True)), ("exp-am", "trades", "last-layer", {}),
          ("imp-am", "ce", "last-layer", {}), ("imp-am", "trades", "full", {}),
          ("wdat", "trades", "full", dict(wdat_upsilon_images=8)), ("wdat", "ce", "last-layer", {})]

# (c): 2 epochs of 3 steps, a checkpoint every 2 steps, all ranks killed after step 5 (mid epoch 2)
RESUMED = [dict(method="exp-am", loss="trades", gen_width=2),
           dict(method="wdat", loss="ce", wdat_steps=2, wdat_upsilon_images=8, wdat_upsilon_every=2)]
LONG = dict(epochs=2, train_subset=24, batch_size=4, device="cpu", checkpoint_every=2, lr=0.05)
KILL_AT = 5


def _register(root: Path) -> Path:
    from adt_finetune.zoo import register_model

    torch.manual_seed(1)
    register_model(SmallCNN(width=4), name="base", arch=ARCH, arch_kwargs={"width": 4}, dataset="fashion-mnist",
                   workspace=root)
    return root


def _states(result) -> dict:
    """The classifier's and the method networks' final state (what the ranks must agree on)."""
    return {"model": {k: v.clone() for k, v in result.model.state_dict().items()},
            # this rank's own generator and q-network, not the file rank 0 wrote
            "networks": {f"{name}.{k}": v.clone() for name, net in result.networks.items()
                         for k, v in net.state_dict().items()}}


class _Killed(RuntimeError):
    pass


def _kill_at(step):
    def hook(global_step):
        if global_step == step:
            raise _Killed("every rank killed")

    return hook


def _worker(rank: int, port: int, roots: dict[str, str], out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # One process group for every run below (train() then leaves it in place).
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    results: dict = {}
    a = train(TrainConfig(**STEP, batch_size=16 // WORLD, sync_bn=True, run_name="synced"), workspace=roots["a"])
    results["a"] = _states(a)
    results["a-classes"] = sorted({type(m).__name__ for m in a.model.modules()})
    a = train(TrainConfig(**STEP, batch_size=16 // WORLD, run_name="unsynced"), workspace=roots["a"])
    results["a-unsynced"] = _states(a)
    for name, kw in (("three", STEPS), ("trades", TRADES2), ("wdat", WDAT1)):
        a = train(TrainConfig(**kw, batch_size=16 // WORLD, sync_bn=True, run_name=name), workspace=roots["a"])
        results[f"a-{name}"] = _states(a)
    for method, loss, scope, extra in COMBOS:
        r = train(TrainConfig(**TINY, method=method, loss=loss, scope=scope, run_name=f"{method}-{loss}", **extra),
                  workspace=roots["b"])
        results[f"b/{method}-{loss}"] = _states(r)
    for i, kw in enumerate(RESUMED):
        cfg = TrainConfig(**LONG, **kw)
        results[f"c/{i}/straight"] = _states(train(replace(cfg, run_name=f"straight-{i}"), workspace=roots["c"]))
        with pytest.raises(_Killed):
            train(replace(cfg, run_name=f"killed-{i}"), workspace=roots["c"], on_step=_kill_at(KILL_AT))
        results[f"c/{i}/resumed"] = _states(train(workspace=roots["c"], resume=f"killed-{i}"))
    with pytest.raises(_Killed):  # left unfinished: one process must refuse to resume it
        train(TrainConfig(**LONG, **RESUMED[1], run_name="orphan"), workspace=roots["c"], on_step=_kill_at(3))
    torch.save(results, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    """Spawn the two ranks once; their final states per scenario, and the workspaces they trained in."""
    import torch.multiprocessing as mp

    base = tmp_path_factory.mktemp("ddp")
    roots = {k: str(_register(base / k)) for k in ("a", "b", "c")}
    out = base / "out"
    out.mkdir()
    mp.start_processes(_worker, args=(_free_port(), roots, str(out)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return ranks, {k: Path(v) for k, v in roots.items()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def _assert_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def _assert_same_states(a: dict, b: dict, what: str) -> None:
    _assert_equal(a["model"], b["model"], f"{what} classifier")
    _assert_equal(a["networks"], b["networks"], f"{what} method networks")


@pytest.mark.slow
def test_world2_step_with_sync_bn_equals_one_process_step(world2, tmp_path):
    ranks, roots = world2
    single = train(TrainConfig(**STEP, batch_size=16, example_seeds=True), workspace=_register(tmp_path))
    ref = single.model.state_dict()
    base = torch.load(next((roots["a"] / "models").rglob("base.pt")), weights_only=True)
    moved = _max_diff(ref, base)
    assert moved > 1e-3  # the step did change the weights
    synced = ranks[0]["a"]["model"]
    assert _max_diff(synced, ref) < 1e-5  # weights and BatchNorm statistics: over the whole batch
    _assert_equal(ranks[0]["a"]["model"], ranks[1]["a"]["model"], "rank 1")
    # SyncBatchNorm only while training: the model handed back is built as it was
    assert ranks[0]["a-classes"] == sorted({type(m).__name__ for m in single.model.modules()})
    # Without --sync-bn each half is normalised by its own statistics: a different step.
    assert _max_diff(ranks[0]["a-unsynced"]["model"], ref) > 1e-4
    for name, kw in (("three", STEPS), ("trades", TRADES2)):
        alone = train(TrainConfig(**kw, batch_size=16, example_seeds=True), workspace=tmp_path).model.state_dict()
        assert _max_diff(ranks[0][f"a-{name}"]["model"], alone) < 1e-5, name
    alone = train(TrainConfig(**WDAT1, batch_size=16, example_seeds=True), workspace=tmp_path)
    assert _max_diff(ranks[0]["a-wdat"]["model"], alone.model.state_dict()) < 1e-5
    upsilon = [torch.load(path / "checkpoint.pt", weights_only=True)["method"]["wdat"]["split"]["upsilon"]
               for path in (roots["a"] / "runs" / "wdat", alone.path)]
    assert upsilon[1] > 0 and upsilon[0] == pytest.approx(upsilon[1], rel=1e-5)
    meta = json.loads((roots["a"] / "runs" / "synced" / "run.json").read_text())
    assert (meta["world_size"], meta["global_batch_size"], meta["config"]["batch_size"]) == (2, 16, 8)
    assert meta["config"]["sync_bn"] and meta["config"]["example_seeds"] and meta["backend"] == "gloo"
    assert json.loads((tmp_path / "runs" / single.run_id / "run.json").read_text()).get("world_size") is None


@pytest.mark.slow
def test_every_method_and_loss_trains_under_world2_and_writes_one_run(world2):
    ranks, roots = world2
    names = {f"{m}-{lo}" for m, lo, _, _ in COMBOS}
    # one folder per run, none from rank 1 (beside each run name's lock file, .<run>.lock)
    assert {p.name for p in (roots["b"] / "runs").iterdir() if p.is_dir()} == names
    assert {p.name for p in (roots["b"] / "runs").iterdir() if not p.is_dir()} <= {f".{n}.lock" for n in names}
    base = torch.load(next((roots["b"] / "models").rglob("base.pt")), weights_only=True)
    for method, loss, scope, _ in COMBOS:
        name = f"{method}-{loss}"
        run = roots["b"] / "runs" / name
        meta = json.loads((run / "run.json").read_text())
        assert meta["status"] == "finished" and meta["world_size"] == 2 and meta["global_batch_size"] == 8, name
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["steps"] == 2, name
        zero, one = ranks[0][f"b/{name}"], ranks[1][f"b/{name}"]
        _assert_same_states(zero, one, f"{name} rank 1")  # classifier, generator, q-network: all in sync
        _assert_equal(zero["model"], torch.load(run / "model.pt", weights_only=True), f"{name} model.pt")
        assert (run / "generator.pt").exists() == method.endswith("-am") == bool(zero["networks"]), name
        if method == "imp-am":
            assert any(k.startswith("entropy_net.") for k in zero["networks"]), name
        assert not torch.equal(zero["model"]["fc.weight"], base["fc.weight"]), name
        if scope == "last-layer":  # the body and its BatchNorm statistics are untouched
            body = {k: v for k, v in base.items() if not k.startswith("fc.")}
            _assert_equal(body, {k: zero["model"][k] for k in body}, f"{name} body")


@pytest.mark.slow
def test_kill_and_resume_under_world2_is_bit_identical(world2):
    ranks, roots = world2
    for i in range(len(RESUMED)):
        for r in range(WORLD):
            straight, resumed = ranks[r][f"c/{i}/straight"], ranks[r][f"c/{i}/resumed"]
            _assert_same_states(straight, resumed, f"{RESUMED[i]['method']} rank {r}")
        meta = json.loads((roots["c"] / "runs" / f"killed-{i}" / "run.json").read_text())
        assert meta["status"] == "finished" and meta["resumed"][0]["global_step"] == 4  # the checkpoint at step 4
    with pytest.raises(UserError, match="trained by 2 process"):
        train(workspace=roots["c"], resume="orphan")


def test_nproc_runs_the_same_command_under_torchrun(tmp_path, cli, monkeypatch):
    """`adt-ft train --nproc N ...` starts `torchrun --nproc-per-node N -m adt_finetune train ...` with
    options that give the very config the command itself would have trained with."""
    import subprocess

    import adt_finetune.training as training

    seen: dict = {}

    class FakeTorchrun:
        def __init__(self, command, **kwargs):
            seen["command"] = command

        def wait(self):
            return 0

    def fake_train(cfg, **kwargs):
        seen.setdefault("configs", []).append(cfg)
        raise UserError("captured")

    monkeypatch.setattr(subprocess, "Popen", FakeTorchrun)
    monkeypatch.setattr(training, "train", fake_train)
    options = ["--method", "exp-am", "--loss", "trades", "--milestones", "3,5", "--schedule", "step",
               "--gen-betas", "0.5,0.9", "--model", "scratch", "--arch", "adt_finetune.models.small:SmallCNN",
               "--arch-kwargs", '{"width": 4}', "--dataset", "fashion-mnist", "--no-gen-normalize-gradients",
               "--sync-bn", "--lr", "0.02", "--batch-size", "64", "--workspace", str(tmp_path)]
    code, _, _ = cli("train", "--nproc", "3", *options)
    assert code == 0
    command = seen["command"]
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3"]
    relaunched = command[command.index("adt_finetune") + 2:]
    assert "--nproc" not in relaunched
    for args in (options, relaunched):
        code, _, err = cli("train", *args)
        assert code == 2 and "captured" in err
    direct, again = seen["configs"]
    assert direct == again and again.sync_bn and again.milestones == [3, 5] and again.gen_betas == (0.5, 0.9)
    assert again.arch_kwargs == {"width": 4}

    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = cli("train", "--nproc", "2", "--workspace", str(tmp_path))
    assert code == 2 and "already runs under torchrun" in err


def test_sync_bn_is_for_the_full_network():
    from adt_finetune.training import validate_config

    with pytest.raises(UserError, match="`sync_bn` applies to `scope` full"):
        validate_config(TrainConfig(sync_bn=True, scope="last-layer"))
