"""`adt-ft bench`: one tiny step per item, the documented JSON, pass counts and the cost model.

Nothing here times anything: the numbers a benchmark measures are not test material.
"""
from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from adt_finetune.bench import BenchRow, run_benchmark
from adt_finetune.cli.bench_cmd import bench_table
from adt_finetune.errors import UserError

TINY = "adt_finetune.models.small:SmallCNN"
TINY_KWARGS = {"width": 4}
NARROW_GENERATOR = {"gen_width": 8}

ROW_TYPES = {
    "kind": str, "name": str, "status": str, "images_per_s": float, "step_time_s": float, "step_times_s": list,
    "forward_passes": int, "backward_passes": int, "forward_images": int, "module_passes": dict,
    "peak_mem_mb": float, "baseline": str, "ratio": float, "predicted_ratio": float, "predicted_flops": float,
    "predicted_flops_by_module": dict, "counted_flops": float, "tflops": float, "note": str,
}


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    """pgd-at + exp-am (both losses) + a method not implemented in this build, and fgsm, one step each."""
    from adt_finetune.methods import METHODS, TrainMethod

    class Unfinished(TrainMethod):  # stands in for a method registered but not implemented in this build
        accepts_loss = ("trades",)

        def step(self, model, x, y):
            raise NotImplementedError

    saved = METHODS._items["wdat"]
    METHODS._items["wdat"] = Unfinished  # the registry refuses overwrites; the test swaps underneath it
    try:
        result = run_benchmark(TINY, dataset="fashion-mnist", methods=["pgd-at", "exp-am", "wdat"],
                               attacks=["fgsm"], batch_size=4, steps=1, warmup=1, arch_kwargs=TINY_KWARGS,
                               config_overrides=NARROW_GENERATOR, strict=True)
    finally:
        METHODS._items["wdat"] = saved
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    result.save_json(path)
    return result, json.loads(path.read_text())


def test_json_has_documented_fields(tiny_result):
    _, data = tiny_result
    assert data["schema"] == "adt-ft-bench/1"
    assert data["device"]["type"] == "cpu" and data["device"]["name"] and isinstance(data["device"]["threads"], int)
    assert data["torch"] == torch.__version__
    assert data["arch"] == TINY and data["dataset"] == "fashion-mnist" and data["input_shape"] == [1, 28, 28]
    assert data["dtype"] == "fp32" and data["batch_size"] == 4
    assert data["channels_last"] is False and data["compile"] is False
    assert data["config_overrides"] == NARROW_GENERATOR
    gf = data["classifier_gflop_per_image"]
    # An input-only backward costs about one forward, a full backward (weights too) about two.
    assert 0 < gf["forward"] < gf["forward_input_backward"] < gf["forward_full_backward"]
    assert "resident set" in data["peak_mem_meaning"]

    items = [(r["kind"], r["name"], r["loss"], r["status"]) for r in data["rows"]]
    assert items == [("method", "pgd-at", "ce", "ok"), ("method", "exp-am", "ce", "ok"),
                     ("method", "exp-am", "trades", "ok"), ("method", "wdat", "trades", "skipped"),
                     ("attack", "pgd20", None, "ok"), ("attack", "fgsm", None, "ok")]
    assert set(data["rows"][0]) == set(BenchRow.__dataclass_fields__)
    for row in data["rows"]:
        if row["status"] != "ok":
            continue
        for key, typ in ROW_TYPES.items():
            value = row[key]
            assert isinstance(value, typ) or (typ is float and isinstance(value, int)), (row["name"], key, value)
        assert row["images_per_s"] > 0 and row["step_time_s"] > 0 and row["peak_mem_mb"] >= 0
        assert row["images_per_s"] == pytest.approx(4 / row["step_time_s"])
        assert row["tflops"] == pytest.approx(row["counted_flops"] / row["step_time_s"] / 1e12)
        if row["kind"] == "method":
            assert row["ratio_to_pgd_at"] == row["ratio"] and row["ratio_to_pgd20"] is None
        else:
            assert row["ratio_to_pgd20"] == row["ratio"] and row["ratio_to_pgd_at"] is None
    skipped = data["rows"][3]
    assert "not implemented" in skipped["note"] and skipped["step_time_s"] is None


