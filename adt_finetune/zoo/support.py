"""What adt-ft can do with a zoo architecture, found before anything is downloaded.

`check_entry` builds the entry's architecture with random weights (on torch's meta device where
the constructor allows it: no memory, no arithmetic, seconds for the whole zoo; else on the CPU),
runs the forward passes training and the feature attack rely on, and says which training scopes
and attacks apply, and why not where they do not. `adt-ft models NAME --check` prints it; the
zoo-wide test runs it over every loadable entry.
"""
from __future__ import annotations

import contextlib
import io
import warnings

from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import UserError
from ..nets import find_head_and_feature_map, head_refusal, train_mode_refusal
from . import robustbench_compat as rb
from .architectures import DATASET_CLASSES, _build_zoo
from .catalog import ZooEntry

IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "imagenet": 224}

# The verdicts, best first; README's zoo count uses the same words.
ALL = "all methods"
LAST_LAYER = "last layer only"
REFUSED = "refused"

_CUDA_MESSAGES = ("no nvidia driver", "not compiled with cuda", "cuda driver", "cuda is not available")


class _MetaDevice(torch.overrides.TorchFunctionMode):
    """Tensors created inside go to the meta device (shapes only), except two kinds whose values
    constructors or forward passes read back (a meta tensor has none): `torch.linspace` (timm's
    stochastic-depth schedules, read with `.item()`) and scalars made by `torch.tensor` (MeanSparse's
    threshold and update flag, MixedNUTS's mixing weight), which stay on the CPU: a 0-d CPU tensor
    combines with tensors on any device. Active during the checks' forward passes too, where a meta
    tensor's `.cpu()` (MixedNUTS moves its logits there) keeps it on the meta device, and a value read
    back (`bool`, `.item()`) is zero: MixedNUTS asserts `not logits.isnan().any()`, Bai2023Improving
    logs its mixing weights' mean. Only shapes and the modules a forward pass runs matter here."""

    def __init__(self):
        super().__init__()
        from torch.utils._device import _device_constructors

        self._constructors = _device_constructors()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cpu and args[0].is_meta:
            return args[0]
        if func in (torch.Tensor.__bool__, torch.Tensor.item) and args[0].is_meta:
            return 0 if func is torch.Tensor.item else False  # no value: read as zero
        if func in self._constructors and kwargs.get("device") is None and func is not torch.linspace:
            if func is torch.tensor:
                made = func(*args, **kwargs)
                return made if made.dim() == 0 else made.to("meta")
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def needs_cuda(error: BaseException) -> bool:
    """Whether a constructor failed because it moves tensors to a GPU this machine does not have."""
    return any(m in str(error).lower() for m in _CUDA_MESSAGES)


def _build_on_cpu(entry: ZooEntry) -> nn.Module:
    try:
        return _build_zoo(entry)
    except (RuntimeError, AssertionError) as e:
        if needs_cuda(e):
            raise UserError(f"{entry.name} ({entry.dataset}/{entry.threat_model}): RobustBench's constructor for "
                            "this architecture puts tensors on a CUDA GPU, and this machine has none: use a "
                            "machine with a GPU") from None
        raise


