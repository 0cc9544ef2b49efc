"""The corruptions suite: CIFAR-10-C's published .npy layout (written small, in the test), RobustBench's
numbers (accuracy per corruption × severity, the mean of the 75), the entry under <dataset>/corruptions/,
bad files refused in one line, and a zoo corruptions model evaluated end to end through the CLI."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from adt_finetune.errors import UserError
from adt_finetune.evaluation import CORRUPTIONS, SEVERITIES, corruption_suite, open_corruption_files
from adt_finetune.leaderboard import read_entries, render, write_corruption_entry

M = 12  # images per severity block (the published files hold 10,000)


def write_cifar_c(root: Path, images: dict[str, np.ndarray], labels: np.ndarray, name: str = "CIFAR-10-C") -> Path:
    """`<root>/CIFAR-10-C/<corruption>.npy` (5·M, 32, 32, 3) uint8 and labels.npy (5·M,), as published."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for c, array in images.items():
        np.save(folder / f"{c}.npy", array)
    np.save(folder / "labels.npy", np.tile(labels, len(SEVERITIES)).astype(np.uint8))
    return folder


class PixelOracle(nn.Module):
    """Answers the class written in the first pixel's red value (mod 10): which images it gets right is
    chosen by whoever writes the pixels."""

    def forward(self, x):
        cls = torch.round(x[:, 0, 0, 0] * 255).long() % 10
        return nn.functional.one_hot(cls, 10).float()


