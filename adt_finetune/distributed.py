"""torch.distributed, the way adt-ft uses it: one process per device, started by `torchrun`.

`torchrun --nproc-per-node N -m adt_finetune ...` sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT in every process; `setup` reads them and joins the
process group (NCCL when the device is a GPU, gloo on CPUs), each process on its
own GPU (cuda:LOCAL_RANK). Without those variables nothing is initialised and
every helper here acts as the single process of a world of one, so library code
calls them unconditionally.

Only rank 0 writes files and prints; `first_error` lets rank 0 take a decision
that every rank must share (refuse before any work), so that no rank waits
forever in a collective that another rank will never reach.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch

from .errors import UserError

#: how long a collective waits for the slowest rank; evaluation ranks meet once, after all their attacks
COLLECTIVE_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device
    backend: str | None     # None: a world of one, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun set them; (0, 1, 0) outside torchrun."""
    def read(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        try:
            return int(value) if value.strip() else default
        except ValueError:
            raise UserError(f"environment variable {name}={value!r} is not a whole number: it is torchrun's; "
                            "start the command with torchrun, or unset it") from None

    return read("RANK", 0), read("WORLD_SIZE", 1), read("LOCAL_RANK", 0)


def launched() -> bool:
    """Started by torchrun (or another launcher that sets its variables), even as a world of one."""
    return all(os.environ.get(v) for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def is_main_process() -> bool:
    """False on every rank but 0 of a torchrun world (read from the environment: usable before `setup`)."""
    return env_world()[0] == 0


def setup(device: str | torch.device) -> World:
    """Join torchrun's process group if torchrun started this process; the device it should use.

    `device` is the resolved device ("cpu", "cuda", "cuda:1"); under torchrun a CUDA
    device becomes cuda:LOCAL_RANK. Safe to call twice (a second call reuses the group).
    """
    rank, size, local = env_world()
    device = torch.device(device)
    if size <= 1 and not launched():  # a plain process; `torchrun --nproc-per-node 1` still gets its group
        return World(0, 1, 0, device, None)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) on this machine: give "
                            "torchrun `nproc_per_node` at most the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist = torch.distributed
    if not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise UserError(f"WORLD_SIZE={size} but {missing[0]} is not set: start the command with torchrun")
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size,
                                timeout=COLLECTIVE_TIMEOUT)
    return World(rank, size, local, device, dist.get_backend())


def teardown(world: World) -> None:
    if world.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def gather_to_main(world: World, obj: Any) -> list[Any] | None:
    """Every rank's `obj` (picklable), in rank order, on rank 0; None on the other ranks."""
    if not world.distributed:
        return [obj]
    out: list[Any] | None = [None] * world.size if world.is_main else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(world: World, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not world.distributed:
        return obj
    box = [obj if world.is_main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def first_error(world: World, check: Callable[[], Any]) -> Any:
    """Run `check` on rank 0; if it raises UserError, every rank raises it. Returns rank 0's result
    on rank 0 and None elsewhere. For checks of what only rank 0 touches (the files it will write)."""
    message, value = None, None
    if world.is_main:
        try:
            value = check()
        except UserError as e:
            message = str(e)
    message = broadcast_from_main(world, message)
    if message is not None:
        raise UserError(message)
    return value


def barrier(world: World) -> None:
    if world.distributed:
        torch.distributed.barrier()


# ---------------------------------------------------------------- training's collectives

def _failure(error: BaseException | None) -> tuple[bool, str] | None:
    """(is a UserError, message) of an exception, picklable, for the other ranks; None for no error."""
    if error is None:
        return None
    if isinstance(error, UserError):
        return True, str(error)
    return False, f"{type(error).__name__}: {error}"


def _raise(failure: tuple[bool, str], rank: int) -> None:
    user, message = failure
    if user:
        raise UserError(message)
    raise RuntimeError(f"rank {rank} failed: {message}")


def main_first(world: World, fn: Callable[[Any], tuple[Any, Any]]) -> Any:
    """Run `fn` on rank 0, then on every other rank: what rank 0 fetches or creates (a download,
    a new run folder) the others then find. fn(shared) returns (result, share); rank 0 is called
    with shared=None and its picklable `share` is handed to the others' calls. An exception on any
    rank is raised on every rank (a UserError as one, with its message), so no rank is left
    waiting in a collective another will never reach. Returns this rank's result."""
    if not world.distributed:
        return fn(None)[0]
    result, share, error = None, None, None
    if world.is_main:
        try:
            result, share = fn(None)
        except BaseException as e:  # noqa: BLE001 — every rank must learn of it, whatever it is
            error = e
    failure, share = broadcast_from_main(world, (_failure(error), share))
    if failure is not None:
        if error is not None:
            raise error
        _raise(failure, 0)
    if not world.is_main:
        try:
            result, _ = fn(share)
        except BaseException as e:  # noqa: BLE001
            error = e
    failures = [None] * world.size
    torch.distributed.all_gather_object(failures, _failure(error))
    if error is not None:
        raise error
    for rank, failure in enumerate(failures):
        if failure is not None:
            _raise(failure, rank)
    return result


def any_rank(world: World, flags: list[bool]) -> list[bool]:
    """Each flag OR-ed over the ranks (one small collective): decisions every rank must share."""
    if not world.distributed:
        return list(flags)
    t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=world.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def all_reduce_sum_(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the ranks, in place (and returned); untouched in a world of one."""
    if world.distributed:
        torch.distributed.all_reduce(tensor)
    return tensor


def _by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return list(groups.values())


def average_(world: World, tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its mean over the ranks, in one collective per dtype: the tensors are
    packed in the order given, so the summation order never depends on anything but that order."""
    if not world.distributed or not tensors:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for group in _by_dtype(tensors):
        flat = _flatten_dense_tensors([t.detach() for t in group])
        torch.distributed.all_reduce(flat)
        flat.div_(world.size)
        for t, mean in zip(group, _unflatten_dense_tensors(flat, group)):
            t.detach().copy_(mean)


def broadcast_(world: World, tensors: list[torch.Tensor]) -> None:
    """Overwrite each tensor with rank 0's, in place (one collective per dtype)."""
    if not world.distributed or not tensors:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for group in _by_dtype(tensors):
        flat = _flatten_dense_tensors([t.detach() for t in group])
        torch.distributed.broadcast(flat, src=0)
        for t, value in zip(group, _unflatten_dense_tensors(flat, group)):
            t.detach().copy_(value)
