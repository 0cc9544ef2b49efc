"""Datasets: the four named ones (torchvision formats) and image folders.

Images are float tensors in [0, 1] with no normalisation: RobustBench models carry
their own. Files are looked for, in order, in --data-dir, $ADT_FT_DATA, the
workspace's data/, well-known system locations (Debian's dataset packages), and
only then downloaded through torchvision.
"""
from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset, Subset

from .errors import UserError
from .utils import atomic_path

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    eps: float  # the L∞ budget the field uses for this dataset
    eps_str: str
    channels: int
    size: int
    augment: str  # "crop-flip" or "none": the paper's training augmentation
    classes: tuple[str, ...] | None = None


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 10, 8 / 255, "8/255", 3, 32, "crop-flip", CIFAR10_CLASSES),
    "cifar100": DatasetInfo("cifar100", 100, 8 / 255, "8/255", 3, 32, "crop-flip"),
    "svhn": DatasetInfo("svhn", 10, 4 / 255, "4/255", 3, 32, "none", tuple(str(i) for i in range(10))),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 0.1, "0.1", 1, 28, "none", FASHION_MNIST_CLASSES),
}
ALIASES = {"fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
           "cifar-10": "cifar10", "cifar-100": "cifar100"}

# Debian's dataset packages put the original files here.
SYSTEM_LOCATIONS = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")]}


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, or give a folder of images")
    return key


def is_image_folder(name_or_path: str | os.PathLike) -> bool:
    return Path(name_or_path).is_dir()


def dataset_info(name_or_path: str | os.PathLike) -> DatasetInfo:
    """Facts about a named dataset, or about an image folder (matched to a known dataset by class names)."""
    if is_image_folder(name_or_path):
        return _folder_info(Path(name_or_path))
    return DATASETS[canonical_name(str(name_or_path))]


def _search_roots(data_dir: str | os.PathLike | None, workspace: str | os.PathLike | None) -> list[Path]:
    roots = []
    if data_dir:
        roots.append(Path(data_dir))
    if os.environ.get("ADT_FT_DATA"):
        roots.append(Path(os.environ["ADT_FT_DATA"]))
    if workspace is not None:
        roots.append(Path(workspace) / "data")
    return roots


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "adt-ft"


