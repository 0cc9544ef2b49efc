"""CIFAR-10-C and CIFAR-100-C as published (Hendrycks & Dietterich), read from the one folder the user gives.

The layout RobustBench's `load_corruptions_cifar` reads: `<data_dir>/CIFAR-10-C/` (or `CIFAR-100-C/`) holds
one `<corruption>.npy` per corruption, uint8 of shape (5·M, 32, 32, 3) with the M test images at severity 1
first, then severities 2 to 5 in order (M = 10,000 in the published files), and one `labels.npy` (the M
test labels, repeated once per severity in the published file). Image i of every block is test image i.
Nothing is downloaded and nothing is looked for elsewhere; every file is checked before any image is used.

ImageNet-C as RobustBench's `load_imagenetc` reads it: `<data_dir>/ImageNet-C/<corruption>/<severity>/
<synset>/<file>`, the images of RobustBench's 5,000-image ImageNet list under their val/ names, read in
the list's order and resized to 224×224 (its `Res224`, for every model: "for corruptions we use only
resizing").
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import as_tensors
from ..errors import UserError
from ..imagenet_folder import PREPROCESSINGS, SUBSET_SIZE, ImageNetSubset, subset_ids, subset_labels

#: RobustBench's CORRUPTIONS, in its order (the order of the entry's columns)
CORRUPTIONS = ("shot_noise", "motion_blur", "snow", "pixelate", "gaussian_noise", "defocus_blur", "brightness", "fog",
               "zoom_blur", "frost", "glass_blur", "impulse_noise", "contrast", "jpeg_compression",
               "elastic_transform")
SEVERITIES = (1, 2, 3, 4, 5)
#: the folder RobustBench expects under its data directory, per dataset
FOLDERS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C", "imagenet": "ImageNet-C"}
#: RobustBench resizes ImageNet-C images to 224×224 for every model
IMAGENET_C_PREPROCESSING = PREPROCESSINGS["Res224"]
_SHAPE = (32, 32, 3)


@dataclass
class CorruptionFiles:
    """The checked, memory-mapped files of one dataset's corruptions."""

    dataset: str
    folder: Path
    per_severity: int                      # M: images per severity block
    labels: np.ndarray                     # (M,) int64
    arrays: dict[str, np.ndarray] = field(repr=False)   # corruption -> (5·M, 32, 32, 3) uint8, memory-mapped

    def check(self, n: int) -> None:
        """Nothing more to check for n images: the arrays were checked whole."""

    def images(self, corruption: str, severity: int, n: int) -> torch.Tensor:
        """The first n images of one corruption at one severity, as RobustBench feeds them: (n, 3, 32, 32)
        float32 in [0, 1]."""
        start = (severity - 1) * self.per_severity
        block = np.asarray(self.arrays[corruption][start:start + n])
        return torch.from_numpy(block.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)

    def digests(self, n: int) -> dict[str, str]:
        """sha256 of the rows of each file an evaluation of the first n images reads (all five severities),
        and of their n labels: the entry records them, and a resumed evaluation must read the same bytes."""
        out = {}
        for name, array in self.arrays.items():
            h = hashlib.sha256()
            for s in SEVERITIES:
                start = (s - 1) * self.per_severity
                h.update(np.ascontiguousarray(array[start:start + n]).tobytes())
            out[name] = h.hexdigest()
        out["labels"] = hashlib.sha256(self.labels[:n].astype(np.int64).tobytes()).hexdigest()
        return out


@dataclass
class ImageNetCFiles:
    """ImageNet-C's folders (`<corruption>/<severity>/<synset>/`), with the interface of CorruptionFiles."""

    dataset: str
    folder: Path
    per_severity: int = SUBSET_SIZE
    labels: np.ndarray = field(default_factory=lambda: np.array(subset_labels(), dtype=np.int64))

    def _folder(self, corruption: str, severity: int) -> Path:
        return self.folder / corruption / str(severity)

    def check(self, n: int) -> None:
        """The first n listed images in every corruption × severity folder, the first missing one named
        before any is decoded."""
        if not 0 < n <= SUBSET_SIZE:
            raise UserError(f"`n_examples` {n}: RobustBench's ImageNet-C evaluation has {SUBSET_SIZE} images per "
                            f"corruption and severity (give 1 to {SUBSET_SIZE})")
        for c in CORRUPTIONS:
            for s in SEVERITIES:
                folder = self._folder(c, s)
                missing = next((rel for rel in subset_ids()[:n] if not (folder / rel).is_file()), None)
                if missing is not None:
                    raise UserError(f"{folder / missing} is missing (first missing in {c}/{s}): ImageNet-C's "
                                    f"folders must hold the first {n} images of RobustBench's ImageNet list, or "
                                    "evaluate fewer (`n_examples`)")

    def images(self, corruption: str, severity: int, n: int) -> torch.Tensor:
        """The first n listed images of one corruption at one severity, resized to 224×224, as uint8."""
        # a corruption × severity folder is laid out as val/ is: the same listed names under <synset>/
        subset = ImageNetSubset(self._folder(corruption, severity), IMAGENET_C_PREPROCESSING, n)
        return as_tensors(subset, n, compact=True)[0]

    def digests(self, n: int) -> dict[str, str]:
        """sha256 of the listed file names and sizes each corruption contributes (not of the bytes: 75·n
        JPEGs would take longer to hash than to classify)."""
        out = {}
        for c in CORRUPTIONS:
            h = hashlib.sha256()
            for s in SEVERITIES:
                for rel in subset_ids()[:n]:
                    path = self._folder(c, s) / rel
                    h.update(f"{s}/{rel}:{path.stat().st_size if path.is_file() else -1}\n".encode())
            out[c] = h.hexdigest()
        out["labels"] = hashlib.sha256(self.labels[:n].tobytes()).hexdigest()
        return out


