"""ImageNet as RobustBench evaluates it: its 5,000-image validation subset, its labels and its
test-time preprocessings; and the `train/` folder for fine-tuning.

The subset list and the synset → class map are RobustBench's own files (`helper_files/` of the
installed `robustbench` package, MIT licence), read without importing RobustBench. The images
are the user's: `<root>/val/<synset>/<file>` (and `<root>/train/<synset>/...`), the layout of
the official ILSVRC2012 archives once sorted into class folders. Nothing is downloaded.

The evaluated images are the first N of the list, in the list's order (RobustBench reads
`data_dir/val` in that order and cuts to `n_examples`); a label is the synset's index in the
map, which is the sorted order of the 1,000 synsets (RobustBench's `class_to_idx` on a full val/).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import Dataset

from .errors import UserError

SUBSET_SIZE = 5_000
#: RobustBench's default for ImageNet models (its `Res256Crop224`)
DEFAULT_PREPROCESSING = "Res256Crop224"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Preprocessing:
    """A test-time preprocessing: resize (an int: the shorter side; a pair: both sides), then a
    centre crop, then ToTensor, as torchvision's transforms do them."""

    name: str
    resize: int | tuple[int, int] | None
    crop: int | None
    interpolation: str = "bilinear"

    @property
    def size(self) -> int:
        """The side of the square image the model is given."""
        if self.crop is not None:
            return self.crop
        if isinstance(self.resize, tuple):
            return self.resize[0]
        raise ValueError(f"preprocessing {self.name} does not make square images")

    def transform(self):
        from torchvision import transforms as T

        mode = T.InterpolationMode(self.interpolation)
        steps = []
        if self.resize is not None:
            steps.append(T.Resize(list(self.resize) if isinstance(self.resize, tuple) else self.resize,
                                  interpolation=mode))
        if self.crop is not None:
            steps.append(T.CenterCrop(self.crop))
        return T.Compose([*steps, T.ToTensor()])

    def record(self) -> dict[str, Any]:
        """What a leaderboard entry says about it."""
        out = asdict(self)
        if isinstance(self.resize, tuple):
            out["resize"] = list(self.resize)
        return out


#: RobustBench's named ImageNet preprocessings (`robustbench.data.PREPROCESSINGS`)
PREPROCESSINGS = {
    "Res256Crop224": Preprocessing("Res256Crop224", 256, 224),
    "BicubicRes256Crop224": Preprocessing("BicubicRes256Crop224", 256, 224, "bicubic"),
    "Res224": Preprocessing("Res224", (224, 224), None),
    "Crop288": Preprocessing("Crop288", None, 288),
}


def preprocessing(spec: str | Preprocessing | None) -> Preprocessing:
    """A named preprocessing (None: RobustBench's default for ImageNet)."""
    if isinstance(spec, Preprocessing):
        return spec
    name = DEFAULT_PREPROCESSING if spec is None else spec
    if name not in PREPROCESSINGS:
        raise UserError(f"unknown ImageNet preprocessing {name!r}: choose one of {', '.join(PREPROCESSINGS)}")
    return PREPROCESSINGS[name]


def timm_preprocessing(size: int, crop_pct: float, interpolation: str) -> Preprocessing:
    """RobustBench's rule for a timm model (`get_timm_model_preprocessing`): resize the shorter side
    to floor(size / crop_pct) with the model's interpolation, centre-crop `size`."""
    scale = int(math.floor(size / crop_pct))
    prefix = "" if interpolation == "bilinear" else interpolation.capitalize()
    return Preprocessing(f"{prefix}Res{scale}Crop{size}", scale, size, interpolation)


# ---------------------------------------------------------------- RobustBench's files

def _helper_file(name: str) -> Path:
    spec = importlib.util.find_spec("robustbench")  # finds the package without running its __init__
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / "helper_files" / name
        if path.is_file():
            return path
    raise RuntimeError(f"RobustBench's {name} is missing: reinstall robustbench==1.1.1 (an adt-ft dependency)")


@functools.lru_cache(maxsize=None)
def subset_ids() -> tuple[str, ...]:
    """RobustBench's 5,000 evaluation images, in order, as `<synset>/<file>` paths under val/."""
    lines = _helper_file("imagenet_test_image_ids.txt").read_text().splitlines()
    return tuple(line.strip() for line in lines if line.strip())


@functools.lru_cache(maxsize=None)
def class_index() -> dict[str, int]:
    """Synset → class index (0..999)."""
    return {str(k): int(v) for k, v in json.loads(_helper_file("imagenet_class_to_id_map.json").read_text()).items()}


