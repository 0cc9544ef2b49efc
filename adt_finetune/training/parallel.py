"""What changes when a run trains on several processes under torchrun (README, "Scaling out").

    wrap(model, world)        the classifier in DistributedDataParallel; the methods' perturbation
                              searches bypass it (they run with the classifier in eval mode)
    convert_sync_bn(model)    --sync-bn: BatchNorm over the whole batch, on GPUs and on CPUs (gloo)
    reseed(seed, step, rank)  each process's RNG streams from (seed, step, rank), so resume needs none
    StepSync                  the per-step collectives: metrics, the method's gradients, buffers

A plain process (no torchrun) gets none of it and trains exactly as before; under torchrun with
one process the DDP path runs (a check of the backend) but computes what one process would.
"""
from __future__ import annotations

import hashlib
import inspect
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.parallel import DistributedDataParallel

from ..distributed import World, all_reduce_sum_, average_, broadcast_


class TrainForwardDDP(DistributedDataParallel):
    """DistributedDataParallel whose eval-mode forwards go straight to the module.

    Every method searches its perturbations with the classifier in eval mode (`nets.eval_mode`
    on the model it is given) and differentiates those passes with respect to the input only;
    through DDP each would prepare the reducer for a backward that never comes. Only the
    training forwards (this wrapper in train mode, see `set_training`) go through DDP, whose
    reducer then averages exactly the gradients of the training loss across processes. The
    wrapper's own flag carries train mode, so with --scope last-layer (body in eval mode, head
    in train mode) the head's training forwards still go through DDP.
    """

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if not self.training:
            return self.module(*inputs, **kwargs)
        return super().forward(*inputs, **kwargs)


def _per_tensor_allreduce(group, bucket):  # unannotated: DDP checks the hook's annotations against its own
    """DDP communication hook: the bucket's gradients averaged one parameter at a time.

    An all-reduce sums each element in an order set by its position in the buffer. DDP lays
    its buckets out afresh in every process (and rebuilds them after the first step), so a
    resumed run would sum its first step in another order than an uninterrupted one; per
    parameter, the order depends only on the parameter, and resume stays bit-identical.
    Measured with gloo on 3 processes (pgd-at, a SmallCNN of width 32, killed after step 5 and
    resumed from step 4): DDP's own hook ends with other weights, this one with the same bits.
    (With 2 processes every sum is a + b and either hook is exact.) The cost is one all-reduce
    call per parameter instead of per bucket, still overlapped with the backward pass.
    """
    group = group if group is not None else dist.group.WORLD
    size = dist.get_world_size(group)
    buffer = bucket.buffer()
    works, offset = [], 0
    for p in bucket.parameters():
        works.append(dist.all_reduce(buffer[offset:offset + p.numel()], group=group, async_op=True))
        offset += p.numel()

    def done(_: Any) -> torch.Tensor:
        return buffer.div_(size)

    return torch.futures.collect_all([w.get_future() for w in works]).then(done)


def wrap(model: nn.Module, world: World) -> nn.Module:
    """The module the methods train: `model` itself in a plain process, else TrainForwardDDP."""
    if not world.distributed:
        return model
    kwargs: dict[str, Any] = {}
    # Buffers are averaged after every step (StepSync) instead of broadcast from rank 0 at each forward.
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    if world.device.type == "cuda":
        kwargs["device_ids"] = [world.device.index]
    ddp = TrainForwardDDP(model, **kwargs)
    ddp.register_comm_hook(None, _per_tensor_allreduce)
    return ddp


def set_training(trained: nn.Module, model: nn.Module) -> None:
    """Mark the DDP wrapper (if any) as in train mode without touching its module's flags."""
    if trained is not model:
        trained.training = True


# ---------------------------------------------------------------- SyncBatchNorm on any device

class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes; its gradient is the sum of every process's gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlooSyncBatchNorm(_BatchNorm):
    """SyncBatchNorm for devices torch's kernels do not cover (CPUs with gloo), so --sync-bn works,
    and is tested, everywhere; on GPUs `convert_sync_bn` uses torch's own nn.SyncBatchNorm.

    Every process's (mean, biased variance, count) per channel is gathered in one all-reduce and
    combined exactly (the parallel variance of Chan et al.), then the input is normalised as
    BatchNorm does; autograd through the all-reduce gives each process the gradient of the whole
    batch's loss, as torch's kernels do. Outside training, or alone, it is plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        return self._forward_synced(input)

    def _forward_synced(self, x: torch.Tensor) -> torch.Tensor:
        factor = self.momentum if self.momentum is not None else 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        dims = [0, *range(2, x.dim())]
        c, rank, size = x.shape[1], dist.get_rank(), dist.get_world_size()
        local = torch.cat([x.mean(dims), x.var(dims, unbiased=False),
                           x.new_full((1,), float(x.numel() // c))]).float()
        rows = [local if r == rank else torch.zeros_like(local) for r in range(size)]
        table = _AllReduceSum.apply(torch.stack(rows))
        means, variances, counts = table[:, :c], table[:, c:2 * c], table[:, 2 * c:].detach()
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        var = (counts * (variances + (means - mean).square())).sum(0) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(factor * mean.detach())
                self.running_var.mul_(1 - factor).add_(factor * var.detach() * total / (total - 1).clamp_min(1))
        shape = [1, c] + [1] * (x.dim() - 2)
        out = (x - mean.view(shape).to(x.dtype)) * torch.rsqrt(var.view(shape) + self.eps).to(x.dtype)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


_PLAIN_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_SYNCED = (nn.SyncBatchNorm, GlooSyncBatchNorm)


def _swap(module: nn.Module, new: nn.Module) -> nn.Module:
    """`new` holding `module`'s parameters and buffers (the same tensors) and mode."""
    for name, p in module.named_parameters(recurse=False):
        setattr(new, name, p)
    for name, b in module.named_buffers(recurse=False):
        setattr(new, name, b)
    new.training = module.training
    return new


