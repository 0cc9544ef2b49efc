"""ImageNet in RobustBench's protocol: which images (the first N of its 5,000-image list, in its
order), their labels, the preprocessing (each of RobustBench's, checked against RobustBench's own
transforms and loader), each zoo model's own preprocessing, and `eval --dataset imagenet
--data-dir DIR` end to end into leaderboard/imagenet/Linf/ at ε = 4/255. The images are real
photographs (foolbox's ImageNet samples) reshaped and saved as JPEGs under the listed names."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adt_finetune.data import as_tensors, default_eps, load_dataset
from adt_finetune.errors import UserError
from adt_finetune.evaluation.engine import images_on
from adt_finetune.evaluation.targets import load_examples
from adt_finetune.imagenet_folder import PREPROCESSINGS, class_index, preprocessing, subset_ids

SHAPES = [(512, 384), (300, 450), (512, 512), (333, 500), (400, 260), (260, 400)]  # (width, height)
SMALL_CNN = "adt_finetune.models.small:SmallCNN"
CNN_KWARGS = {"in_channels": 3, "num_classes": 1000, "width": 4}


def make_imagenet(root: Path, n: int = len(SHAPES), all_synsets: bool = False) -> Path:
    """`root/val/<synset>/<file>` holding the first n images of RobustBench's list (one grayscale);
    with `all_synsets`, an (empty) folder for each of the 1,000 synsets as a full val/ has."""
    import importlib.util

    from PIL import Image

    # foolbox's data folder, found without importing foolbox (its import costs seconds)
    photos = sorted((Path(importlib.util.find_spec("foolbox").origin).parent / "data").glob("imagenet_*.jpg"))
    for i, rel in enumerate(subset_ids()[:n]):
        path = root / "val" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(photos[i % len(photos)]).convert("RGB").resize(SHAPES[i % len(SHAPES)])
        (image.convert("L") if i == 1 else image).save(path, format="JPEG", quality=90)
    if all_synsets:
        for synset in class_index():
            (root / "val" / synset).mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    return make_imagenet(tmp_path_factory.mktemp("imagenet"), all_synsets=True)


def test_the_list_is_robustbenchs_and_labels_are_the_sorted_synsets():
    ids, labels = subset_ids(), class_index()
    assert len(ids) == 5000 and len(set(ids)) == 5000
    assert ids[0] == "n09468604/ILSVRC2012_val_00015253.JPEG"
    assert list(labels) == sorted(labels) and list(labels.values()) == list(range(1000))
    assert {rel.split("/")[0] for rel in ids} <= set(labels)


def test_the_first_n_listed_images_in_order_with_their_labels(imagenet_root):
    x, y, source = load_examples("imagenet", n_examples=4, data_dir=imagenet_root)
    assert x.dtype == torch.uint8 and tuple(x.shape) == (4, 3, 224, 224)
    assert y.tolist() == [class_index()[rel.split("/")[0]] for rel in subset_ids()[:4]]
    assert "first 4 of RobustBench's 5000-image ImageNet validation list, Res256Crop224" == source
    # Each image is Resize(256) + CenterCrop(224) + ToTensor of that file, exactly.
    from PIL import Image
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    for i, rel in enumerate(subset_ids()[:4]):
        expected = tf(Image.open(imagenet_root / "val" / rel).convert("RGB"))
        assert torch.equal(images_on(x[i:i + 1], "cpu")[0], expected), rel


def test_images_and_labels_are_robustbenchs_own_loader(imagenet_root):
    """RobustBench's CustomImageFolder on the same folder (every synset folder present, as in a full
    val/): the same images, bit for bit, and the same labels."""
    from adt_finetune.zoo.robustbench_compat import import_robustbench

    import_robustbench()
    from robustbench.data import PREPROCESSINGS as RB
    from robustbench.loaders import CustomImageFolder

    theirs = CustomImageFolder(str(imagenet_root / "val"), RB["BicubicRes256Crop224"])
    x_rb = torch.stack([theirs[i][0] for i in range(len(SHAPES))])
    y_rb = [theirs[i][1] for i in range(len(SHAPES))]
    x, y, _ = load_examples("imagenet", n_examples=len(SHAPES), data_dir=imagenet_root,
                            preprocessing="BicubicRes256Crop224")
    assert torch.equal(images_on(x, "cpu"), x_rb) and y.tolist() == y_rb


@pytest.mark.parametrize("name", sorted(PREPROCESSINGS))
def test_each_named_preprocessing_is_robustbenchs(name, imagenet_root):
    from PIL import Image

    from adt_finetune.zoo.robustbench_compat import import_robustbench

    import_robustbench()
    from robustbench.data import PREPROCESSINGS as RB

    for rel in subset_ids()[:3]:
        image = Image.open(imagenet_root / "val" / rel).convert("RGB")
        ours, theirs = preprocessing(name).transform()(image), RB[name](image)
        assert torch.equal(ours, theirs), (name, rel)
    assert preprocessing(name).size == (288 if name == "Crop288" else 224)


def test_each_zoo_model_gets_its_own_preprocessing():
    """Every loadable ImageNet Linf entry: RobustBench's `preprocessing` field, or for its timm models
    timm's resize-and-crop rule (RobustBench's get_preprocessing builds the same transform)."""
    from adt_finetune.zoo import catalog, eval_preprocessing
    from adt_finetune.zoo.robustbench_compat import import_robustbench, zoo_record

    import_robustbench()
    from robustbench.data import get_preprocessing
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    seen = set()
    for entry in catalog("imagenet", "Linf"):
        if not entry.loadable:
            continue
        prep = eval_preprocessing(entry.name, "imagenet", "Linf")
        if entry.checkpoint == "timm":
            assert prep.name == "BicubicRes224Crop224", entry.name
            if entry.name.endswith("S12"):  # RobustBench builds the timm model to read its config: the smallest
                theirs = get_preprocessing(BenchmarkDataset.imagenet, ThreatModel.Linf, entry.name, None)
                assert repr(prep.transform()) == repr(theirs)
        else:
            assert prep.name == zoo_record(entry.name, "imagenet", "Linf")["preprocessing"], entry.name
        seen.add(prep.name)
    assert seen == {"Res256Crop224", "BicubicRes256Crop224", "Res224", "Crop288", "BicubicRes224Crop224"}
    assert eval_preprocessing(SMALL_CNN, "imagenet").name == "Res256Crop224"
    assert eval_preprocessing("Zhang2019Theoretically", "cifar10") is None


def test_default_eps_and_a_missing_image_or_folder(tmp_path):
    assert default_eps("imagenet") == 4 / 255
    make_imagenet(tmp_path / "d", n=2)
    third = subset_ids()[2]
    with pytest.raises(UserError, match=rf"lacks 1 of the first 3 images .*first missing: {third}\)") as e:
        load_examples("imagenet", n_examples=3, data_dir=tmp_path / "d")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"ImageNet is not on this machine \(searched .*nowhere"):
        load_dataset("imagenet", data_dir=tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"1 to 5000"):
        load_examples("imagenet", n_examples=5001, data_dir=tmp_path / "d")
    with pytest.raises(UserError, match="ImageNet synset folders"):
        load_examples("imagenet", str(tmp_path / "d" / "val"), n_examples=2)


def test_compact_storage_is_exact_and_refuses_other_values():
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8).float().div(255)
    ds = torch.utils.data.TensorDataset(x, torch.tensor([1, 2]))
    u8, _ = as_tensors(ds, compact=True)
    assert u8.dtype == torch.uint8 and torch.equal(images_on(u8, "cpu"), x)
    with pytest.raises(ValueError, match="8-bit"):
        as_tensors(torch.utils.data.TensorDataset(x + 0.001, torch.tensor([1, 2])), compact=True)


def _memorising_cnn(root: Path, n: int, path: Path) -> None:
    """A SmallCNN (3 → 1000 classes, 224²) whose head is fitted to the first n listed images, so that
    attacks have clean-correct images to work on (the features stay random: one forward pass at 224²)."""
    from adt_finetune.models.small import SmallCNN

    x, y, _ = load_examples("imagenet", n_examples=n, data_dir=root)
    torch.manual_seed(0)
    model = SmallCNN(**CNN_KWARGS).eval()
    with torch.no_grad():
        features = model.features(images_on(x, "cpu"))
    head = torch.nn.Sequential(model.hidden, model.fc)
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    for _ in range(200):
        logits = head(features)
        if (logits.argmax(1) == y).all():  # just fitted: not so sure that ε = 4/255 cannot move it
            break
        opt.zero_grad()
        torch.nn.functional.cross_entropy(logits, y).backward()
        opt.step()
    with torch.no_grad():
        assert (model(images_on(x, "cpu")).argmax(1) == y).all()
    torch.save(model.state_dict(), path)


def test_eval_on_an_imagenet_folder_writes_an_imagenet_linf_entry(tmp_path, cli):
    root = make_imagenet(tmp_path / "data", n=4)
    _memorising_cnn(root, 4, tmp_path / "cnn.pt")
    ws = tmp_path / "ws"
    code, out, err = cli("eval", "--model", tmp_path / "cnn.pt", "--arch", SMALL_CNN, "--arch-kwargs",
                         json.dumps(CNN_KWARGS), "--dataset", "imagenet", "--data-dir", root, "-n", "4",
                         "--suite", "quick", "--set", "pgd20.steps=3", "-w", ws, "--no-progress",
                         "--entry", "tiny")
    assert code == 0, err
    entry = json.loads((ws / "leaderboard" / "imagenet" / "Linf" / "tiny.json").read_text())
    info = entry["adt_ft"]
    assert entry["eps"] == "4/255" and info["eps"] == pytest.approx(4 / 255)
    assert info["preprocessing"] == {"name": "Res256Crop224", "resize": 256, "crop": 224,
                                     "interpolation": "bilinear"}
    assert "first 4 of RobustBench's 5000-image ImageNet validation list" in info["data"]
    assert entry["clean_acc"] == "100.00" and 0 < info["max_linf"]["pgd20"] <= 4 / 255 + 1e-6
    rows = (ws / "leaderboard" / "imagenet" / "Linf" / "tiny.per-example.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[1].split(",")[:2] == ["0", str(class_index()[subset_ids()[0].split("/")[0]])]


def test_eval_refuses_a_missing_folder_in_one_line(tmp_path, cli):
    torch.save(__import__("adt_finetune.models.small", fromlist=["SmallCNN"]).SmallCNN(**CNN_KWARGS).state_dict(),
               tmp_path / "cnn.pt")
    code, out, err = cli("eval", "--model", tmp_path / "cnn.pt", "--arch", SMALL_CNN, "--arch-kwargs",
                         json.dumps(CNN_KWARGS), "--dataset", "imagenet", "--data-dir", tmp_path / "missing",
                         "--attacks", "fgsm", "-w", tmp_path / "ws", "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "ImageNet is not on this machine" in err and "--data-dir" in err
    assert not (tmp_path / "ws" / "leaderboard").exists()


def test_a_zoo_imagenet_model_evaluates_with_its_preprocessing(tmp_path, cli):
    """Salman2020Do_R18 with random weights written where the loader looks: loads (its 224² forward
    check), evaluates on two listed images and records RobustBench's preprocessing for it."""
    from adt_finetune.workspace import Workspace
    from adt_finetune.zoo import build_architecture

    ws = Workspace(tmp_path / "ws")
    path = ws.model_path("imagenet", "Linf", "Salman2020Do_R18")
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(build_architecture("Salman2020Do_R18", "imagenet").state_dict(), path)
    root = make_imagenet(tmp_path / "data", n=2)
    code, out, err = cli("eval", "--model", "Salman2020Do_R18", "--dataset", "imagenet", "--data-dir", root,
                         "-n", "2", "--attacks", "fgsm", "-w", ws.root, "--no-progress")
    assert code == 0, err
    entry = json.loads((ws.leaderboard_dir / "imagenet" / "Linf" / "Salman2020Do_R18_fgsm_eps4-255_n2.json")
                       .read_text())
    assert entry["adt_ft"]["preprocessing"]["name"] == "Res256Crop224"
    # RobustBench's ImageNet Linf leaderboard (ε = 4/255, 5,000 images) takes it only as a draft.
    from adt_finetune.leaderboard import read_entry
    from adt_finetune.publish.export import check_exportable

    e = read_entry(ws.leaderboard_dir / "imagenet" / "Linf" / "Salman2020Do_R18_fgsm_eps4-255_n2.json")
    assert "no AutoAttack accuracy" in check_exportable(e, allow_partial=True)
    with pytest.raises(UserError, match="not AutoAttack \\(standard\\) on the full test set"):
        check_exportable(e)