def _open_imagenet_c(folder: Path) -> ImageNetCFiles:
    missing = next((folder / c / str(s) for c in CORRUPTIONS for s in SEVERITIES
                    if not (folder / c / str(s)).is_dir()), None)
    if missing is not None:
        raise UserError(f"{missing} is missing: the corruptions suite reads ImageNet-C as <corruption>/<severity>/"
                        f"<synset>/ folders ({len(CORRUPTIONS)} corruptions × severities 1-5) in {folder}")
    return ImageNetCFiles("imagenet", folder)


def corruption_folder(dataset: str, data_dir: str | Path | None) -> Path:
    """`<data_dir>/CIFAR-10-C` (RobustBench's layout), or `data_dir` itself when it is that folder."""
    if dataset not in FOLDERS:
        raise UserError(f"the corruptions suite reads CIFAR-10-C, CIFAR-100-C and ImageNet-C; a {dataset} model "
                        "has no corruption files adt-ft can read")
    name = FOLDERS[dataset]
    if data_dir is None:
        raise UserError(f"the corruptions suite reads {name} from `data_dir`: give the folder that holds {name}/ "
                        "(the published .npy files)")
    root = Path(data_dir).expanduser()
    return root if root.name == name else root / name


def _missing(path: Path) -> UserError:
    return UserError(f"{path} is missing: the corruptions suite needs the published {path.parent.name} files "
                     f"({len(CORRUPTIONS)} <corruption>.npy and labels.npy) in {path.parent}")


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise _missing(path)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable NumPy .npy file ({e}): replace it with the published file") \
            from None


def _check_images(path: Path, array: np.ndarray) -> int:
    """M, the images per severity block, of a corruption file."""
    if array.dtype != np.uint8 or array.ndim != 4 or tuple(array.shape[1:]) != _SHAPE:
        raise UserError(f"{path} holds {array.dtype} of shape {tuple(array.shape)}; a corruption file holds uint8 "
                        f"images of shape (5·M, 32, 32, 3): replace it with the published file")
    if array.shape[0] == 0 or array.shape[0] % len(SEVERITIES):
        raise UserError(f"{path} holds {array.shape[0]} images, not {len(SEVERITIES)} equal severity blocks: "
                        "replace it with the published file")
    return array.shape[0] // len(SEVERITIES)


def _check_labels(path: Path, labels: np.ndarray, per_severity: int, n_classes: int) -> np.ndarray:
    """The M labels (the published file repeats them once per severity: each copy must agree)."""
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or \
            len(labels) not in (per_severity, per_severity * len(SEVERITIES)):
        raise UserError(f"{path} holds {labels.dtype} of shape {tuple(labels.shape)}; it must hold {per_severity} "
                        f"integer labels (or {per_severity * len(SEVERITIES)}: one copy per severity), as many as "
                        "each corruption file's severity blocks")
    blocks = np.asarray(labels).astype(np.int64).reshape(-1, per_severity)
    if (blocks != blocks[0]).any():
        raise UserError(f"{path}: its {len(blocks)} copies of the test labels differ; replace it with the "
                        "published file")
    if blocks.min() < 0 or blocks.max() >= n_classes:
        raise UserError(f"{path} holds labels from {blocks.min()} to {blocks.max()}, outside the model's "
                        f"{n_classes} classes: is it the other dataset's file?")
    return blocks[0]


def open_corruption_files(dataset: str, data_dir: str | Path | None,
                          n_classes: int) -> CorruptionFiles | ImageNetCFiles:
    """Every file of `dataset`'s corruptions checked (present, uint8 images of one shape, five equal severity
    blocks, labels to match), or one UserError naming the first file that is not right. ImageNet-C: every
    corruption × severity folder (the images themselves by `check(n)`, once n is known)."""
    folder = corruption_folder(dataset, data_dir)
    if not folder.is_dir():
        what = ("<corruption>/<severity>/<synset>/ images" if dataset == "imagenet" else
                f"{len(CORRUPTIONS)} <corruption>.npy and labels.npy")
        raise UserError(f"{folder} is missing: put the published {folder.name}/ folder ({what}) in {folder.parent}")
    if dataset == "imagenet":
        return _open_imagenet_c(folder)
    paths = {c: folder / f"{c}.npy" for c in CORRUPTIONS}
    missing = next((p for p in [*paths.values(), folder / "labels.npy"] if not p.is_file()), None)
    if missing is not None:  # named before any file is read
        raise _missing(missing)
    arrays = {c: _load(p) for c, p in paths.items()}
    sizes = {c: _check_images(paths[c], a) for c, a in arrays.items()}
    first = CORRUPTIONS[0]
    odd = next((c for c in CORRUPTIONS if sizes[c] != sizes[first]), None)
    if odd is not None:
        raise UserError(f"{paths[odd]} holds {sizes[odd]} images per severity but {paths[first]} holds "
                        f"{sizes[first]}: the files are not one set; replace them with the published files")
    labels = _check_labels(folder / "labels.npy", _load(folder / "labels.npy"), sizes[first], n_classes)
    return CorruptionFiles(dataset, folder, sizes[first], labels, arrays)