def test_pass_counts_are_the_methods_minimums(tiny_result):
    result, _ = tiny_result
    pgd = result.row("method", "pgd-at", "ce")
    assert (pgd.forward_passes, pgd.backward_passes) == (8, 8)  # 7 attack steps + the training loss
    assert pgd.forward_images == 8 * 4
    # ADT-EXP-AM: g1, g2 and the loss pass; TRADES adds the train-mode clean pass.
    am_ce, am_trades = result.row("method", "exp-am", "ce"), result.row("method", "exp-am", "trades")
    assert (am_ce.forward_passes, am_ce.backward_passes) == (3, 3)
    assert (am_trades.forward_passes, am_trades.backward_passes) == (4, 4)
    assert am_ce.module_passes == {"generator": {"forward": 1, "backward": 1}}
    fgsm = result.row("attack", "fgsm")
    assert (fgsm.forward_passes, fgsm.backward_passes) == (2, 1)  # one step + the verdict pass
    assert result.row("attack", "pgd20").forward_passes == 21


def test_cost_model(tiny_result):
    result, data = tiny_result
    pgd = result.row("method", "pgd-at", "ce")
    assert pgd.predicted_ratio == 1.0 and result.row("attack", "pgd20").predicted_ratio == 1.0
    # The pass-count model must account for every FLOP of the step counted directly: a
    # pass logged with the wrong backward kind, or a generator call it missed, breaks this.
    for row in result.rows:
        if row.status == "ok":
            assert row.predicted_flops == pytest.approx(row.counted_flops, rel=1e-9), row.name
    # pgd-at from first principles: 7 × (forward + input-only backward) + forward + weight backward
    # (the training pass's input x' is detached, so its first layer needs no input gradient).
    gf = data["classifier_gflop_per_image"]
    input_step = gf["forward_input_backward"] * 1e9 * 4
    assert pgd.predicted_flops_by_module["classifier"] < 7 * input_step + gf["forward_full_backward"] * 1e9 * 4
    assert pgd.predicted_flops_by_module["classifier"] > 7 * input_step + gf["forward"] * 1e9 * 4
    am = result.row("method", "exp-am", "ce")
    assert set(am.predicted_flops_by_module) == {"classifier", "generator"}
    assert am.predicted_ratio == pytest.approx(am.predicted_flops / pgd.predicted_flops)
    assert am.predicted_flops_by_module["generator"] > 0


def test_last_layer_scope_benchmarks_the_frozen_body(tiny_result):
    """--set scope=last-layer times what the trainer does then: no weight gradients for the body."""
    full, data = tiny_result
    result = run_benchmark(TINY, dataset="fashion-mnist", methods=["pgd-at", "exp-am"], losses=["ce"], attacks=[],
                           batch_size=4, steps=1, arch_kwargs=TINY_KWARGS,
                           config_overrides={**NARROW_GENERATOR, "scope": "last-layer"}, strict=True)
    assert result.meta["config_overrides"]["scope"] == "last-layer"
    gf = data["classifier_gflop_per_image"]
    for name in ("pgd-at", "exp-am"):
        row, full_row = result.row("method", name, "ce"), full.row("method", name, "ce")
        assert row.predicted_flops == pytest.approx(row.counted_flops, rel=1e-9)
        assert row.predicted_flops < full_row.predicted_flops
    # pgd-at: the 7 attack steps are unchanged; the training pass's backward reaches the head only.
    pgd = result.row("method", "pgd-at", "ce").predicted_flops_by_module["classifier"]
    input_step = gf["forward_input_backward"] * 1e9 * 4
    assert 7 * input_step + gf["forward"] * 1e9 * 4 <= pgd < 7 * input_step + 1.05 * gf["forward"] * 1e9 * 4


