"""Process-group set-up for single- and multi-process (torchrun) training.

The same command trains on one process or many: `launch_torchrun` re-runs a module under
`torch.distributed.run`, which sets RANK / WORLD_SIZE / LOCAL_RANK, and `init_distributed` reads
them (or, without them, describes a single process).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def current() -> DistInfo:
    """This process's place in an initialised process group (or a single process)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank,
                        _default_device(local_rank))
    return DistInfo(0, 1, 0, _default_device(0))


def resolve_device(name: str) -> torch.device:
    """A config device string ("auto", "cpu", "cuda:1", ...) as a torch.device; "auto" is this
    process's GPU under torchrun, else the first GPU, else the CPU."""
    return current().device if name == "auto" else torch.device(name)


def init_distributed() -> DistInfo:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU), or describe one process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return current()
    if not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            device = _default_device(local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return current()


def is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed_session() -> Iterator[DistInfo]:
    """`init_distributed` for the duration of a block. On a clean exit every rank waits for the
    others (rank 0 may still be writing), then the group is destroyed: a process that exits with a
    live gloo group can abort in its C++ destructors ("terminate called without an active
    exception"), which torchrun reports as a failed run."""
    info = init_distributed()
    try:
        yield info
        barrier()
    finally:
        cleanup()


def launch_torchrun(nproc: int, module: str, args: list[str]) -> int:
    """Run `python -m module *args` on `nproc` local processes under torchrun; its exit code."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(nproc), "-m", module, *args]
    return subprocess.run(command, check=False).returncode