def _known_files(root: Path, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random images whose first pixel makes PixelOracle right exactly where `correct` (M, 15, 5) is True."""
    labels = rng.integers(0, 10, size=M)
    correct = rng.random((M, len(CORRUPTIONS), len(SEVERITIES))) < rng.random((1, len(CORRUPTIONS), 1))
    images = {}
    for k, c in enumerate(CORRUPTIONS):
        array = rng.integers(0, 256, size=(len(SEVERITIES) * M, 32, 32, 3), dtype=np.uint8)
        for j in range(len(SEVERITIES)):
            answer = np.where(correct[:, k, j], labels, (labels + 1 + rng.integers(0, 9, size=M)) % 10)
            array[j * M:(j + 1) * M, 0, 0, 0] = answer + 10 * rng.integers(0, 20, size=M)
        images[c] = array
    write_cifar_c(root, images, labels)
    return labels, correct


def test_accuracies_per_corruption_and_severity_and_the_mean_are_robustbenchs(tmp_path):
    """Known by construction: the model is right exactly on the chosen images of each cell, so each cell's
    accuracy, each corruption's mean and the mean of the 75 cells are computed here by hand."""
    labels, correct = _known_files(tmp_path, np.random.default_rng(0))
    n = 10
    files = open_corruption_files("cifar10", tmp_path, 10)
    r = corruption_suite(PixelOracle(), files, n, batch_size=4)
    want = correct[:n]
    for k, c in enumerate(CORRUPTIONS):
        for j, s in enumerate(SEVERITIES):
            assert r.accuracy[c][str(s)] == pytest.approx(100 * want[:, k, j].mean())
        assert r.per_corruption[c] == pytest.approx(100 * want[:, k, :].mean())
    assert r.corruptions_acc == pytest.approx(100 * np.mean([want[:, k, j].mean() for k in range(15) for j in range(5)]))
    assert r.clean is None and r.clean_acc is None
    # The degenerate-model checks still run (on the pooled corrupted images, no clean set here).
    assert {c.name for c in r.sanity} == {"predictions", "above chance"}

    path = write_corruption_entry(r, root=tmp_path / "lb", dataset="cifar10", entry="oracle",
                                  info={"name": "oracle"}, context={"suite": "corruptions"})
    assert path == tmp_path / "lb" / "cifar10" / "corruptions" / "oracle.json"
    entry = json.loads(path.read_text())
    assert entry["corruptions_acc"] == f"{r.corruptions_acc:.2f}" == entry["reported"]
    assert entry["eps"] is None and entry["clean_acc"] is None
    assert entry["adt_ft"]["corruptions"]["fog"]["3"] == pytest.approx(100 * want[:, CORRUPTIONS.index("fog"), 2].mean())
    with open(path.with_name("oracle.per-example.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(row["label"]) for row in rows] == labels[:n].tolist()
    for i, row in enumerate(rows):
        assert row["clean"] == ""
        assert [int(row[f"{c}@{s}"]) for c in CORRUPTIONS for s in SEVERITIES] == want[i].reshape(-1).tolist()
    [read] = read_entries(tmp_path / "lb")
    assert read.threat_model == "corruptions" and read.robust == pytest.approx(float(entry["corruptions_acc"]))


def test_a_broken_model_changes_the_numbers(tmp_path):
    """The same files with a model that is off by one class: every cell is wrong, and the collapsed-model
    check, which still applies to corruptions, marks a constant model unreliable."""
    _known_files(tmp_path, np.random.default_rng(1))
    files = open_corruption_files("cifar10", tmp_path, 10)

    class OffByOne(PixelOracle):
        def forward(self, x):
            return super().forward(x).roll(1, dims=1)

    class Constant(nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0] * 9 + [1.0]]).expand(len(x), 10)

    # By hand: right where the written class + 1 is the label (a wrong answer written as label − 1).
    pixel = np.stack([files.arrays[c][:, 0, 0, 0].reshape(5, M) for c in CORRUPTIONS]) % 10
    by_hand = 100 * np.mean((pixel + 1) % 10 == files.labels)
    r = corruption_suite(OffByOne(), files, M)
    assert r.corruptions_acc == pytest.approx(by_hand) and r.corruptions_acc < 20
    assert corruption_suite(PixelOracle(), files, M).corruptions_acc > r.corruptions_acc + 20
    constant = corruption_suite(Constant(), files, M)
    assert constant.unreliable and any(c.name == "predictions" and c.ok is False for c in constant.sanity)


def test_ranked_by_mean_corruption_accuracy_on_the_leaderboard(tmp_path):
    _known_files(tmp_path, np.random.default_rng(2))
    files = open_corruption_files("cifar10", tmp_path, 10)
    good = corruption_suite(PixelOracle(), files, M)

    class Worse(PixelOracle):
        def forward(self, x):  # wrong on every image of the first corruption's pixel class 0..4
            out = super().forward(x)
            return torch.where((torch.arange(len(x)) % 2 == 0)[:, None], out.roll(1, dims=1), out)

    worse = corruption_suite(Worse(), files, M)
    assert worse.corruptions_acc < good.corruptions_acc
    for name, r in (("worse", worse), ("good", good)):
        write_corruption_entry(r, root=tmp_path / "lb", dataset="cifar10", entry=name, context={"suite": "corruptions"})
    rows = json.loads(render(read_entries(tmp_path / "lb"), "json"))
    assert [(r["entry"], r["rank_in_group"]) for r in rows] == [("good", 1), ("worse", 2)]
    assert rows[0]["group"] == f"cifar10 / corruptions, n = {M}"
    from adt_finetune.leaderboard.render import CORRUPTIONS_NOTE

    markdown = render(read_entries(tmp_path / "lb"), "markdown")
    assert "| corruptions |" in markdown and CORRUPTIONS_NOTE in markdown
    assert f"| {good.corruptions_acc:.2f} |" in markdown and "°" not in markdown  # no audit applies
    from adt_finetune.publish import build_site

    build_site(read_entries(tmp_path / "lb"), tmp_path / "site")
    page = (tmp_path / "site" / "cifar10" / "corruptions" / "good.html").read_text()
    fog = good.accuracy["fog"]
    assert ("<tr><td>fog</td>" + "".join(f'<td class="num">{fog[str(s)]:.2f}</td>' for s in SEVERITIES)
            + f'<td class="num">{good.per_corruption["fog"]:.2f}</td></tr>') in page
    assert f'<td class="num">{good.corruptions_acc:.2f}</td></tr>' in page


@pytest.mark.parametrize("damage, words", [
    ("missing", "fog.npy is missing"),
    ("labels", "labels.npy is missing"),
    ("dtype", "holds float32 of shape"),
    ("shape", "holds uint8 of shape (60, 28, 28, 3)"),
    ("blocks", "not 5 equal severity blocks"),
    ("sizes", "images per severity but"),
    ("text", "is not a readable NumPy .npy file"),
])
def test_bad_files_are_one_line(tmp_path, damage, words):
    _known_files(tmp_path, np.random.default_rng(3))
    folder = tmp_path / "CIFAR-10-C"
    fog = folder / "fog.npy"
    if damage == "missing":
        fog.unlink()
    elif damage == "labels":
        (folder / "labels.npy").unlink()
    elif damage == "dtype":
        np.save(fog, np.zeros((5 * M, 32, 32, 3), dtype=np.float32))
    elif damage == "shape":
        np.save(fog, np.zeros((5 * M, 28, 28, 3), dtype=np.uint8))
    elif damage == "blocks":
        np.save(fog, np.zeros((5 * M + 1, 32, 32, 3), dtype=np.uint8))
    elif damage == "sizes":
        np.save(fog, np.zeros((5 * (M + 1), 32, 32, 3), dtype=np.uint8))
    else:
        fog.write_text("not an array")
    with pytest.raises(UserError) as e:
        open_corruption_files("cifar10", tmp_path, 10)
    assert words in str(e.value) and "\n" not in str(e.value)


def _zoo_workspace(tmp_path, name="Hendrycks2020AugMix_WRN", threat_model="corruptions"):
    """A workspace whose current model is a zoo model with random weights written where the loader looks."""
    from adt_finetune.workspace import ModelRef, Workspace
    from adt_finetune.zoo import build_architecture

    ws = Workspace(tmp_path / "ws")
    path = ws.model_path("cifar10", threat_model, name)
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(build_architecture(name, "cifar10", threat_model).state_dict(), path)
    ws.set_current_model(ModelRef(name=name, arch=name, dataset="cifar10", threat_model=threat_model, path=str(path)))
    return ws


def test_a_zoo_corruptions_model_evaluates_end_to_end(tmp_path, cli):
    """Hendrycks2020AugMix_WRN (CIFAR-10 corruptions) as the current model, random weights: `eval --suite
    corruptions` on a CIFAR-10-C-layout folder writes leaderboard/cifar10/corruptions/; the board, the site
    and the export take the entry (the export refuses it in one line)."""
    _known_files(tmp_path / "data", np.random.default_rng(4))
    _zoo_workspace(tmp_path)
    code, out, err = cli("eval", "--suite", "corruptions", "--data-dir", tmp_path / "data", "-n", "4",
                         "-w", tmp_path / "ws", "--no-progress")
    assert code == 0, err
    path = tmp_path / "ws" / "leaderboard" / "cifar10" / "corruptions" / "Hendrycks2020AugMix_WRN_corruptions_n4.json"
    entry = json.loads(path.read_text())
    cells = [v for row in entry["adt_ft"]["corruptions"].values() for v in row.values()]
    assert len(cells) == 75 and float(entry["corruptions_acc"]) == pytest.approx(np.mean(cells), abs=0.006)
    assert entry["adt_ft"]["model_threat_model"] == "corruptions" and entry["adt_ft"]["n_examples"] == 4
    assert "mean corruption accuracy" in out and "elastic_transform" in out
    code, out, err = cli("leaderboard", "-w", tmp_path / "ws")
    assert code == 0 and "cifar10 / corruptions, n = 4" in out, err
    code, out, err = cli("leaderboard", "--html", tmp_path / "site", "-w", tmp_path / "ws")
    assert code == 0, err
    page = (tmp_path / "site" / "cifar10" / "corruptions" / f"{path.stem}.html").read_text()
    assert '<table id="corruptions">' in page and "elastic_transform" in page
    assert f'<td class="num">{float(entry["corruptions_acc"]):.2f}</td></tr>' in page  # the means row's corner
    code, out, err = cli("export", path.stem, "--robustbench", tmp_path / "rb", "-w", tmp_path / "ws")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "corruptions entry" in err
    # attacks on it are still refused, in one line
    code, out, err = cli("eval", "--attacks", "fgsm", "-n", "2", "-w", tmp_path / "ws", "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "suite corruptions" in err


def test_missing_file_through_the_cli_is_one_line_exit_2(tmp_path, cli):
    _known_files(tmp_path / "data", np.random.default_rng(5))
    (tmp_path / "data" / "CIFAR-10-C" / "snow.npy").unlink()
    _zoo_workspace(tmp_path)
    code, out, err = cli("eval", "--suite", "corruptions", "--data-dir", tmp_path / "data", "-w", tmp_path / "ws",
                         "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "snow.npy is missing" in err
    assert not (tmp_path / "ws" / "leaderboard").exists()
    code, out, err = cli("eval", "--suite", "corruptions", "--eps", "8/255", "--data-dir", tmp_path / "data",
                         "-w", tmp_path / "ws", "--no-progress")
    assert code == 2 and "--eps has no meaning for the corruptions suite" in err


def test_an_interrupted_evaluation_resumes_after_the_last_finished_pass(tmp_path):
    """Flags are saved after every pass: a rerun with the same resume folder classifies only the passes
    that were not finished, and the numbers are those of an uninterrupted run."""
    _known_files(tmp_path, np.random.default_rng(6))
    files = open_corruption_files("cifar10", tmp_path, 10)

    class Counting(PixelOracle):
        def __init__(self, stop_after=None):
            super().__init__()
            self.calls, self.stop_after = 0, stop_after

        def forward(self, x):
            if self.stop_after is not None and self.calls == self.stop_after:
                raise KeyboardInterrupt
            self.calls += 1
            return super().forward(x)

    with pytest.raises(KeyboardInterrupt):
        corruption_suite(Counting(stop_after=30), files, M, resume_dir=tmp_path / "partial")
    second = Counting()
    resumed = corruption_suite(second, files, M, resume_dir=tmp_path / "partial")
    assert second.calls == 75 - 30
    whole = corruption_suite(PixelOracle(), files, M)
    assert np.array_equal(resumed.flags, whole.flags) and resumed.corruptions_acc == whole.corruptions_acc
    # Other files are another evaluation: the saved passes are not mixed in.
    np.save(tmp_path / "CIFAR-10-C" / "fog.npy", np.zeros((5 * M, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(UserError, match="different model, examples or settings"):
        corruption_suite(PixelOracle(), open_corruption_files("cifar10", tmp_path, 10), M,
                         resume_dir=tmp_path / "partial")


def test_clean_accuracy_of_the_same_images_when_the_clean_test_set_is_there(tmp_path, monkeypatch):
    """With the clean test set in the data folder, the same first n images are classified clean too, and
    the degenerate-model checks use them; labels that are not labels.npy's are refused in one line."""
    from torch.utils.data import TensorDataset

    from adt_finetune.evaluation import EvalRequest, corruption_run

    labels, _ = _known_files(tmp_path / "data", np.random.default_rng(7))
    x = torch.zeros(M, 3, 32, 32)
    right = np.arange(M) % 3 == 0  # the oracle is right on the clean images where the pixel holds the label
    x[:, 0, 0, 0] = torch.from_numpy(np.where(right, labels, (labels + 1) % 10)).float() / 255
    served = {"labels": torch.from_numpy(labels).long()}
    monkeypatch.setattr(corruption_run, "load_dataset", lambda *a, **k: TensorDataset(x, served["labels"]))
    monkeypatch.setattr(corruption_run, "resolve_target", lambda **k: _oracle_target())
    request = EvalRequest(suite="corruptions", data_dir=tmp_path / "data", n_examples=6, workspace=tmp_path / "ws")
    rec = corruption_run.evaluate_corruptions(request)
    assert rec.result.clean_acc == pytest.approx(100 * right[:6].mean())
    assert "test set" in rec.result.clean_note
    assert all("corrupted" not in c.detail for c in rec.result.sanity)  # the checks ran on the clean images
    entry = json.loads(rec.json_path.read_text())
    assert entry["clean_acc"] == f"{100 * right[:6].mean():.2f}"
    served["labels"] = torch.from_numpy((labels + 1) % 10).long()
    with pytest.raises(UserError, match="does not hold the labels of the cifar10 test set"):
        corruption_run.evaluate_corruptions(EvalRequest(suite="corruptions", data_dir=tmp_path / "data",
                                                        workspace=tmp_path / "ws", entry="other"))


def _oracle_target():
    from adt_finetune.evaluation import Target

    return Target("oracle", PixelOracle(), "cifar10", "Linf", {"name": "oracle"}, {"base_model": "oracle"}, "oracle")


def test_an_l2_zoo_model_takes_the_corruptions_suite_and_files_it_under_corruptions(tmp_path, cli):
    _known_files(tmp_path / "data", np.random.default_rng(8))
    _zoo_workspace(tmp_path, "Rice2020Overfitting", "L2")
    code, out, err = cli("eval", "--suite", "corruptions", "--model", "Rice2020Overfitting", "--threat-model", "L2",
                         "--data-dir", tmp_path / "data" / "CIFAR-10-C", "-n", "2", "-w", tmp_path / "ws",
                         "--no-progress", "--entry", "rice")
    assert code == 0, err
    entry = json.loads((tmp_path / "ws" / "leaderboard" / "cifar10" / "corruptions" / "rice.json").read_text())
    assert entry["adt_ft"]["model_threat_model"] == "L2" and entry["adt_ft"]["suite"] == "corruptions"
    assert not (tmp_path / "ws" / "leaderboard" / "cifar10" / "L2").exists()


def make_imagenet_c(root: Path, n: int, rng: np.random.Generator) -> Path:
    """`root/ImageNet-C/<corruption>/<severity>/<synset>/<file>`: the first n images of RobustBench's list
    under their val/ names, small random JPEGs (RobustBench resizes them to 224×224)."""
    from PIL import Image

    from adt_finetune.imagenet_folder import subset_ids

    for c in CORRUPTIONS:
        for s in SEVERITIES:
            for rel in subset_ids()[:n]:
                path = root / "ImageNet-C" / c / str(s) / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)).save(path, format="JPEG")
    return root


def test_imagenet_c_folders_evaluate_into_the_imagenet_corruptions_leaderboard(tmp_path, cli):
    """ImageNet-C's layout with RobustBench's list, a SmallCNN checkpoint for ImageNet: 75 passes of the
    first 2 listed images, resized to 224×224 as RobustBench does; with val/ beside it the clean accuracy
    uses the model's own preprocessing. A missing image is one line naming it."""
    from test_imagenet import CNN_KWARGS, SMALL_CNN, make_imagenet

    from adt_finetune.imagenet_folder import class_index, subset_ids
    from adt_finetune.models.small import SmallCNN

    root = make_imagenet_c(tmp_path / "data", 2, np.random.default_rng(9))
    make_imagenet(root, n=2)
    files = open_corruption_files("imagenet", root, 1000)
    x = files.images("fog", 3, 2)
    assert x.dtype == torch.uint8 and tuple(x.shape) == (2, 3, 224, 224)
    assert files.labels[:2].tolist() == [class_index()[rel.split("/")[0]] for rel in subset_ids()[:2]]
    torch.manual_seed(0)
    torch.save(SmallCNN(**CNN_KWARGS).state_dict(), tmp_path / "cnn.pt")
    args = ["eval", "--suite", "corruptions", "--model", tmp_path / "cnn.pt", "--arch", SMALL_CNN, "--arch-kwargs",
            json.dumps(CNN_KWARGS), "--dataset", "imagenet", "--data-dir", root, "-n", "2", "-w", tmp_path / "ws",
            "--no-progress", "--entry", "tiny"]
    code, out, err = cli(*args)
    assert code == 0, err
    entry = json.loads((tmp_path / "ws" / "leaderboard" / "imagenet" / "corruptions" / "tiny.json").read_text())
    assert len([v for row in entry["adt_ft"]["corruptions"].values() for v in row.values()]) == 75
    assert entry["clean_acc"] is not None and "Res256Crop224" in entry["adt_ft"]["clean_note"]
    (root / "ImageNet-C" / "snow" / "4" / subset_ids()[1]).unlink()
    code, out, err = cli(*args, "--overwrite")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "first missing in snow/4" in err