def test_bf16_channels_last_cli_run(cli, tmp_path):
    out = tmp_path / "ws" / "b.json"
    (tmp_path / "ws").mkdir()
    code, stdout, stderr = cli("bench", "--arch", TINY, "--arch-kwargs", json.dumps(TINY_KWARGS),
                               "--methods", "pgd-at", "--attacks", "none", "--batch-size", "2", "--steps", "1",
                               "--dtype", "bf16", "--channels-last", "--json", "b.json", "-w", tmp_path / "ws")
    assert code == 0, stderr  # a relative --json lies in the workspace
    assert "pgd-at" in stdout and "ms/step" in stdout and "ratio÷pred." in stdout and "+MB" in stdout
    data = json.loads(out.read_text())
    assert data["dtype"] == "bf16" and data["channels_last"] is True and data["dataset"] == "fashion-mnist"
    assert [(r["name"], r["status"]) for r in data["rows"]] == [("pgd-at", "ok")]
    assert data["rows"][0]["forward_passes"] == 8


@pytest.mark.parametrize("args, words", [
    (["--methods", "pgd-at,nosuch"], "unknown method 'nosuch'"),
    (["--attacks", "nosuch"], "unknown attack 'nosuch'"),
    (["--dtype", "fp16"], "fp16 needs a CUDA device"),
    (["--dtype", "int8"], "unknown dtype"),
    (["--arch", "NoSuchModel2099"], "NoSuchModel2099"),
    (["--arch", "adt_finetune.models.nosuch:Net"], "cannot import"),
    (["--set", "no_such_setting=1"], "no_such_setting"),
    (["--set", "gen_width"], "KEY=VALUE"),
    (["--set", "gen_width=abc"], "gen_width must be a whole number, got 'abc'"),
    (["--set", "exp_lr=fast"], "exp_lr must be a number"),
    (["--set", "method=exp"], "chosen by the benchmark"),
    (["--losses", "hinge"], "unknown loss 'hinge'"),
    (["--batch-size", "0"], "--batch-size"),
    (["--steps", "0"], "--steps"),
    (["--arch-kwargs", "{width: 4"], "not JSON"),
    (["--arch-kwargs", "[4]"], "must be a JSON object"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "meta"], "runs on cpu or cuda"),
    (["--dataset", "mnist3d"], "unknown dataset"),
])
def test_bad_input_is_one_line_exit_2(cli, args, words):
    code, stdout, stderr = cli("bench", *args)
    assert code == 2
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and words in lines[0], stderr


def test_arch_that_does_not_fit_the_dataset_is_a_user_error():
    with pytest.raises(UserError, match="outputs"):
        run_benchmark(TINY, dataset="cifar100", arch_kwargs={"width": 4, "num_classes": 10}, methods=["pgd-at"],
                      attacks=[], batch_size=2, steps=1)


def test_failing_items_become_rows_and_the_run_goes_on(monkeypatch):
    from adt_finetune.methods import METHODS, TrainMethod

    class Boom(TrainMethod):
        def step(self, model, x, y):
            raise RuntimeError("boom [in the step]")

    class Unfinished(TrainMethod):
        def step(self, model, x, y):
            raise NotImplementedError

    # The registry refuses overwrites; the test swaps entries underneath it.
    monkeypatch.setitem(METHODS._items, "wdat", Boom)
    monkeypatch.setitem(METHODS._items, "imp-am", Unfinished)
    result = run_benchmark(TINY, dataset="fashion-mnist", methods=["wdat", "imp-am"], losses=["ce"], attacks=[],
                           batch_size=2, steps=1, arch_kwargs=TINY_KWARGS)
    assert [(r.name, r.status) for r in result.rows] == [("pgd-at", "ok"), ("wdat", "error"), ("imp-am", "skipped")]
    assert result.rows[1].note == "RuntimeError: boom [in the step]" and result.rows[1].ratio is None
    assert result.rows[0].ratio == 1.0
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(bench_table(result))
    assert "boom [in the step]" in console.export_text()  # notes are shown as text, not read as markup
    with pytest.raises(RuntimeError, match="boom"):
        run_benchmark(TINY, dataset="fashion-mnist", methods=["wdat"], losses=["ce"], attacks=[], batch_size=2,
                      steps=1, arch_kwargs=TINY_KWARGS, strict=True)