@functools.lru_cache(maxsize=None)
def subset_labels() -> tuple[int, ...]:
    """The class index of each of the 5,000 listed images, in the list's order."""
    labels = class_index()
    return tuple(labels[rel.split("/")[0]] for rel in subset_ids())


# ---------------------------------------------------------------- folders

def find_root(roots: Sequence[Path]) -> Path | None:
    """The first root holding a val/ or train/ folder, itself or as imagenet/."""
    for root in roots:
        for folder in (root, root / "imagenet"):
            if (folder / "val").is_dir() or (folder / "train").is_dir():
                return folder
    return None


def _read(path: Path, transform):
    from PIL import Image

    try:
        with open(path, "rb") as f:
            image = Image.open(f).convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{path} is missing: RobustBench's ImageNet evaluation reads its listed images from "
                        "val/<synset>/; put the ILSVRC2012 validation images there") from None
    except OSError:  # PIL's UnidentifiedImageError, a truncated file
        raise UserError(f"{path} is not an image that can be read: replace it with the original file") from None
    return transform(image)


class ImageNetSubset(Dataset):
    """The images of RobustBench's list under `val_dir`, in the list's order, with their labels;
    each decoded and preprocessed when it is read."""

    def __init__(self, val_dir: Path, prep: Preprocessing, n_examples: int | None = None):
        if not val_dir.is_dir():
            raise UserError(f"{val_dir} is not a folder: ImageNet's validation images go in val/<synset>/ under "
                            "the data folder")
        n = SUBSET_SIZE if n_examples is None else n_examples
        if not 0 < n <= SUBSET_SIZE:
            raise UserError(f"`n_examples` {n}: RobustBench's ImageNet evaluation has {SUBSET_SIZE} images "
                            f"(give 1 to {SUBSET_SIZE})")
        self.samples = [(val_dir / rel, label) for rel, label in zip(subset_ids(), subset_labels())]
        self.preprocessing = prep
        self.transform = prep.transform()
        missing = [p for p, _ in self.samples[:n] if not p.is_file()]
        if missing:
            raise UserError(f"{val_dir} lacks {len(missing)} of the first {n} images of RobustBench's ImageNet list "
                            f"(first missing: {missing[0].relative_to(val_dir)}): put the ILSVRC2012 validation "
                            "images in val/<synset>/, or evaluate fewer (`n_examples`)")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return _read(path, self.transform), label


class ImageNetTrain(Dataset):
    """Every image under `train_dir/<synset>/`, labelled by the synset's class index."""

    def __init__(self, train_dir: Path, transform):
        from torchvision.datasets.folder import make_dataset

        if not train_dir.is_dir():
            raise UserError(f"{train_dir} is not a folder: ImageNet's training images go in train/<synset>/ under "
                            "the data folder")
        labels = class_index()
        present = sorted(d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
        unknown = [d for d in present if d not in labels]
        if unknown:
            raise UserError(f"{train_dir / unknown[0]} is not an ImageNet synset folder (like n01440764): only the "
                            "1,000 ILSVRC2012 synsets go in train/")
        self.samples = make_dataset(str(train_dir), {d: labels[d] for d in present}, extensions=IMAGE_SUFFIXES,
                                    allow_empty=True)
        if not self.samples:
            raise UserError(f"{train_dir} holds no images: put the training images in train/<synset>/")
        self.targets = [t for _, t in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return _read(Path(path), self.transform), label


def train_transform(augment: bool, prep: Preprocessing):
    """The common ImageNet training augmentation (random-resized crop to the model's size and a
    horizontal flip; RobustBench defines none), or the test preprocessing without augmentation."""
    from torchvision import transforms as T

    if not augment:
        return prep.transform()
    return T.Compose([T.RandomResizedCrop(prep.size), T.RandomHorizontalFlip(), T.ToTensor()])


def load_imagenet(root: Path, split: str, *, augment: bool, n_examples: int | None,
                  prep: str | Preprocessing | None) -> Dataset:
    p = preprocessing(prep)
    if split == "train":
        return ImageNetTrain(root / "train", train_transform(augment, p))
    return ImageNetSubset(root / "val", p, n_examples)


def looks_like_synsets(names: Sequence[str]) -> bool:
    """Whether folder names are ImageNet synsets (a val/ or train/ folder given as an image folder)."""
    labels = class_index()
    return bool(names) and all(n in labels for n in names)