@dataclass
class ZooSupport:
    """What adt-ft can do with one zoo entry; `why` explains every scope or attack left out."""

    entry: ZooEntry
    verdict: str                      # ALL, LAST_LAYER or REFUSED
    head: str | None = None           # the final nn.Linear (trained by --scope last-layer)
    tap: str | None = None            # the feature attack's pre-pool tap, None: the penultimate fallback
    batchnorm: bool = False
    built_on: str = "meta"
    scopes: list[str] = field(default_factory=list)
    attacks_left_out: list[str] = field(default_factory=list)
    why: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable report, one fact per line."""
        e = self.entry
        out = [f"{e.name} ({e.dataset}/{e.threat_model}, {e.architecture}): {self.verdict}"]
        if self.head is not None and self.verdict != REFUSED:
            out.append(f"  head (last layer): {self.head}")
            out.append(f"  feature tap: {self.tap or 'penultimate (no feature map before the head)'}")
            out.append(f"  BatchNorm: {'yes' if self.batchnorm else 'no'}")
        out.append(f"  training scopes: {', '.join(self.scopes) or 'none'}"
                   + (" (methods: pgd-at, trades, exp, exp-am, imp-am, wdat)" if self.scopes else ""))
        out.append("  attacks: " + ("all" if not self.attacks_left_out else
                                    "all but " + ", ".join(self.attacks_left_out)))
        out.extend(f"  why: {w}" for w in self.why)
        if e.threat_model == "corruptions":
            out.append("  note: a corruptions model has no norm ball to attack or train in: eval takes it with the "
                       "corruptions suite only, and training refuses it")
        return out


def check_model(entry: ZooEntry, model: nn.Module, device: str) -> ZooSupport:
    """Run the checks on an already built (unweighted) model."""
    size = IMAGE_SIZE[entry.dataset]
    example = torch.zeros(2, 3, size, size, device=device)
    support = ZooSupport(entry, ALL, built_on=device,
                         batchnorm=any(isinstance(m, _BatchNorm) for m in model.modules()))
    try:
        support.head, head, support.tap = find_head_and_feature_map(model, example[:1])
    except UserError as e:
        support.verdict, support.attacks_left_out = REFUSED, ["feature"]
        support.why.append(f"{e}")
        return support
    refusal = head_refusal(head, support.head, DATASET_CLASSES[entry.dataset])
    if refusal is not None:
        support.verdict, support.attacks_left_out = REFUSED, ["feature"]
        support.why.append(refusal + "; the other attacks apply")
        return support
    refusal = train_mode_refusal(model, example)
    support.scopes = ["full", "last-layer"]
    if refusal is not None:
        support.verdict, support.scopes = LAST_LAYER, ["last-layer"]
        support.why.append(f"scope full: {refusal}; last-layer keeps the body in eval mode")
        last_layer_refusal = train_mode_refusal(model, example, only=head)
        if last_layer_refusal is not None:
            support.verdict, support.scopes = REFUSED, []
            support.why.append(f"scope last-layer: {last_layer_refusal}")
    return support


@contextlib.contextmanager
def _quiet():
    """RobustBench's ensemble constructors print their sizes and settings, and their forward passes warn
    about deprecated autocast calls: none of it is about the check."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _signature(model: nn.Module) -> tuple:
    """What makes two built architectures the same for these checks: the module tree (names and
    classes) and every parameter's and buffer's shape."""
    return (tuple((n, type(m).__qualname__) for n, m in model.named_modules()),
            tuple((n, tuple(t.shape)) for n, t in [*model.named_parameters(), *model.named_buffers()]))


def check_entry(entry: ZooEntry, cache: dict | None = None) -> ZooSupport:
    """Build `entry`'s architecture (no download) and check what adt-ft can do with it: on the meta
    device when its constructor and forward pass allow (some read tensor values back), else on the CPU.
    A constructor that needs CUDA on a machine without it is a REFUSED entry, not an error.

    `cache` (a dict the caller keeps) lets entries of one architecture share a check: the zoo has
    206 loadable entries but far fewer distinct architectures."""
    if not entry.loadable:
        raise UserError(f"{entry.name} is on RobustBench's {entry.dataset}/{entry.threat_model} leaderboard but "
                        "RobustBench ships no checkpoint or architecture for it")
    cache = {} if cache is None else cache
    key = None
    # Imported outside the meta mode: a module imported inside it would keep meta tensors as its
    # constants for the rest of the process (torchdiffeq's Butcher tableaux, for one).
    rb.model_dicts()
    import timm  # noqa: F401
    try:
        with _quiet(), _MetaDevice():
            model = _build_zoo(entry)
            key = (entry.dataset, _signature(model))
            if key not in cache:
                cache[key] = check_model(entry, model, "meta")
    except (RuntimeError, NotImplementedError, AssertionError, TypeError):
        if key is not None:
            cache[key] = None  # a meta tensor cannot do what this constructor or forward pass asks
    if cache.get(key) is not None:
        return replace(cache[key], entry=entry)
    try:
        with _quiet():
            model = _build_on_cpu(entry)
    except UserError as e:
        return ZooSupport(entry, REFUSED, built_on="-", why=[str(e)])
    # Where a constructor puts some tensors on the GPU itself (Bai2023Improving), the rest must follow.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    key = (entry.dataset, "real", _signature(model))
    if key not in cache:
        with _quiet():
            cache[key] = check_model(entry, model.to(device), device)
    return replace(cache[key], entry=entry)
