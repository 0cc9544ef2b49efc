"""Sharded evaluation: per-example results do not depend on how the work was split.

Randomness is keyed to fixed chunks of the evaluated set and shards take whole chunks,
so one process, a torchrun world of 2 (gloo, spawned here) and `--shard 0/2` +
`--shard 1/2` + `adt-ft merge` write byte-identical per-example files: for a cheap suite
on the small Fashion-MNIST CNN and for `--suite aa` on pyautoattack's ResNet-18 with
foolbox's real CIFAR-10 images. Merges refuse missing, duplicated and foreign shards.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adt_finetune.attacks import ATTACKS, Attack, AttackResult, make_attack
from adt_finetune.attacks.base import batch_seed, keyed_batch
from adt_finetune.errors import UserError
from adt_finetune.evaluation import combine, evaluate, evaluate_shard, read_per_example_csv
from adt_finetune.evaluation.shards import chunk_batches, shard_rows
from test_evaluation import EPS, N, TableModel, _one_line_error, encode, make_fake, tables, workspace  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
LB = ("leaderboard", "fashion-mnist", "Linf")
# A cheap suite with per-example randomness (pgd20's random starts, exp's noise); batches
# (-b 4) smaller than chunks (8), so chunks hold several.
CHEAP = ["--attacks", "fgsm,pgd20,exp", "-n", "40", "--chunk-size", "8", "-b", "4", "--set", "pgd20.steps=3",
         "--set", "exp.steps=2", "--set", "exp.samples=2", "--no-progress"]
RESNET = "pyautoattack.examples.resnet:ResNet18"


def noisy_attack(monkeypatch, name="noisy"):
    """An attack whose flags are pure batch-level randomness: a draw keyed by `batch_seed`
    (AutoAttack's seed) plus one from the global RNG the engine reseeds per batch."""

    class Noisy(Attack):
        def perturb(self, model, x, y):
            u = torch.rand(len(x), generator=torch.Generator().manual_seed(batch_seed(f"{self.name}:{self.seed}")))
            return AttackResult(x.clone(), (u + torch.rand(len(x))) < 1.0)

    Noisy.name = name
    monkeypatch.setitem(ATTACKS._items, name, Noisy)


# ---------------------------------------------------------------- chunks and shards

def test_shards_take_whole_chunks_and_batches_never_cross_one():
    n, c = 50, 8
    rows = [shard_rows(n, c, (k, 3)) for k in range(3)]
    assert sorted(np.concatenate(rows).tolist()) == list(range(n))  # a partition of the set
    for k, r in enumerate(rows):
        assert set(np.unique(r // c) % 3) == {k}  # whole chunks, chunk c to shard c mod 3
    positions = np.array([0, 1, 2, 5, 7, 8, 9, 30, 31])
    batches = chunk_batches(positions, c, 2)
    assert [(b.start, b.stop, b.key) for b in batches] == [
        (0, 2, "0.0"), (2, 4, "0.1"), (4, 5, "0.2"), (5, 7, "1.0"), (7, 9, "3.0")]


def test_the_cli_default_chunk_size_is_the_library_s():
    import typer

    from adt_finetune.cli import app
    from adt_finetune.evaluation import CHUNK_SIZE

    params = {p.name: p for p in typer.main.get_command(app).commands["eval"].params}
    assert params["chunk_size"].default == CHUNK_SIZE == params["batch_size"].default


def test_batch_level_seeds_are_keyed_to_the_chunk():
    aa = make_attack("autoattack", 0.1, seed=3)
    assert aa.batch_seed() == 3  # called directly: pyautoattack gets the seed setting itself
    with keyed_batch("0.0"):
        first = aa.batch_seed()
    with keyed_batch("1.0"):
        second = aa.batch_seed()
    assert first != second and 0 <= first < 2 ** 31
    assert batch_seed("exp:0") is None  # outside the engine there is no chunk to key to


@pytest.mark.parametrize("mode", ["independent", "cascade"])
def test_shards_combine_to_the_single_process_flags(monkeypatch, tables, mode):  # noqa: F811
    x, y, model, clean, robust = tables
    noisy_attack(monkeypatch)
    make_fake(monkeypatch, "fa", robust["fa"])
    kw = dict(attacks=["fa", "noisy"], eps=EPS, mode=mode, batch_size=3, chunk_size=8)
    whole = evaluate(model, x, y, **kw)
    parts = [evaluate_shard(model, x, y, shard=(k, 3), **kw) for k in (2, 0, 1)]
    merged = combine(parts)
    assert merged.csv_text() == whole.csv_text()
    assert merged.shards == 3 and merged.chunk_size == 8 and merged.to_json()["chunk_size"] == 8
    assert [len(p.positions) for p in sorted(parts, key=lambda p: p.shard)] == [16, 16, 8]
    # The flags are random draws, so agreement is no accident: other chunks give other flags.
    other = evaluate(model, x, y, **dict(kw, chunk_size=5))
    assert not np.array_equal(other.flags, whole.flags)


def test_resume_works_per_shard(monkeypatch, tables, tmp_path):  # noqa: F811
    x, y, model, clean, robust = tables
    noisy_attack(monkeypatch)
    kw = dict(attacks=["noisy"], eps=EPS, batch_size=4, chunk_size=8)
    make_fake(monkeypatch, "fa", robust["fa"], fail_on_call=2)  # crashes in the middle of shard 1/2
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate_shard(model, x, y, shard="1/2", resume_dir=tmp_path / "s1", **dict(kw, attacks=["noisy", "fa"]))
    with pytest.raises(UserError, match="different model, examples or settings"):  # another shard's flags
        evaluate_shard(model, x, y, shard="0/2", resume_dir=tmp_path / "s1", **dict(kw, attacks=["noisy", "fa"]))
    calls = make_fake(monkeypatch, "fa", robust["fa"])
    resumed = evaluate_shard(model, x, y, shard="1/2", resume_dir=tmp_path / "s1", **dict(kw, attacks=["noisy", "fa"]))
    assert sum(len(c) for c in calls) < int(clean[resumed.positions].sum())  # finished batches were not redone
    fresh = evaluate_shard(model, x, y, shard="1/2", **dict(kw, attacks=["noisy", "fa"]))
    assert resumed.result.csv_text() == fresh.result.csv_text()


def test_dataset_level_attacks_are_refused_under_sharding(cli, workspace):  # noqa: F811
    w = ["-w", workspace.root, "--no-progress", "-n", "8", "--chunk-size", "4"]
    for what in (["--attacks", "wpgd"], ["--suite", "wasserstein"]):
        code, _, err = cli("eval", *what, "--shard", "0/2", *w)
        _one_line_error(code, err)
        assert "whole evaluated set" in err
    code, _, err = cli("eval", "--attacks", "fgsm", "--shard", "2/2", *w)
    _one_line_error(code, err)
    assert "0 <= K < N" in err


def test_shard_option_is_refused_under_torchrun(cli, workspace, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = cli("eval", "--attacks", "fgsm", "--shard", "0/2", "-w", workspace.root, "--no-progress")
    _one_line_error(code, err)
    assert "torchrun" in err


# ---------------------------------------------------------------- one process = world 2 = shards + merge

def _torchrun(args: list[str], log: Path) -> subprocess.Popen:
    """`torchrun --nproc-per-node 2 -m adt_finetune eval ...` (gloo: CPU), in the background."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", ADT_FT_OFFLINE="1", PYTHONPATH=path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "adt_finetune", "eval", *map(str, args)]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)


def _wait(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


def _split_and_merge(cli, common: list, shard_dir: Path, entry: str, ws: Path) -> None:
    for k in (1, 0):
        code, out, err = cli("eval", *common, "--entry", entry, "--shard", f"{k}/2", "--shard-dir", shard_dir)
        assert code == 0, err
        assert f"shard {k}/2" in out and "adt-ft merge" in out
    code, out, err = cli("merge", shard_dir, "-w", ws)
    assert code == 0, err
    assert "2 shards" in out and "A_rob" in out


def _csv(folder: Path, entry: str) -> bytes:
    return (folder / f"{entry}.per-example.csv").read_bytes()


@pytest.fixture
def cifar_folder(tmp_path, image_folder):
    from adt_finetune.data import CIFAR10_CLASSES

    return image_folder(tmp_path / "cifar10-images", CIFAR10_CLASSES)[0]


def _finished_run(ws, run_id: str) -> None:
    """A finished run folder in the workspace whose model is the workspace's current model."""
    from adt_finetune.workspace import ModelRef

    ref = ws.current_model()
    folder = ws.runs_dir / run_id
    folder.mkdir(parents=True)
    shutil.copy(ref.path, folder / "model.pt")
    model = ModelRef(name=run_id, arch=ref.arch, dataset=ref.dataset, path=str(folder / "model.pt"), source="run",
                     arch_kwargs=ref.arch_kwargs)
    (folder / "run.json").write_text(json.dumps({
        "id": run_id, "status": "finished", "method": "pgd-at", "loss": "ce", "scope": "full", "epochs": 1,
        "seed": 0, "base_model": ref.to_dict(), "model": model.to_dict()}))


def test_torchrun_takes_from_run_but_not_run():
    """torchrun reads `--run` after `-m adt_finetune eval` as an ambiguous prefix of its own --run-path
    and exits 2 before adt-ft starts: `--from-run` is the spelling that works under it."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    head = ["--standalone", "--nproc-per-node", "2", "-m", "adt_finetune", "eval"]
    assert parser.parse_args([*head, "--from-run", "r1", "--suite", "quick"]).training_script_args[:3] == \
        ["eval", "--from-run", "r1"]
    for bad in (["--run", "r1"], ["--run=r1"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*head, *bad])


@pytest.mark.slow
def test_world_2_and_shards_match_one_process(cli, workspace, tmp_path, cifar_folder,  # noqa: F811
                                              pyautoattack_checkpoint):
    """Both suites at once: the two torchrun worlds run in the background while this process
    evaluates the same things in one process and as two shards. The cheap suite evaluates a run,
    named with --from-run under torchrun and with --run in one process."""
    ws = workspace.root
    _finished_run(workspace, "r1")
    cheap = [*CHEAP, "-w", ws]
    aa = ["--model", pyautoattack_checkpoint, "--arch", RESNET, "--dataset", cifar_folder, "--suite", "aa",
          "-n", "2", "--chunk-size", "1", "--set", "autoattack.attacks=apgd-ce", "--no-progress", "-w", ws]
    logs = [tmp_path / "cheap.log", tmp_path / "aa.log"]
    procs = [_torchrun([*cheap, "--from-run", "r1", "--entry", "world2"], logs[0]),
             _torchrun([*aa, "--entry", "aa-world2"], logs[1])]
    try:
        for args, entry in (([*cheap, "--run", "r1"], "single"), (aa, "aa-single")):
            code, out, err = cli("eval", *args, "--entry", entry)
            assert code == 0, err
        _split_and_merge(cli, [*cheap, "--from-run", "r1"], tmp_path / "shards", "sharded", ws)
        _split_and_merge(cli, aa, tmp_path / "aa-shards", "aa-sharded", ws)
        outs = [_wait(p, log) for p, log in zip(procs, logs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    fm, cifar = ws.joinpath(*LB), ws / "leaderboard" / "cifar10" / "Linf"
    assert _csv(fm, "world2") == _csv(fm, "single") == _csv(fm, "sharded")
    assert _csv(cifar, "aa-world2") == _csv(cifar, "aa-single") == _csv(cifar, "aa-sharded")
    for out in outs:  # rank 0 alone prints the table and writes the entry
        assert out.count("A_rob") == 1 and out.count("wrote ") == 1
    single = json.loads((fm / "single.json").read_text())["adt_ft"]
    world2 = json.loads((fm / "world2.json").read_text())["adt_ft"]
    assert (single["chunk_size"], single["shards"], world2["chunk_size"], world2["shards"]) == (8, 1, 8, 2)
    assert single["run_id"] == world2["run_id"] == "r1"
    assert len(world2["shard_timings_s"]) == 2 and single["a_rob"] == world2["a_rob"]
    cols = read_per_example_csv(fm / "single.per-example.csv")
    assert len(cols["index"]) == 40
    for a in ("pgd20", "exp"):  # random starts and noise decided some examples each way
        assert {v for v, c in zip(cols[a], cols["clean"]) if c == "1"} == {"0", "1"}, a
    assert not any(ws.joinpath(".adt-ft", "eval", "fashion-mnist", "Linf").glob("*shard-*"))  # partial flags gone


# ---------------------------------------------------------------- merge refusals

def test_merge_refuses_missing_duplicated_and_foreign_shards(cli, workspace, tmp_path):  # noqa: F811
    ws = workspace.root
    base = ["--attacks", "fgsm", "-n", "12", "--chunk-size", "4", "--no-progress", "-w", ws, "--entry", "e"]
    done = tmp_path / "done"
    for k in range(3):
        assert cli("eval", *base, "--shard", f"{k}/3", "--shard-dir", done)[0] == 0
    assert cli("eval", *base, "--seed", "1", "--shard", "2/3", "--shard-dir", tmp_path / "seed1")[0] == 0

    def merge_of(name: str, files: list[Path]) -> tuple[int, str, str]:
        folder = tmp_path / name
        folder.mkdir()
        for f in files:
            shutil.copy(f, folder / f.name)
        return cli("merge", folder, "-w", ws)

    shard = [done / f"e.shard-{k}-of-3.json" for k in range(3)]
    code, _, err = merge_of("missing", shard[:2])
    _one_line_error(code, err)
    assert "shard 2/3 is missing" in err
    code, _, err = cli("merge", *shard, shard[1], "-w", ws)  # the same file given twice
    _one_line_error(code, err)
    assert "shard 1/3 is given twice" in err
    code, _, err = merge_of("foreign", [*shard[:2], tmp_path / "seed1" / "e.shard-2-of-3.json"])
    _one_line_error(code, err)
    assert "different evaluations" in err and "e.shard-2-of-3.json" in err
    code, _, err = cli("merge", tmp_path / "nowhere", "-w", ws)
    _one_line_error(code, err)
    assert not ws.joinpath(*LB, "e.json").exists()  # nothing was written by a refused merge
    code, _, err = cli("eval", *base, "--shard", "1/3", "--shard-dir", done)  # a finished shard is kept
    _one_line_error(code, err)
    assert "--resume" in err
    assert cli("merge", done, "-w", ws)[0] == 0 and ws.joinpath(*LB, "e.json").exists()
