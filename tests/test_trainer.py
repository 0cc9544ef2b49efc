"""The shared trainer: run directories, last-layer scope, exact resume, recipes, the CLI's bad input."""
import json
import math
import signal
from dataclasses import replace

import pytest
import torch

from adt_finetune.perturb.linf import sign_gradient_ascent
from adt_finetune.config import TrainConfig, list_recipes
from adt_finetune.errors import UserError
from adt_finetune.models import SmallCNN
from adt_finetune.run_folder import list_runs, load_run
from adt_finetune.training import _SeededAugmentation, build_config, lr_at, train
from adt_finetune.workspace import Workspace

ARCH = "adt_finetune.models.small:SmallCNN"


def _workspace(root, model=None, name="base"):
    """A workspace whose current model is a SmallCNN(width=16) (random weights unless given)."""
    from adt_finetune.zoo import register_model

    if model is None:
        torch.manual_seed(1)
        model = SmallCNN(width=16)
    register_model(model, name=name, arch=ARCH, arch_kwargs={"width": 16}, dataset="fashion-mnist", workspace=root)
    return root


def _small(**kw):
    base = dict(method="pgd-at", loss="ce", epochs=1, train_subset=128, batch_size=64, pgd_steps=2, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_run_directory_contents(tmp_path):
    ws = _workspace(tmp_path)
    result = train(_small(epochs=2), workspace=ws)
    run = result.path
    assert run.parent == tmp_path / "runs"
    assert {p.name for p in run.iterdir()} >= {"run.json", "metrics.jsonl", "checkpoint.pt", "model.pt"}
    assert not (run / "generator.pt").exists()  # pgd-at has no networks of its own

    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "finished" and meta["epochs_done"] == 2
    assert meta["eps"] == pytest.approx(0.1) and meta["eps_str"] == "0.1"
    assert meta["config"]["lr"] == 0.01  # the full-scope default, filled in
    assert meta["config"]["step_size"] == pytest.approx(0.025)  # ε/4
    assert meta["base_model"]["name"] == "base" and meta["model"]["source"] == "run"
    assert meta["model"]["arch_kwargs"] == {"width": 16}
    assert len(meta["time_per_epoch_s"]) == 2 and meta["versions"]["torch"] and meta["device"] == "cpu"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert all(r["steps"] == 2 and 0 <= r["adv_acc"] <= 1 and r["loss"] > 0 for r in lines)
    assert lines[1]["lr"] < lines[0]["lr"]  # cosine

    # model.pt is a plain state dict that RobustBench-style code loads, equal to the returned model.
    plain = SmallCNN(width=16)
    plain.load_state_dict(torch.load(run / "model.pt"))
    for k, v in result.model.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k

    info = load_run(None, ws)  # the latest run
    assert info.path == run and info.finished and info.model.path == str(run / "model.pt")
    assert [r.id for r in list_runs(ws)] == [result.run_id]
    from adt_finetune.zoo import model_from_ref

    rebuilt = model_from_ref(info.model)
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in plain.state_dict().items())


def test_last_layer_scope_trains_only_the_head(tmp_path):
    torch.manual_seed(2)
    base = SmallCNN(width=16)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so "untouched" is a real check
        for m in base.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ws = _workspace(tmp_path, base)
    result = train(_small(scope="last-layer"), workspace=ws)
    after = result.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}
    assert json.loads((result.path / "run.json").read_text())["config"]["lr"] == 0.1  # last-layer default


def test_head_reinit_is_seeded_and_fresh(tmp_path):
    ws = _workspace(tmp_path)
    base = Workspace(ws).current_model()
    runs = [train(_small(head_init="reinit", scope="last-layer", lr=1e-12, run_name=f"r{i}"), workspace=ws)
            for i in range(2)]
    original = torch.load(base.path)
    w0, w1 = runs[0].model.fc.weight, runs[1].model.fc.weight
    assert torch.allclose(w0, w1)  # same seed, same fresh head (lr ~ 0: only the init is visible)
    assert not torch.allclose(w0, original["fc.weight"], atol=1e-3)