def _rebuilt(module: nn.Module, cls: type) -> nn.Module:
    return _swap(module, cls(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats))


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every torch BatchNorm1d/2d/3d by a synchronised one, in place (the same parameter and
    buffer tensors, so optimisers and state-dict keys are unchanged): torch's nn.SyncBatchNorm on
    GPUs, GlooSyncBatchNorm elsewhere. Returns the model."""
    cls = nn.SyncBatchNorm if device.type in ("cuda", "xpu", "hpu") else GlooSyncBatchNorm
    for name, child in list(model.named_children()):
        if type(child) in _PLAIN_BATCHNORM:
            new = _rebuilt(child, cls)
            new.plain_class = type(child)  # type: ignore[assignment]
            setattr(model, name, new)
        else:
            convert_sync_bn(child, device)
    return model


def revert_sync_bn(model: nn.Module) -> nn.Module:
    """Undo `convert_sync_bn`: the BatchNorm classes the model was built with, in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, _SYNCED) and hasattr(child, "plain_class"):
            setattr(model, name, _rebuilt(child, child.plain_class))
        else:
            revert_sync_bn(child)
    return model


# ---------------------------------------------------------------- randomness and per-step collectives

def reseed(seed: int, step: int, rank: int) -> None:
    """Seed every RNG of this process from (seed, step, rank).

    With keyed randomness (--example-seeds, always with several processes) each step's draws
    that are not keyed per example (ADT-EXP's samples, the generators' noise, dropout) come from
    here: different on every process, and a function of the step alone, so a resumed run needs
    no RNG state from the others.
    """
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    value = int.from_bytes(digest, "little") >> 1
    random.seed(value)
    np.random.seed(value % (2**32))
    torch.manual_seed(value)


def _running_statistics(modules: list[nn.Module]) -> list[torch.Tensor]:
    """The BatchNorm running means and variances in `modules`: the buffers a training step changes
    differently on each process. Constant buffers (a model's input normalisation) are left alone:
    averaging equal values over 3 processes can round them."""
    return [t for root in modules for m in root.modules() if isinstance(m, _NormBase) and m.track_running_stats
            for t in (m.running_mean, m.running_var) if t is not None]


class StepSync:
    """The collectives of one training step under torchrun (all no-ops in a world of one)."""

    def __init__(self, world: World, model: nn.Module, method_modules: list[nn.Module], sync_model_buffers: bool):
        self.world = world
        self.method_modules = method_modules
        self.method_params = [p for m in method_modules for p in m.parameters() if p.requires_grad]
        self.buffers = _running_statistics([model] if sync_model_buffers else []) + _running_statistics(method_modules)

    def start(self) -> None:
        """Every process starts from rank 0's method networks (DDP does the same for the classifier)."""
        broadcast_(self.world, [p.data for m in self.method_modules for p in m.parameters()] +
                   [b for m in self.method_modules for b in m.buffers()])

    def metrics(self, metrics: dict[str, float], n: int) -> dict[str, float]:
        """The step's metrics averaged over every process's share of the batch (weighted by size)."""
        if self.world.size == 1:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] * n for k in keys] + [float(n)], dtype=torch.float64, device=self.world.device)
        all_reduce_sum_(self.world, t)
        return {k: float(v) for k, v in zip(keys, (t[:-1] / t[-1]).tolist())}

    def method_gradients(self) -> None:
        """Average the method's own gradients (generators, q_ψ) as DDP averages the classifier's."""
        grads = [p.grad for p in self.method_params if p.grad is not None]
        average_(self.world, grads)

    def buffers_after_step(self) -> None:
        """Average BatchNorm running statistics, so every process attacks with the same network and a
        checkpoint holds what every process had. Skipped where they are equal anyway (--sync-bn, or a
        frozen body under --scope last-layer)."""
        average_(self.world, self.buffers)