def make_train_folder(root: Path, synsets: int = 2, per_class: int = 2) -> Path:
    """`root/train/<synset>/` with a few JPEGs per synset (the first synsets of the map)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for synset in list(class_index())[:synsets]:
        (root / "train" / synset).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (260 + 20 * i, 300, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / synset / f"{synset}_{i}.JPEG")
    return root


def test_the_training_split_is_train_synsets_with_random_resized_crops(tmp_path):
    root = make_train_folder(tmp_path / "d")
    ds = load_dataset("imagenet", "train", data_dir=root)
    assert len(ds) == 4 and sorted(ds.targets) == [0, 0, 1, 1]
    assert "RandomResizedCrop(size=(224, 224)" in repr(ds.transform) and "RandomHorizontalFlip" in repr(ds.transform)
    torch.manual_seed(0)
    first = ds[0][0]
    assert first.shape == (3, 224, 224) and not torch.equal(first, ds[0][0])  # random each time it is read
    plain = load_dataset("imagenet", "train", data_dir=root, augment=False)
    assert torch.equal(plain[0][0], plain[0][0]) and plain[0][0].shape == (3, 224, 224)
    (root / "train" / "cats").mkdir()
    with pytest.raises(UserError, match="not an ImageNet synset folder"):
        load_dataset("imagenet", "train", data_dir=root)


def test_fine_tuning_on_an_imagenet_folder_runs_one_step(tmp_path, cli):
    from adt_finetune.models.small import SmallCNN

    root = make_train_folder(tmp_path / "data")
    torch.manual_seed(0)
    torch.save(SmallCNN(**CNN_KWARGS).state_dict(), tmp_path / "cnn.pt")
    ws = tmp_path / "ws"
    code, out, err = cli("train", "--model", tmp_path / "cnn.pt", "--arch", SMALL_CNN, "--arch-kwargs",
                         json.dumps(CNN_KWARGS), "--dataset", "imagenet", "--data-dir", root, "--method", "pgd-at",
                         "--epochs", "1", "--batch-size", "4", "-w", ws, "--no-progress")
    assert code == 0, err
    run = json.loads(next((ws / "runs").glob("*/run.json")).read_text())
    assert run["dataset"] == "imagenet" and run["eps"] == pytest.approx(4 / 255), run


def test_the_bench_measures_at_imagenet_size():
    from adt_finetune.bench import run_benchmark

    result = run_benchmark(SMALL_CNN, dataset="imagenet", methods=["pgd-at"], losses=["ce"], attacks=["fgsm"],
                           batch_size=2, steps=1, warmup=1, arch_kwargs={"width": 4})
    assert result.meta["input_shape"] == [3, 224, 224] and result.meta["num_classes"] == 1000
    assert all(r.peak_mem_mb is not None for r in result.rows)


def test_the_engine_gives_the_same_flags_for_uint8_and_float_images():
    """ImageNet's compact storage changes nothing but the storage: the same clean and robust flags
    (and the same perturbation sizes) as the float images it stands for."""
    from adt_finetune.evaluation.engine import evaluate
    from adt_finetune.models.small import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(3, 10, 4).eval()
    u8 = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    x = u8.float().div(255)
    with torch.no_grad():
        y = model(x).argmax(1)  # every image clean-correct, so the attack runs on all of them
    kwargs = dict(attacks=["clean", "pgd20"], eps=4 / 255, attack_settings={"pgd20": {"steps": 3}}, batch_size=5)
    a, b = evaluate(model, x, y, **kwargs), evaluate(model, u8, y, **kwargs)
    assert a.clean.all() and b.clean.tolist() == a.clean.tolist()
    assert b.flags.tolist() == a.flags.tolist() and b.max_linf == a.max_linf
    assert 0 < a.max_linf["pgd20"] <= 4 / 255 + 1e-6