def _interrupt_at(step):
    def hook(global_step):
        if global_step == step:
            raise KeyboardInterrupt

    return hook


def _sigint_at(step):
    """A real Ctrl-C arriving during step `step`'s bookkeeping: the trainer's handler must
    let the step finish, checkpoint, and only then stop."""
    def hook(global_step):
        if global_step == step:
            signal.raise_signal(signal.SIGINT)

    return hook


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs after resume"


def test_resume_after_interrupt_mid_epoch_is_exact(tmp_path):
    ws = _workspace(tmp_path)
    # 3 steps per epoch, 2 epochs; TRADES draws its random start from the global RNG and BatchNorm
    # trains, so the RNG and the running statistics both have to be restored exactly.
    cfg = _small(method="trades", loss="trades", trades_steps=2, epochs=2, train_subset=192, head_init="reinit")
    straight = train(replace(cfg, run_name="straight"), workspace=ws)

    with pytest.raises(KeyboardInterrupt):
        train(replace(cfg, run_name="stopped"), workspace=ws, on_step=_sigint_at(4))
    position = torch.load(tmp_path / "runs" / "stopped" / "checkpoint.pt", weights_only=True)["position"]
    assert (position["epoch"], position["step_in_epoch"], position["global_step"]) == (1, 1, 4)  # mid epoch 2
    stopped = load_run("stopped", ws, require_finished=False)
    assert not stopped.finished and stopped.meta["status"] == "running"
    with pytest.raises(UserError, match="no final model"):
        load_run("stopped", ws)
    resumed = train(workspace=ws, resume=True)  # latest run
    assert resumed.run_id == "stopped"
    _assert_same_weights(straight.model, resumed.model)
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in straight.history], rel=1e-6)
    assert len(load_run("stopped", ws).metrics()) == 2


def test_resume_after_crash_from_periodic_checkpoint_with_generator(tmp_path):
    """A process killed mid-epoch (no chance to save) resumes from its last step checkpoint;
    exp-am's generator, its Adam state and BatchNorm statistics come back with it."""
    ws = _workspace(tmp_path)
    common = dict(method="exp-am", epochs=2, train_subset=192, gen_width=4, checkpoint_every=2)
    straight = train(_small(run_name="straight", **common), workspace=ws)

    def crash(step):
        if step == 5:
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        train(_small(run_name="crashed", **common), workspace=ws, on_step=crash)
    resumed = train(workspace=ws, resume="crashed")
    _assert_same_weights(straight.model, resumed.model)
    gen_a = torch.load(straight.path / "generator.pt", weights_only=True)
    gen_b = torch.load(resumed.path / "generator.pt", weights_only=True)
    for k, v in gen_a["state_dict"].items():
        assert torch.equal(v, gen_b["state_dict"][k]), k
    assert load_run("crashed", ws).generator_path == resumed.path / "generator.pt"


def test_resume_refuses_finished_run_and_missing_run(tmp_path):
    ws = _workspace(tmp_path)
    with pytest.raises(UserError, match="nothing to resume"):
        train(workspace=ws, resume=True)
    train(_small(run_name="done", max_steps=1), workspace=ws)
    with pytest.raises(UserError, match="already finished"):
        train(workspace=ws, resume="done")


def test_scratch_model_records_its_initial_weights(tmp_path):
    cfg = _small(model="scratch", arch=ARCH, arch_kwargs={"width": 8}, dataset="fashion-mnist", max_steps=1)
    result = train(cfg, workspace=tmp_path)
    info = load_run(result.run_id, tmp_path)
    assert info.base_model.source == "scratch" and info.base_model.path == str(result.path / "init.pt")
    from adt_finetune.zoo import model_from_ref

    init = model_from_ref(info.base_model).state_dict()
    torch.manual_seed(cfg.seed)  # the run seeds before building, so the same draw reproduces it
    expected = SmallCNN(width=8).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in init.items())
    assert not torch.equal(init["fc.weight"], result.model.state_dict()["fc.weight"])


