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


def is_main_process() -> bool:
    """False on every rank but 0 of a torchrun world (read from the environment: usable before `setup`)."""
    return env_world()[0] == 0


def setup(device: str | torch.device) -> World:
    """Join torchrun's process group if there is one; the device this process should use.

    `device` is the resolved device ("cpu", "cuda", "cuda:1"); under torchrun a CUDA
    device becomes cuda:LOCAL_RANK. Safe to call twice (a second call reuses the group).
    """
    rank, size, local = env_world()
    device = torch.device(device)
    if size <= 1:
        return World(0, 1, 0, device, None)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) on this machine: give "
                            "torchrun --nproc-per-node at most the number of GPUs")
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
