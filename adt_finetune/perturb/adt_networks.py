"""The ADT-EXP-AM and ADT-IMP-AM generators, ADT-IMP-AM's entropy network, the
gradient features they read, and the generator file that doubles as an attack.

Architectures follow docs/methods.md ("ADT-EXP-AM", "ADT-IMP-AM"; Dong et al. 2020, §3.3 and App. B) and the authors' released `models/generator.py`
(the "resnet_3blocks" generator with zero padding); widths are arguments so tests
and CPU runs can use narrow ones.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..nets import eval_mode
from ..utils import atomic_torch_save
from . import tanh_gaussian as tg

GENERATOR_FILE_FORMAT = "adt-ft-generator"
GENERATOR_FILE_VERSION = 1
#: the released implicit generator encodes z into one 32×32 map (CIFAR's size)
Z_MAP_SIZE = 32


def _init_gan_weights(module: nn.Module) -> None:
    """pix2pix/CycleGAN's 'normal' init that the released generators use:
    conv and linear weights N(0, 0.02), BatchNorm weights N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def normalize_gradient(g: torch.Tensor) -> torch.Tensor:
    """g divided by its per-example mean absolute value (as MIM normalises its steps).

    Raw input gradients are orders of magnitude smaller than pixel values and shrink
    as the classifier grows robust; concatenated to x and mixed by a first conv with
    N(0, 0.02) weights, they would be all but invisible to the following BatchNorm
    until the generator had grown those weights a hundredfold. Scale-free inputs let
    it use g1 and g2 from the first step, and make it indifferent to whether the
    gradient was of a batch mean or sum.
    """
    scale = g.abs().flatten(1).mean(1).clamp_min(1e-12)
    return g / scale.view(-1, *[1] * (g.dim() - 1))


def gradient_input(g: torch.Tensor, normalize: bool, divisor: float = 1.0) -> torch.Tensor:
    """What a generator reads of an input gradient: g/mean|g| per example (normalize, adt-ft's
    default), else g/divisor. `gradient_features` returns per-example gradients (of the CE
    summed over the batch); the released code differentiates the batch MEAN, i.e. feeds
    g/B. A method trained with --no-gen-normalize-gradients therefore stores divisor = its
    batch size in the generator, and the generator keeps that scale when it is later used
    as an attack at any batch size."""
    if normalize:
        return normalize_gradient(g)
    return g if divisor == 1.0 else g / divisor