def test_max_steps_stops_mid_epoch_and_finishes(tmp_path):
    ws = _workspace(tmp_path)
    result = train(_small(max_steps=1, train_subset=192), workspace=ws)
    meta = load_run(result.run_id, ws).meta
    assert meta["status"] == "finished" and meta["stopped_early"] and meta["epochs_done"] == 0
    assert result.history[0]["steps"] == 1 and result.history[0]["partial"]


def test_amp_runs_the_method_under_bf16_autocast(tmp_path, monkeypatch):
    from adt_finetune.methods.baselines import PGDAT

    seen = []
    original = PGDAT.step

    def spy(self, model, x, y):
        out = original(self, model, x, y)
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return out

    monkeypatch.setattr(PGDAT, "step", spy)
    ws = _workspace(tmp_path)
    result = train(_small(amp=True, max_steps=1), workspace=ws)
    assert seen == [(True, torch.bfloat16)]
    assert math.isfinite(result.final_metrics["loss"])
    assert all(v.dtype == torch.float32 for k, v in result.model.state_dict().items() if v.is_floating_point())


def test_lr_schedules():
    cfg = TrainConfig(lr=0.1, epochs=4, schedule="cosine")
    assert lr_at(cfg, 0, 10) == pytest.approx(0.1)
    assert lr_at(cfg, 20, 10) == pytest.approx(0.05)
    assert lr_at(cfg, 39, 10) < 0.001
    # Milestones are 1-based epochs: [2, 3] decays in the 2nd and again in the 3rd epoch.
    step = TrainConfig(lr=0.1, epochs=4, schedule="step", milestones=[2, 3], gamma=0.1)
    assert [lr_at(step, s, 10) for s in (0, 9, 10, 20, 39)] == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.001])


def test_seeded_augmentation_ignores_order_and_global_rng():
    from torchvision import transforms as T

    images = torch.rand(6, 3, 8, 8)

    class Crops(torch.utils.data.Dataset):
        crop = T.RandomCrop(8, padding=2)

        def __len__(self):
            return 6

        def __getitem__(self, i):
            return self.crop(images[i]), 0

    ds = _SeededAugmentation(Crops(), seed=3)
    forward = [ds[i][0] for i in range(6)]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    backward = [ds[i][0] for i in reversed(range(6))][::-1]
    assert torch.equal(torch.get_rng_state(), state)  # loading data leaves training's RNG alone
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    assert any(not torch.equal(a, images[i]) for i, a in enumerate(forward))  # it does augment
    ds.epoch = 1
    assert any(not torch.equal(a, ds[i][0]) for i, a in enumerate(forward))  # a new draw each epoch


def test_recipe_then_flags_precedence(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.yaml").write_text(
        "description: a test recipe\nmethod: pgd-at\nepochs: 3\nlr: 0.05\nbatch_size: 32\neps: 0.05\n")
    cfg = build_config("mine", {"epochs": 1, "batch_size": None}, workspace=tmp_path)
    assert (cfg.method, cfg.epochs, cfg.lr, cfg.batch_size, cfg.eps) == ("pgd-at", 1, 0.05, 32, "0.05")
    assert cfg.recipe == "mine" and cfg.momentum == 0.9  # untouched fields keep TrainConfig's defaults
    (tmp_path / "recipes" / "typo.yaml").write_text("epochs: three\n")
    with pytest.raises(UserError, match="epochs must be a whole number"):
        build_config("typo", workspace=tmp_path)


def test_shipped_recipes_parse_and_list():
    recipes = {name: desc for name, desc, _ in list_recipes()}
    for name in ("paper-cifar10-exp", "paper-cifar10-exp-am", "paper-cifar10-imp-am", "paper-cifar10-exp-am-trades",
                 "zhang2019-finetune-last-layer", "zhang2019-finetune-full"):
        assert recipes.get(name), f"recipe {name} missing or without description"
    for name in recipes:
        build_config(name)
    paper = build_config("paper-cifar10-exp-am")
    assert (paper.epochs, paper.lr, paper.milestones, paper.batch_size, paper.schedule) == (76, 0.1, [75], 64, "step")
    assert build_config("paper-cifar10-imp-am-trades").beta == 6.0
    last = build_config("zhang2019-finetune-last-layer")
    assert (last.model, last.scope, last.lr, last.epochs, last.schedule) == ("Zhang2019Theoretically", "last-layer",
                                                                             0.1, 20, "cosine")
    assert build_config("zhang2019-finetune-full").lr == 0.01


