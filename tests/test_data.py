"""Datasets: real Fashion-MNIST offline, --n-examples, missing data offline, image folders of real CIFAR-10 images."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adt_finetune import data
from adt_finetune.data import CIFAR10_CLASSES, as_tensors, dataset_info, load_dataset
from adt_finetune.errors import UserError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _idx(path: Path, header: int) -> np.ndarray:
    """An IDX file read independently of torchvision: big-endian header, then uint8 data."""
    with gzip.open(path, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8, offset=header)


def test_fashion_mnist_offline_matches_the_raw_files(fmnist_test):
    x, y = fmnist_test
    assert x.shape == (500, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.99
    labels = _idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz", 8)
    images = _idx(FMNIST_DIR / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    assert torch.equal(y, torch.from_numpy(labels[:500].astype(np.int64)))
    assert torch.allclose(x[:3, 0], torch.from_numpy(images[:3].astype(np.float32)) / 255)
    assert len(load_dataset("fashion-mnist", "test")) == 10000
    train = load_dataset("fmnist", "train", augment=False)
    assert len(train) == 60000
    first_train_label = int(_idx(FMNIST_DIR / "train-labels-idx1-ubyte.gz", 8)[0])
    assert train[0][1] == first_train_label


def test_n_examples_takes_the_first_n_in_order(fmnist_test):
    ds = load_dataset("fashion-mnist", "test", n_examples=7)
    x, y = as_tensors(ds)
    assert len(ds) == 7
    assert torch.equal(x, fmnist_test[0][:7]) and torch.equal(y, fmnist_test[1][:7])
    with pytest.raises(UserError, match="larger than the test set \\(10000 images\\)"):
        load_dataset("fashion-mnist", "test", n_examples=10001)
    with pytest.raises(UserError, match="must be positive"):
        load_dataset("fashion-mnist", "test", n_examples=0)
    with pytest.raises(UserError, match="unknown split"):
        load_dataset("fashion-mnist", "validation")
    with pytest.raises(UserError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


def test_missing_dataset_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("ADT_FT_OFFLINE", "1")
    monkeypatch.delenv("ADT_FT_DATA", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as missing:
        load_dataset("cifar10", "test", data_dir=empty, workspace=tmp_path / "ws")
    msg = str(missing.value)
    assert "\n" not in msg
    # A given --data-dir is the only place looked in: it means that data.
    assert "cifar-10-batches-py" in msg and str(empty) in msg and str(tmp_path / "ws" / "data") not in msg
    with pytest.raises(UserError) as missing:
        load_dataset("cifar10", "test", workspace=tmp_path / "ws")
    assert str(tmp_path / "ws" / "data") in str(missing.value)
    # Without Debian's package (and nothing under the search roots), Fashion-MNIST is missing too.
    monkeypatch.setitem(data.SYSTEM_LOCATIONS, "fashion-mnist", [tmp_path / "nowhere"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test", data_dir=empty)


def test_data_dir_is_searched_first(tmp_path, monkeypatch):
    """Debian's gzipped files given through --data-dir (system location switched off) load the same images."""
    monkeypatch.setitem(data.SYSTEM_LOCATIONS, "fashion-mnist", [])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    own = tmp_path / "mine"
    own.mkdir()
    for f in FMNIST_DIR.glob("*.gz"):
        (own / f.name).symlink_to(f)
    x, y = as_tensors(load_dataset("fashion-mnist", "test", data_dir=own), 5)
    labels = _idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz", 8)[:5]
    assert y.tolist() == labels.tolist() and x.shape == (5, 1, 28, 28)


def test_image_folder_of_real_cifar10_images(tmp_path, image_folder):
    root, labels = image_folder(tmp_path / "cifar", CIFAR10_CLASSES)
    # Only some classes are present, so sorted-folder indices differ from CIFAR-10's:
    # the labels must still be CIFAR-10's.
    assert len(set(labels.values())) < 10
    ds = load_dataset(root, expect="cifar10")
    assert dataset_info(root).name == "cifar10"
    assert len(ds) == 20
    for i, (path, _) in enumerate(ds.inner.samples):
        x, y = ds[i]
        assert y == labels[Path(path).name], path
        assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1
        pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 255
        assert torch.allclose(x, pixels)
    sub = load_dataset(root, n_examples=3)
    assert [sub[i][1] for i in range(3)] == [ds[i][1] for i in range(3)]


def test_image_folder_with_wrong_class_names(tmp_path, image_folder):
    root, _ = image_folder(tmp_path / "numbered", [f"class{i}" for i in range(10)])
    with pytest.raises(UserError, match="do not match cifar10's classes"):
        load_dataset(root, expect="cifar10")
    with pytest.raises(UserError, match="match no known dataset"):
        load_dataset(root)
    fashion = [c.replace("/", "-") for c in data.FASHION_MNIST_CLASSES]
    root, _ = image_folder(tmp_path / "fashion", fashion)
    with pytest.raises(UserError, match="do not match cifar10's classes"):
        load_dataset(root, expect="cifar10")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no class subfolders"):
        load_dataset(empty)


