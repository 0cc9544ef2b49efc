"""The embedded default end to end, at a reduced budget: real Fashion-MNIST, offline."""
import json

import pytest
import torch

from adt_finetune.progress import Reporter
from adt_finetune.quickstart import QuickstartSettings, _pretrain, quickstart
from adt_finetune.workspace import Workspace


class RecordingReporter(Reporter):
    def __init__(self):
        self.events = []

    def __enter__(self):
        self.events.append(("enter",))
        return self

    def __exit__(self, *exc):
        self.events.append(("exit",))

    def start(self, key, description, total, completed=0, status=""):
        self.events.append(("start", key, total, completed))

    def advance(self, key, n=1, status=None):
        self.events.append(("advance", key, n, status))

    def finish(self, key):
        self.events.append(("finish", key))


@pytest.mark.slow
def test_quickstart_pipeline_raises_robust_accuracy(tmp_path):
    s = QuickstartSettings(width=16, pretrain_images=4000, pretrain_epochs=2, finetune_images=2048,
                           finetune_epochs=1, n_examples=200)
    pretrain_progress = RecordingReporter()
    res = quickstart(tmp_path, settings=s, progress=False, log=lambda m: None, pretrain_reporter=pretrain_progress)
    ws = Workspace(tmp_path)
    # The pretrain stage reports its steps: 4,000 images at batch 128 for 2 epochs.
    assert ("start", "pretrain", 2 * 32, 0) in pretrain_progress.events
    assert sum(e[2] for e in pretrain_progress.events if e[0] == "advance") == 2 * 32
    # pull → train → eval left what each real command leaves.
    assert ws.current_model().name == "quickstart-SmallCNN"
    assert ws.latest_run().name == res.run_id
    assert (ws.latest_run() / "model.pt").exists() and (ws.latest_run() / "generator.pt").exists()
    entry = json.loads(res.record.json_path.read_text())
    assert entry["adt_ft"]["method"] == "exp-am"
    before, after = res.record.baseline, res.record.result
    assert before.n_examples == after.n_examples == 200
    assert after.a_rob > before.a_rob + 10, (
        f"ADT-EXP-AM fine-tuning should raise A_rob (clean, fgsm, pgd20): before {before.a_rob:.1f}%, "
        f"after {after.a_rob:.1f}%")


def test_quickstart_rejects_nonpositive_budget(cli, tmp_path):
    code, out, err = cli("quickstart", "--epochs", "0", "-w", tmp_path)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "epochs" in err and "Traceback" not in err
    assert not (tmp_path / "models").exists()


def test_pretrain_reports_progress_per_step_without_changing_the_model(tmp_path):
    # 300 images at batch 128: 3 steps per epoch (the last one short), 2 epochs.
    s = QuickstartSettings(width=8, pretrain_images=300, pretrain_epochs=2)
    rec = RecordingReporter()
    lines = []
    model = _pretrain(s, None, tmp_path, lines.append, rec)
    kinds = [e[0] for e in rec.events]
    assert kinds[0] == "enter" and kinds[1] == "start" and kinds[-2:] == ["finish", "exit"]
    assert rec.events[1] == ("start", "pretrain", 6, 0)
    advances = [e for e in rec.events if e[0] == "advance"]
    assert len(advances) == 6 and all(e[1] == "pretrain" and e[2] == 1 for e in advances)
    assert "epoch 1/2" in advances[0][3] and "epoch 2/2" in advances[-1][3] and "loss" in advances[-1][3]
    # The log lines (stdout in the CLI) are the ones a silent run prints, and progress changes no weight.
    silent_lines = []
    silent = _pretrain(s, None, tmp_path, silent_lines.append)
    assert lines == silent_lines and len(lines) == 2
    for (k, a), b in zip(model.state_dict().items(), silent.state_dict().values()):
        assert torch.equal(a, b), k