# ---------------------------------------------------------------- CLI

def test_cli_train_end_to_end_with_recipe_and_flags(tmp_path, cli):
    ws = _workspace(tmp_path)
    (tmp_path / "r.yaml").write_text("method: trades\nepochs: 5\nlr: 0.02\ntrades_steps: 1\nbatch_size: 32\n")
    code, out, err = cli("train", "--recipe", tmp_path / "r.yaml", "--epochs", "1", "--train-subset", "64",
                         "--max-steps", "1", "--milestones", "1,2", "--device", "cpu", "--workspace", ws)
    assert code == 0, err
    meta = load_run(None, ws).meta
    cfg = meta["config"]
    assert (cfg["epochs"], cfg["lr"], cfg["batch_size"], cfg["loss"], cfg["milestones"]) == (1, 0.02, 32, "trades",
                                                                                          [1, 2])
    assert meta["recipe"].endswith("r.yaml") and "finished" in out


def test_cli_resume_continues_latest_run(tmp_path, cli):
    ws = _workspace(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(_small(run_name="cut", train_subset=192), workspace=ws, on_step=_interrupt_at(1))
    code, out, err = cli("train", "--resume", "--device", "cpu", "--workspace", ws)
    assert code == 0, err
    assert "resuming at epoch 1, step 1 of 3" in out
    assert load_run("cut", ws).finished


def test_cli_lists_recipes(cli, tmp_path):
    code, out, _ = cli("recipes", "--workspace", tmp_path)
    assert code == 0
    line = next(text for text in out.splitlines() if text.startswith("zhang2019-finetune-full"))
    assert "Zhang2019Theoretically" in line


def test_every_config_field_is_an_option():
    import typer

    from adt_finetune.cli import app
    from adt_finetune.config import TrainConfig as TC

    command = typer.main.get_command(app).commands["train"]
    flags = {opt for p in command.params for opt in p.opts}
    missing = [f for f in TC.field_names() if "--" + f.replace("_", "-") not in flags]
    assert not missing and "--resume" in flags


@pytest.mark.parametrize("args,needle", [
    (["--method", "magic"], "unknown method 'magic'"),
    (["--method", "exp-am", "--loss", "hinge"], "unknown loss 'hinge'"),
    (["--method", "pgd-at", "--loss", "trades"], "--loss trades does not apply to --method pgd-at"),
    (["--method", "trades", "--loss", "ce"], "--loss ce does not apply to --method trades"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--epochs", "-3"], "--epochs must be positive"),
    (["--eps", "eight"], "cannot parse ε"),
    (["--recipe", "RECIPE"], "unknown key 'learning_rate'"),
    (["--resume"], "nothing to resume"),
    (["--resume", "--lr", "0.1"], "drop --lr"),
    (["stray"], "only taken after --resume"),
    (["--milestones", "a,b"], "--milestones 'a,b' does not parse"),
    ([], "no current model"),
])
def test_cli_bad_input_is_one_line_exit_2(args, needle, tmp_path, cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    args = [str(bad) if a == "RECIPE" else a for a in args]
    code, out, err = cli("train", *args, "--workspace", tmp_path)
    assert code == 2, (out, err)
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# ---------------------------------------------------------------- learning

def test_pgd_at_finetuning_raises_pgd_accuracy(tmp_path, trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:300], fmnist_test[1][:300]

    def pgd10_acc(model):
        model.eval()
        x_adv = sign_gradient_ascent(model, x, y, eps=0.1, step_size=0.025, steps=10,
                                     generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return (model(x_adv).argmax(1) == y).float().mean().item(), (model(x).argmax(1) == y).float().mean().item()

    before, clean_before = pgd10_acc(trained_cnn)
    ws = _workspace(tmp_path, trained_cnn)
    result = train(_small(pgd_steps=5, train_subset=1000, batch_size=100, epochs=1, lr=0.05), workspace=ws)
    after, clean_after = pgd10_acc(result.model)
    assert after > before + 0.15, (f"PGD-10 accuracy {before:.1%} before, {after:.1%} after PGD-AT fine-tuning "
                                   f"(clean {clean_before:.1%} -> {clean_after:.1%})")


# ---------------------------------------------------------------- one rule for method × loss; methods report their own settings

def test_method_loss_rule_lives_with_the_registry():
    from adt_finetune.config import TrainConfig as TC
    from adt_finetune.methods import check_method_loss, default_loss
    from adt_finetune.perturb.exp_distribution import DEFAULT_LAMBDA
    from adt_finetune.training import resolve_loss

    assert default_loss("wdat") == "trades" and default_loss("trades") == "trades" and default_loss("exp-am") == "ce"
    with pytest.raises(UserError, match="`loss` trades does not apply to `method` pgd-at"):
        check_method_loss("pgd-at", "trades")
    with pytest.raises(UserError, match="unknown method 'magic'"):
        check_method_loss("magic", "ce")
    with pytest.raises(UserError, match="unknown loss 'hinge'"):
        resolve_loss(TC(method="exp-am", loss="hinge"))
    assert DEFAULT_LAMBDA == 0.01


def test_methods_record_the_settings_they_resolved(tmp_path):
    """λ and the baselines' attack step are the methods' own defaults; run.json records them."""
    ws = _workspace(tmp_path)
    exp = train(_small(method="exp", exp_steps=1, exp_samples=1, max_steps=1, run_name="exp"), workspace=ws)
    assert load_run(exp.run_id, ws).meta["config"]["adt_lambda"] == 0.01
    pgd = train(_small(max_steps=1, run_name="pgd", eps="0.2"), workspace=ws)
    cfg = load_run(pgd.run_id, ws).meta["config"]
    assert cfg["step_size"] == pytest.approx(0.05) and cfg["adt_lambda"] is None


# ---------------------------------------------------------------- epoch diagnostics (the method hook)

def _probe_diagnostics(calls):
    """A PGD-AT epoch_diagnostics that records what it sees and draws from the global RNG."""
    def epoch_diagnostics(self, model, x, y):
        calls.append({"n": len(x), "sum": float(x.sum()), "modes": {m.training for m in model.modules()}})
        torch.rand(1000)  # must not shift training's RNG stream
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).float().mean().item()  # eval mode: BatchNorm statistics stay
        return {"probe_acc": acc, "probe_sum": float(x.sum())}

    return epoch_diagnostics


def test_epoch_diagnostics_are_recorded_and_change_nothing(tmp_path, monkeypatch):
    from adt_finetune.data import as_tensors, load_dataset
    from adt_finetune.methods.baselines import TRADES

    ws = _workspace(tmp_path)
    cfg = _small(method="trades", loss="trades", trades_steps=1, epochs=2, train_subset=192)
    plain = train(replace(cfg, run_name="plain"), workspace=ws)
    calls = []
    monkeypatch.setattr(TRADES, "epoch_diagnostics", _probe_diagnostics(calls), raising=False)
    measured = train(replace(cfg, run_name="measured"), workspace=ws)
    _assert_same_weights(plain.model, measured.model)  # no RNG draw and no BatchNorm update leaked into training

    x_probe, _ = as_tensors(load_dataset("fashion-mnist", "train", augment=False), 64)
    assert [c["n"] for c in calls] == [64, 64] and calls[0]["sum"] == calls[1]["sum"] == pytest.approx(
        float(x_probe.sum()))
    assert all(c["modes"] == {False} for c in calls)
    lines = [json.loads(line) for line in (measured.path / "metrics.jsonl").read_text().splitlines()]
    assert [set(r["diagnostics"]) for r in lines] == [{"probe_acc", "probe_sum"}] * 2
    meta = load_run("measured", ws).meta
    assert meta["diagnostics"] == [r["diagnostics"] for r in lines]
    assert "probe_acc" not in measured.final_metrics and measured.history[1]["diagnostics"] == lines[1]["diagnostics"]

    # Resumed mid-epoch, the run and its diagnostics are those of the uninterrupted one.
    with pytest.raises(KeyboardInterrupt):
        train(replace(cfg, run_name="cut"), workspace=ws, on_step=_interrupt_at(4))
    resumed = train(workspace=ws, resume="cut")
    _assert_same_weights(measured.model, resumed.model)
    assert [r["diagnostics"] for r in resumed.history] == [r["diagnostics"] for r in measured.history]


def test_cli_summary_shows_diagnostics(tmp_path, cli, monkeypatch):
    from adt_finetune.methods.baselines import PGDAT

    monkeypatch.setattr(PGDAT, "epoch_diagnostics", _probe_diagnostics([]), raising=False)
    ws = _workspace(tmp_path)
    code, out, err = cli("train", "--method", "pgd-at", "--pgd-steps", "1", "--train-subset", "64", "--epochs", "1",
                         "--device", "cpu", "--no-progress", "--workspace", ws)
    assert code == 0, err
    assert "probe_acc" in out and "probe_sum" in out and "clean acc" in out


# ---------------------------------------------------------------- never keep a broken model

def test_non_finite_weights_stop_the_run_and_keep_the_last_finite_checkpoint(tmp_path, monkeypatch):
    """A BatchNorm statistic that overflows (as `--lr 5` does) leaves the loss finite; the run
    must still stop, and never write the broken weights into a checkpoint or model.pt."""
    from adt_finetune.methods.baselines import PGDAT

    original = PGDAT.step
    steps = []

    def overflowing(self, model, x, y):
        steps.append(1)
        if len(steps) == 4:
            with torch.no_grad():
                model.features[1].running_var.fill_(float("inf"))
        return original(self, model, x, y)

    monkeypatch.setattr(PGDAT, "step", overflowing)
    ws = _workspace(tmp_path)
    with pytest.raises(UserError, match=r"diverged at epoch 1, step 4: .*features\.1\.running_var.* nan/inf") as e:
        train(_small(train_subset=320, checkpoint_every=2, run_name="blowup"), workspace=ws)
    assert "\n" not in str(e.value) and "last finite checkpoint" in str(e.value)
    run = tmp_path / "runs" / "blowup"
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["position"]["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (run / "model.pt").exists() and load_run("blowup", ws, require_finished=False).meta["status"] == "running"


def test_a_negative_batchnorm_variance_at_the_end_is_refused(tmp_path, cli, monkeypatch):
    """running_var = -1 is finite, and train-mode steps use batch statistics, so the epoch's
    accuracies look healthy; the finished model predicts NaN. The run must not report final
    numbers nor hand the model back: one line, exit 2, no model.pt."""
    from adt_finetune.training.run_state import Session

    original = Session.step

    def tampering(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        with torch.no_grad():
            self.model.features[1].running_var.fill_(-1.0)
        return out

    monkeypatch.setattr(Session, "step", tampering)
    ws = _workspace(tmp_path)
    with pytest.raises(UserError, match=r"features\.1\.running_var holds a negative variance"):
        train(_small(run_name="neg"), workspace=ws)
    assert not (tmp_path / "runs" / "neg" / "model.pt").exists()
    code, out, err = cli("train", "--method", "pgd-at", "--pgd-steps", "1", "--train-subset", "64", "--epochs", "1",
                         "--device", "cpu", "--run-name", "neg-cli", "--workspace", ws)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "negative variance" in err and "adv acc" not in out
    assert not (tmp_path / "runs" / "neg-cli" / "model.pt").exists()


def test_cli_resume_from_a_damaged_checkpoint_is_one_line(tmp_path, cli):
    ws = _workspace(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(_small(run_name="cut", train_subset=192), workspace=ws, on_step=_interrupt_at(1))
    ckpt_path = tmp_path / "runs" / "cut" / "checkpoint.pt"
    good = ckpt_path.read_bytes()
    ckpt = torch.load(ckpt_path, weights_only=True)
    nonfinite = dict(ckpt, model={k: v.clone() for k, v in ckpt["model"].items()})
    nonfinite["model"]["fc.bias"][0] = float("nan")
    wrong_keys = dict(ckpt, model={"not." + k: v for k, v in ckpt["model"].items()})
    for damage, needle in [(lambda: ckpt_path.write_bytes(good[: len(good) // 2]), "cannot be read"),
                           (lambda: torch.save(wrong_keys, ckpt_path), "does not fit this run"),
                           (lambda: torch.save({"model": 1}, ckpt_path), "not an adt-ft training checkpoint"),
                           (lambda: torch.save(nonfinite, ckpt_path), "holds nan/inf values (model.fc.bias)")]:
        damage()
        code, out, err = cli("train", "--resume", "cut", "--device", "cpu", "--workspace", ws)
        assert code == 2, (out, err)
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "runs" / "cut" / "model.pt").exists()


def test_cli_runs_folder_that_is_a_file_is_one_line(tmp_path, cli):
    ws = _workspace(tmp_path)
    (tmp_path / "runs").write_text("not a folder")
    for args in (["--max-steps", "1"], ["--resume"]):
        code, out, err = cli("train", *args, "--device", "cpu", "--workspace", ws)
        assert code == 2 and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------- never lose a run

def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_over(tmp_path):
    ws = _workspace(tmp_path)
    cfg = _small(method="trades", loss="trades", trades_steps=1, epochs=1, train_subset=192, head_init="reinit")
    straight = train(replace(cfg, run_name="straight"), workspace=ws)

    def kill(step):
        if step == 2:
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        train(replace(cfg, run_name="early"), workspace=ws, on_step=kill)
    run = tmp_path / "runs" / "early"
    assert not (run / "checkpoint.pt").exists()
    (run / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half a write")  # what a kill -9 mid-write leaves
    resumed = train(workspace=ws, resume=True)
    assert resumed.run_id == "early" and load_run("early", ws).finished
    _assert_same_weights(straight.model, resumed.model)
    assert not list(run.glob(".*.tmp"))


def test_scratch_run_killed_before_its_first_checkpoint_restarts_identically(tmp_path):
    cfg = _small(model="scratch", arch=ARCH, arch_kwargs={"width": 8}, dataset="fashion-mnist", train_subset=128)
    straight = train(replace(cfg, run_name="straight"), workspace=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(replace(cfg, run_name="early"), workspace=tmp_path, on_step=_interrupt_at(1))
    (tmp_path / "runs" / "early" / "checkpoint.pt").unlink()  # as if killed before the checkpoint landed
    resumed = train(workspace=tmp_path, resume="early")
    _assert_same_weights(straight.model, resumed.model)


def test_same_command_takes_over_a_run_folder_left_without_run_json(tmp_path):
    ws = _workspace(tmp_path)
    husk = tmp_path / "runs" / "named"
    husk.mkdir(parents=True)
    (husk / ".run.json.abc.tmp").write_text("{")
    result = train(_small(run_name="named", max_steps=1), workspace=ws)
    assert result.path == husk and load_run("named", ws).finished and not list(husk.glob(".*.tmp"))
    with pytest.raises(UserError, match="already exists"):
        train(_small(run_name="named", max_steps=1), workspace=ws)


def test_run_json_paths_are_relative_so_a_copied_workspace_uses_its_own_files(tmp_path):
    import shutil

    original = tmp_path / "a"
    ws = _workspace(original)
    result = train(_small(max_steps=1, run_name="r"), workspace=ws)
    meta = json.loads((result.path / "run.json").read_text())
    assert meta["model"]["path"] == "runs/r/model.pt"
    assert meta["base_model"]["path"] == "models/fashion-mnist/Linf/base.pt"

    copy = tmp_path / "b"
    shutil.copytree(original, copy)
    torch.save({}, original / "runs" / "r" / "model.pt")  # the original's weights are gone
    (original / "models" / "fashion-mnist" / "Linf" / "base.pt").unlink()
    info = load_run("r", copy)
    assert info.finished and info.model.path == str(copy / "runs" / "r" / "model.pt")
    assert info.base_model.path == str(copy / "models" / "fashion-mnist" / "Linf" / "base.pt")
    from adt_finetune.zoo import model_from_ref

    _assert_same_weights(model_from_ref(info.model), result.model)
    model_from_ref(info.base_model)
    # A run folder read by its path finds its own files, wherever the folder was moved to.
    moved = tmp_path / "elsewhere" / "r-moved"
    shutil.copytree(copy / "runs" / "r", moved)
    assert load_run(moved, tmp_path / "elsewhere").model.path == str(moved / "model.pt")

    # run.json files written before paths were relative still read.
    old = dict(meta, model=dict(meta["model"], path=str(copy / "runs" / "r" / "model.pt")))
    (copy / "runs" / "r" / "run.json").write_text(json.dumps(old))
    assert load_run("r", copy).model.path == str(copy / "runs" / "r" / "model.pt")


# ---------------------------------------------------------------- the command line

@pytest.mark.parametrize("args,needle", [
    (["--lr", "nan"], "--lr nan is not a usable number"),
    (["--lr", "inf"], "--lr inf is not a usable number"),
    (["--lr", "1e39"], "--lr 1e+39 is not a usable number"),
    (["--momentum", "-inf"], "--momentum -inf is not a usable number"),
    (["--gen-betas", "0.5,nan"], "--gen-betas (0.5, nan) is not a usable number"),
    (["--arch-kwargs", "[1]"], "--arch-kwargs must be a JSON object"),
])
def test_cli_unusable_numbers_are_refused_up_front(args, needle, tmp_path, cli):
    ws = _workspace(tmp_path)
    code, out, err = cli("train", *args, "--device", "cpu", "--workspace", ws)
    assert code == 2, (out, err)
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_cli_no_progress_prints_the_summary_without_bars(tmp_path, cli):
    ws = _workspace(tmp_path)
    code, out, err = cli("train", "--no-progress", "--method", "pgd-at", "--pgd-steps", "1", "--max-steps", "1",
                         "--train-subset", "128", "--device", "cpu", "--workspace", ws)
    assert code == 0, err
    assert "epoch 1/" not in err and "━" not in err  # no progress bar
    assert "steps/epoch" in out and "adv acc" in out and "model: " in out and "finished" in out


def test_train_help_shows_every_default():
    import typer

    from adt_finetune.cli import app

    command = typer.main.get_command(app).commands["train"]
    helps = {p.opts[0]: p.help or "" for p in command.params if p.opts and p.opts[0].startswith("--")}
    for flag, text in [("--optimizer", "(default sgd)"), ("--imp-entropy", f"(default {TrainConfig().imp_entropy})"),
                       ("--gen-betas", "(default 0.5,0.999)"), ("--seed", "(default 0)"),
                       ("--train-subset", "Default: all"), ("--gen-lr", "(default 2e-4)"),
                       ("--wdat-steps", "(default 10)"), ("--amp", "(default off)")]:
        assert text in helps[flag], (flag, helps[flag])
    no_default = {"--arch", "--resume", "--workspace", "--progress"}
    missing = [f for f, text in helps.items() if f not in no_default and "default" not in text.lower()]
    assert not missing, missing


def test_cli_resume_of_a_run_with_a_damaged_run_json_is_one_line(tmp_path, cli):
    ws = _workspace(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(_small(run_name="cut", train_subset=192), workspace=ws, on_step=_interrupt_at(1))
    path = tmp_path / "runs" / "cut" / "run.json"
    good = json.loads(path.read_text())
    for damaged, needle in [(dict(good, config=dict(good["config"], epochs="two")), "epochs must be a whole number"),
                            (dict(good, config=[1, 2]), "not a mapping"),
                            (dict(good, base_model=dict(good["base_model"], name=3)), "no valid 'name'")]:
        path.write_text(json.dumps(damaged))
        code, out, err = cli("train", "--resume", "cut", "--device", "cpu", "--workspace", ws)
        assert code == 2, (out, err)
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert list_runs(ws) == []  # a damaged run is left out of listings, not a crash