def _copy_of_the_test_split(folder: Path, *, labels: bytes | None = None, images: bytes | None = None) -> Path:
    """Fashion-MNIST's two test files in `folder` (gzipped), with altered bytes where given."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, new in (("t10k-labels-idx1-ubyte", labels), ("t10k-images-idx3-ubyte", images)):
        original = (FMNIST_DIR / f"{name}.gz").read_bytes()
        (folder / f"{name}.gz").write_bytes(original if new is None else new)
    return folder


def _relabelled() -> bytes:
    content = bytearray(gzip.decompress((FMNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    content[8] = (content[8] + 1) % 10  # the first test image's label, one class on
    return gzip.compress(bytes(content))


@pytest.mark.parametrize("kind", ["truncated", "relabelled", "garbage-raw"])
def test_a_copy_that_is_not_the_original_is_refused(kind, tmp_path, monkeypatch):
    """Fashion-MNIST's files are checked against their published checksums: a truncated or relabelled
    copy would otherwise give wrong numbers (or a traceback from deep inside a reader)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    mine = tmp_path / "mine"
    if kind == "truncated":
        whole = (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").read_bytes()
        _copy_of_the_test_split(mine, images=whole[:len(whole) // 2])
        bad, words = mine / "t10k-images-idx3-ubyte.gz", "is truncated or not gzip data"
    elif kind == "relabelled":
        _copy_of_the_test_split(mine, labels=_relabelled())
        bad, words = mine / "t10k-labels-idx1-ubyte.gz", "has other content (MD5 mismatch)"
    else:
        raw = mine / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for name in data.FMNIST_MD5:
            (raw / name).write_bytes(b"garbage" * 10)
        bad, words = raw / "t10k-images-idx3-ubyte", "has other content (MD5 mismatch)"
    with pytest.raises(UserError) as refused:
        load_dataset("fashion-mnist", "test", data_dir=mine)
    msg = str(refused.value)
    assert str(bad) in msg and words in msg and "not Fashion-MNIST's original" in msg and "\n" not in msg
    # Nothing was copied anywhere: a later command cannot pick up a poisoned copy.
    assert not (tmp_path / "cache").exists()
    # The same folder with the original files reads, and gives the original labels.
    for f in mine.rglob("*"):
        if f.is_file():
            f.unlink()
    _copy_of_the_test_split(mine)
    y = as_tensors(load_dataset("fashion-mnist", "test", data_dir=mine), 3)[1]
    assert y.tolist() == _idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz", 8)[:3].tolist()


def test_data_dir_always_means_that_data(tmp_path, monkeypatch):
    """A relabelled copy read once used to be unpacked into ~/.cache and read from there by every later
    command, whatever --data-dir said (and a good copy was ignored once the cache existed)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    good = _copy_of_the_test_split(tmp_path / "good")
    y_good = as_tensors(load_dataset("fashion-mnist", "test", data_dir=good), 1)[1]
    with pytest.raises(UserError, match="MD5 mismatch"):
        load_dataset("fashion-mnist", "test", data_dir=_copy_of_the_test_split(tmp_path / "bad",
                                                                                labels=_relabelled()))
    assert torch.equal(as_tensors(load_dataset("fashion-mnist", "test", data_dir=good), 1)[1], y_good)
    # A folder without the data is not quietly replaced by Debian's copy.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="not on this machine"):
        load_dataset("fashion-mnist", "test", data_dir=empty)
    assert len(load_dataset("fashion-mnist", "test")) == 10000  # without --data-dir: Debian's
    assert not (tmp_path / "cache").exists()


def test_unpacked_files_in_torchvisions_layout_read_the_same(tmp_path, fmnist_test):
    raw = tmp_path / "d" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in data.FMNIST_MD5:  # torchvision's reader wants all four
        (raw / name).write_bytes(gzip.decompress((FMNIST_DIR / f"{name}.gz").read_bytes()))
    x, y = as_tensors(load_dataset("fashion-mnist", "test", data_dir=tmp_path / "d"), 500)
    assert torch.equal(x, fmnist_test[0]) and torch.equal(y, fmnist_test[1])
    # Bit for bit what torchvision's reader and ToTensor made of the same files (adt-ft's reader before).
    from torchvision import datasets, transforms

    theirs = datasets.FashionMNIST(str(tmp_path / "d"), train=False, transform=transforms.ToTensor())
    tx, ty = as_tensors(theirs, 500)
    assert torch.equal(x, tx) and torch.equal(y, ty)


def test_cifar_batches_are_checked_before_they_are_unpickled(tmp_path):
    """CIFAR's python batches are pickles: torchvision's reader (kept for them) unpickles a file only
    after its MD5 is the published one, so a crafted batch in a data folder never runs."""
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    folder = tmp_path / "d" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ["batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6))]:
        (folder / name).write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserError) as refused:
        load_dataset("cifar10", "test", data_dir=tmp_path / "d")
    assert "does not match cifar10's published checksums" in str(refused.value) and str(folder) in str(refused.value)
    assert not marker.exists()
