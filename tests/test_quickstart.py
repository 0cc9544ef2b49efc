"""The embedded default end to end, at a reduced budget: real Fashion-MNIST, offline."""
import json

from adt_finetune.quickstart import QuickstartSettings, quickstart
from adt_finetune.workspace import Workspace


def test_quickstart_pipeline_raises_robust_accuracy(tmp_path):
    s = QuickstartSettings(width=16, pretrain_images=4000, pretrain_epochs=2, finetune_images=2048,
                           finetune_epochs=1, n_examples=200)
    res = quickstart(tmp_path, settings=s, progress=False, log=lambda m: None)
    ws = Workspace(tmp_path)
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