def _conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    # no bias: every conv but the last feeds a BatchNorm, and the released last conv has none either
    return nn.Conv2d(c_in, c_out, 3, stride=1, padding=1, bias=False)


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv + BN when widths differ), then ReLU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(_conv3x3(c_in, c_out), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                                  _conv3x3(c_out, c_out), nn.BatchNorm2d(c_out))
        self.shortcut = (nn.Identity() if c_in == c_out else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ResidualBackbone(nn.Module):
    """conv3x3 c_in→W, residual blocks W→2W, 2W→2W, 2W→W, conv3x3 W→c_out; stride 1 throughout,
    so the output has the input's spatial size whatever it is."""

    def __init__(self, c_in: int, c_out: int, width: int):
        super().__init__()
        self.net = nn.Sequential(
            _conv3x3(c_in, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            ResidualBlock(width, 2 * width), ResidualBlock(2 * width, 2 * width), ResidualBlock(2 * width, width),
            _conv3x3(width, c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ExplicitGenerator(nn.Module):
    """ADT-EXP-AM: [x, g1, g2] (3C channels) → (μ, σ) of the tanh-Gaussian over δ."""

    kind = "exp-am"

    def __init__(self, in_channels: int = 3, width: int = 256, normalize_gradients: bool = True,
                 gradient_divisor: float = 1.0):
        super().__init__()
        self.init_kwargs = {"in_channels": int(in_channels), "width": int(width),
                            "normalize_gradients": bool(normalize_gradients),
                            "gradient_divisor": float(gradient_divisor)}
        self.in_channels = in_channels
        self.normalize_gradients = normalize_gradients
        self.gradient_divisor = float(gradient_divisor)
        self.backbone = ResidualBackbone(3 * in_channels, 2 * in_channels, width)
        _init_gan_weights(self)

    def forward(self, x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 for the distribution even under autocast: log σ and log(1 − tanh²) lose too much in bf16
        g1, g2 = gradient_input(g1, self.normalize_gradients, self.gradient_divisor), \
            gradient_input(g2, self.normalize_gradients, self.gradient_divisor)
        out = self.backbone(torch.cat([x, g1, g2], 1)).float()
        mu, v = out[:, :self.in_channels], out[:, self.in_channels:]
        return mu, F.softplus(v)

    def sample_delta(self, x, g1, g2, eps: float, generator: tg.Rng = None) -> torch.Tensor:
        mu, sigma = self(x, g1, g2)
        return tg.sample(mu, sigma, eps, generator)[0].to(x.dtype)


class ImplicitGenerator(nn.Module):
    """ADT-IMP-AM: z ~ U(−1, 1)^z_dim, encoded by FC z_dim→256→1024 (ReLU) into one 32×32 map
    (resized to the image size), concatenated to [x, g1, g2]; the backbone outputs C channels
    and δ = ε·tanh(out).

    normalize_z (adt-ft's default for new runs; False in files written before it existed and
    in the released code): the z map divided by its per-example mean |·|. Through two
    N(0, 0.02) layers the map comes out around 0.01 while x and the normalised gradients are
    around 1, so at initialisation δ hardly depends on z; the entropy term's gradient, which
    reaches the generator only through how q_ψ reads z back from δ, then fades as q_ψ learns
    to ignore δ before δ carries z (docs/methods.md "ADT-IMP-AM")."""

    kind = "imp-am"

    def __init__(self, in_channels: int = 3, width: int = 256, z_dim: int = 64, normalize_gradients: bool = True,
                 gradient_divisor: float = 1.0, normalize_z: bool = False):
        super().__init__()
        self.init_kwargs = {"in_channels": int(in_channels), "width": int(width), "z_dim": int(z_dim),
                            "normalize_gradients": bool(normalize_gradients),
                            "gradient_divisor": float(gradient_divisor), "normalize_z": bool(normalize_z)}
        self.z_dim = z_dim
        self.normalize_gradients = normalize_gradients
        self.gradient_divisor = float(gradient_divisor)
        self.normalize_z = bool(normalize_z)
        self.z_encoder = nn.Sequential(nn.Linear(z_dim, 256), nn.ReLU(inplace=True),
                                       nn.Linear(256, Z_MAP_SIZE * Z_MAP_SIZE), nn.ReLU(inplace=True))
        self.backbone = ResidualBackbone(3 * in_channels + 1, in_channels, width)
        _init_gan_weights(self)

    def sample_z(self, n: int, device: torch.device | str, generator: tg.Rng = None) -> torch.Tensor:
        return tg.noise("uniform", (n, self.z_dim), device=device, generator=generator) * 2 - 1

    def forward(self, x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The pre-tanh output (B, C, H, W); δ/ε = tanh of it."""
        z_map = self.z_encoder(z).view(-1, 1, Z_MAP_SIZE, Z_MAP_SIZE)
        if x.shape[-2:] != z_map.shape[-2:]:
            # the released code is CIFAR-only; other sizes get the same map, resampled
            z_map = F.interpolate(z_map, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.normalize_z:
            z_map = normalize_gradient(z_map)
        g1, g2 = gradient_input(g1, self.normalize_gradients, self.gradient_divisor), \
            gradient_input(g2, self.normalize_gradients, self.gradient_divisor)
        return self.backbone(torch.cat([x, g1, g2, z_map.to(x.dtype)], 1)).float()

    def sample_delta(self, x, g1, g2, eps: float, generator: tg.Rng = None) -> torch.Tensor:
        z = self.sample_z(x.shape[0], x.device, generator)
        return (eps * torch.tanh(self(x, g1, g2, z))).to(x.dtype)


class EntropyNet(nn.Module):
    """ADT-IMP-AM's variational posterior q_ψ(z | δ), input δ/ε.

    conv5x5 C→32 s1, conv4x4 32→64 s2, conv4x4 64→128 s1, conv4x4 128→256 s2, each
    BN + LeakyReLU(0.01); global average pool; linear 256→2·z_dim → mean and
    variance = softplus. The released encoder has no padding and a fixed 4×4 pool,
    which only works for 32×32 inputs; here padding (2, 1, 2, 1) keeps every map
    non-empty down to 2×2 inputs (28×28 → 28, 14, 15, 7) and the pool is global.
    """

    def __init__(self, in_channels: int = 3, z_dim: int = 64):
        super().__init__()
        self.init_kwargs = {"in_channels": int(in_channels), "z_dim": int(z_dim)}
        self.z_dim = z_dim

        def block(c_in, c_out, k, s, p):
            return [nn.Conv2d(c_in, c_out, k, stride=s, padding=p, bias=False), nn.BatchNorm2d(c_out),
                    nn.LeakyReLU(0.01, inplace=True)]

        self.features = nn.Sequential(*block(in_channels, 32, 5, 1, 2), *block(32, 64, 4, 2, 1),
                                      *block(64, 128, 4, 1, 2), *block(128, 256, 4, 2, 1),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(256, 2 * z_dim)
        # the released encoder's own init (He-style normal over fan-out), not the GAN init
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.head.bias)

    def forward(self, delta_unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.features(delta_unit)).float()
        return out[:, :self.z_dim], F.softplus(out[:, self.z_dim:])

    def neg_entropy(self, z: torch.Tensor, delta_unit: torch.Tensor) -> torch.Tensor:
        """Mean (over z's dimensions and the batch) Gaussian negative log-likelihood of z under q(·|δ).

        The 1e-8 terms are the released code's guard against a variance that softplus
        rounds to 0.
        """
        mean, var = self(delta_unit)
        nll = (z - mean).square() / (2 * var + 1e-8) + 0.5 * torch.log(var + 1e-8) + 0.5 * math.log(2 * math.pi)
        return nll.mean()


GENERATOR_KINDS: dict[str, type[nn.Module]] = {"exp-am": ExplicitGenerator, "imp-am": ImplicitGenerator}
#: the diversity diagnostic's draws come from this seed, never from the global RNG
DIAGNOSTIC_SEED = 0


def diversity(units: torch.Tensor) -> float:
    """Mean over examples and pixels of the standard deviation of δ/ε across draws.

    `units` is (draws, B, C, H, W): several draws of δ/ε for the same inputs. 0 means
    the distribution is a point mass; a uniform δ over the whole ε-ball gives 1/√3 ≈ 0.58.
    """
    return units.float().std(0).mean().item()


def diagnostic_rng(device: torch.device | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(DIAGNOSTIC_SEED)


@contextlib.contextmanager
def modules_in_eval_mode(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Several networks in eval mode at once, each one's own flags restored afterwards."""
    with contextlib.ExitStack() as stack:
        for m in modules:
            stack.enter_context(eval_mode(m))
        yield


def gradient_features(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g1, g2, logits of x): g1 = ∇x CE(f(x), y), g2 = ∇x CE(f(x_fgsm), y), x_fgsm = clip(x + ε·sign g1).

    The classifier is in eval mode; exactly two forward and two backward passes, and
    no gradient reaches its parameters (autograd.grad with respect to the input only).
    Each example's gradient is its own (CE summed over the batch): the released code
    differentiates the batch *mean*, so its features shrink with the batch size and a
    generator trained at one batch size would see rescaled inputs when used as an
    attack at another. The logits are returned (detached) for a free clean accuracy.
    """
    x = x.detach()
    with eval_mode(model), torch.enable_grad():
        x_in = x.clone().requires_grad_(True)
        logits = model(x_in)
        (g1,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x_in)
        x_fgsm = torch.clamp(x + eps * g1.sign(), 0.0, 1.0).requires_grad_(True)
        (g2,) = torch.autograd.grad(F.cross_entropy(model(x_fgsm), y, reduction="sum"), x_fgsm)
    return g1.detach(), g2.detach(), logits.detach()


def write_generator_file(path: str | os.PathLike, generator: nn.Module, eps: float,
                         extra: dict[str, Any] | None = None) -> None:
    """Write a generator as a self-describing file (atomic; loadable with
    torch.load(weights_only=True): only plain types and tensors). `extra` holds plain
    values the writer wants back (e.g. what a cached attack generator was trained for)."""
    atomic_torch_save({
        "format": GENERATOR_FILE_FORMAT,
        "version": GENERATOR_FILE_VERSION,
        "kind": str(generator.kind),
        "eps": float(eps),
        "kwargs": dict(generator.init_kwargs),
        "state_dict": {k: v.detach().cpu() for k, v in generator.state_dict().items()},
        "extra": dict(extra or {}),
    }, path)


def save_generator(path: str | os.PathLike, method: Any) -> None:
    """Write an ADT-EXP-AM / ADT-IMP-AM method's generator (`write_generator_file`)."""
    write_generator_file(path, method.generator, method.ctx.eps)


def read_generator_file(path: str | os.PathLike,
                        device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(generator in eval mode, the `extra` it was written with) from a `write_generator_file` file."""
    gen, meta = load_generator(path, device)
    return gen, meta["extra"]


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(generator in eval mode, meta {kind, eps, kwargs, extra}) from a file written by `save_generator`."""
    if not os.path.exists(path):
        raise UserError(f"generator file {path} does not exist: train with `method` exp-am or imp-am first")
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 — any unpickling failure means "not our file"
        raise UserError(f"{path} is not a loadable generator file ({type(e).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != GENERATOR_FILE_FORMAT:
        raise UserError(f"{path} is not an adt-ft generator file")
    if blob.get("kind") not in GENERATOR_KINDS:
        raise UserError(f"{path} holds an unknown generator kind {blob.get('kind')!r}")
    gen = GENERATOR_KINDS[blob["kind"]](**blob["kwargs"])
    gen.load_state_dict(blob["state_dict"])
    meta = {"kind": blob["kind"], "eps": float(blob["eps"]), "kwargs": dict(blob["kwargs"]),
            "extra": dict(blob.get("extra") or {})}
    return gen.to(device).eval(), meta