def _train_transform(info: DatasetInfo):
    from torchvision import transforms as T

    if info.augment == "crop-flip":
        return T.Compose([T.RandomCrop(info.size, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    return T.ToTensor()


# ---------------------------------------------------------------- named datasets

_FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")


def _fmnist_root(roots: Sequence[Path]) -> Path | None:
    """A root that torchvision's FashionMNIST reads (root/FashionMNIST/raw/<files>).

    Debian ships the gzipped originals; torchvision reads only the unpacked files,
    so we unpack them once into the user cache (atomically).
    """
    for root in roots:
        if all((root / "FashionMNIST" / "raw" / f).exists() for f in _FMNIST_FILES):
            return root
    candidates = [r for r in roots] + [r for r in SYSTEM_LOCATIONS["fashion-mnist"]]
    for folder in candidates:
        for sub in (folder, folder / "fashion-mnist", folder / "FashionMNIST" / "raw"):
            if all((sub / f"{f}.gz").exists() for f in _FMNIST_FILES):
                cache = _cache_dir()
                raw = cache / "FashionMNIST" / "raw"
                for f in _FMNIST_FILES:
                    if not (raw / f).exists():
                        with atomic_path(raw / f) as tmp, gzip.open(sub / f"{f}.gz", "rb") as src, \
                                open(tmp, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                return cache
    return None


def _missing(name: str, roots: Sequence[Path], hint: str) -> UserError:
    where = roots[0] if roots else Path("data")
    return UserError(f"{name} is not on this machine and could not be downloaded: {hint} "
                     f"(searched {', '.join(str(r) for r in roots) or 'nothing'}; e.g. place it under {where})")


def _load_named(name: str, split: str, roots: list[Path], augment: bool, download: bool) -> Dataset:
    from torchvision import datasets as D
    from torchvision import transforms as T

    info = DATASETS[name]
    train = split == "train"
    transform = _train_transform(info) if (train and augment) else T.ToTensor()
    dl_root = roots[0] if roots else _cache_dir()

    if name == "fashion-mnist":
        root = _fmnist_root(roots)
        if root is not None:
            return D.FashionMNIST(str(root), train=train, transform=transform, download=False)
        hint = ("install Debian's package (apt-get install dataset-fashion-mnist) or put the four "
                "*-ubyte.gz files in a folder given by --data-dir")
        return _try_download(lambda: D.FashionMNIST(str(dl_root), train=train, transform=transform,
                                                    download=True), name, roots, hint, download)

    makers: dict[str, Callable[[Path, bool], Dataset]] = {
        "cifar10": lambda r, dl: D.CIFAR10(str(r), train=train, transform=transform, download=dl),
        "cifar100": lambda r, dl: D.CIFAR100(str(r), train=train, transform=transform, download=dl),
        "svhn": lambda r, dl: D.SVHN(str(r), split="train" if train else "test", transform=transform, download=dl),
    }
    hints = {"cifar10": "place the extracted cifar-10-batches-py/ folder there",
             "cifar100": "place the extracted cifar-100-python/ folder there",
             "svhn": "place train_32x32.mat / test_32x32.mat there"}
    for root in roots:
        try:
            return makers[name](root, False)
        except RuntimeError:
            continue
    return _try_download(lambda: makers[name](dl_root, True), name, roots, hints[name], download)


def _try_download(make: Callable[[], Dataset], name: str, roots: list[Path], hint: str, download: bool) -> Dataset:
    if not download or os.environ.get("ADT_FT_OFFLINE"):
        raise _missing(name, roots, hint)
    try:
        return make()
    except Exception:  # torchvision raises URLError, RuntimeError, OSError... when offline
        raise _missing(name, roots, hint) from None


# ---------------------------------------------------------------- image folders

def _folder_classes(path: Path) -> list[str]:
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{path} has no class subfolders: use torchvision's ImageFolder layout, "
                        "one subfolder of images per class")
    return classes


def _known_match(classes: Sequence[str]) -> DatasetInfo | None:
    def norm(s: str) -> str:
        return s.lower().replace("/", "-").replace("_", " ").strip()

    for info in DATASETS.values():
        if info.classes and {norm(c) for c in classes} <= {norm(c) for c in info.classes}:
            return info
    return None


def _folder_info(path: Path, expect: str | None = None) -> DatasetInfo:
    classes = _folder_classes(path)
    known = _known_match(classes)
    if expect is not None:
        want = DATASETS[canonical_name(expect)]
        if known is None or known.name != want.name:
            names = ", ".join(want.classes or ()) or f"{want.num_classes} classes"
            raise UserError(f"the class folders of {path} ({', '.join(classes)}) do not match {want.name}'s classes "
                            f"({names}): name each subfolder after its class")
        return want
    if known is not None:
        return known
    raise UserError(f"the class folders of {path} ({', '.join(classes[:10])}) match no known dataset: name them "
                    "after CIFAR-10's, SVHN's (0-9) or Fashion-MNIST's classes (torchvision's class names)")


class _RemappedFolder(Dataset):
    """ImageFolder whose labels are the known dataset's indices, not the sorted-folder order."""

    def __init__(self, path: Path, info: DatasetInfo):
        from torchvision import datasets as D
        from torchvision import transforms as T

        def norm(s: str) -> str:
            return s.lower().replace("/", "-").replace("_", " ").strip()

        index = {norm(c): i for i, c in enumerate(info.classes or ())}
        tfs = [T.Grayscale(1)] if info.channels == 1 else []
        tfs += [T.Resize((info.size, info.size)), T.ToTensor()]
        # A class folder without images is allowed: an evaluation subset can leave a class out,
        # and labels come from the class names, not from which folders hold files.
        self.inner = D.ImageFolder(str(path), transform=T.Compose(tfs), allow_empty=True)
        self.remap = {i: index[norm(c)] for i, c in enumerate(self.inner.classes)}
        self.targets = [self.remap[t] for t in self.inner.targets]

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        try:
            x, t = self.inner[i]
        except OSError:  # PIL's UnidentifiedImageError (a non-image with an image suffix), a truncated file
            raise UserError(f"{self.inner.samples[i][0]} is not an image that can be read: remove it from the "
                            "folder or replace it") from None
        return x, self.remap[t]


# ---------------------------------------------------------------- public API

def load_dataset(name_or_path: str | os.PathLike, split: str = "test", *, data_dir=None, workspace=None,
                 n_examples: int | None = None, augment: bool = True, download: bool = True,
                 expect: str | None = None) -> Dataset:
    """A dataset split of images in [0, 1].

    `name_or_path` is a dataset name or an ImageFolder directory. `n_examples` takes
    the first N examples in order (RobustBench convention); `augment` applies the
    paper's augmentation to the train split only. `expect` checks that an image
    folder's classes are those of that dataset.
    """
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}: use train or test")
    if is_image_folder(name_or_path):
        path = Path(name_or_path)
        ds: Dataset = _RemappedFolder(path, _folder_info(path, expect))
    else:
        name = canonical_name(str(name_or_path))
        ds = _load_named(name, split, _search_roots(data_dir, workspace), augment, download)
    if n_examples is not None:
        if n_examples <= 0:
            raise UserError(f"--n-examples must be positive, got {n_examples}")
        if n_examples > len(ds):
            raise UserError(f"--n-examples {n_examples} is larger than the {split} set ({len(ds)} images)")
        ds = Subset(ds, range(n_examples))
    return ds


def as_tensors(dataset: Dataset, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n examples of a dataset as (x, y) tensors, in order."""
    n = len(dataset) if n is None else min(n, len(dataset))
    loader = torch.utils.data.DataLoader(Subset(dataset, range(n)), batch_size=1024, shuffle=False)
    xs, ys = zip(*[(x, y) for x, y in loader]) if n else ((), ())
    if not xs:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(xs), torch.cat(ys).long()
