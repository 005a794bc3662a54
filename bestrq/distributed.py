"""Process-group set-up for single- and multi-process (torchrun) training.

The same command trains on one process or many: `launch_torchrun` re-runs a module under
`torch.distributed.run`, which sets RANK / WORLD_SIZE / LOCAL_RANK, and `init_distributed` reads
them (or, without them, describes a single process). Across machines, `Nodes` says which one this
is and where node 0 listens (`nodes_from_env`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# resolve_device is re-exported: the training code resolves its `device` knob from here.
from bestrq.device import default_device
from bestrq.device import resolve_device as resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current() -> DistInfo:
    """This process's place in an initialised process group (or a single process)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank,
                        default_device(local_rank))
    return DistInfo(0, 1, 0, default_device(0))


def init_distributed() -> DistInfo:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU), or describe one process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return current()
    if not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            device = default_device(local_rank)
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


def same_on_every_rank(value: Any, what: str) -> None:
    """ValueError on every rank unless all ranks hold an equal `value` (e.g. a digest of the
    parameters and data each one read): machines that do not share a disk each read their own
    copies, and a rank with other ones would train something else in lockstep, silently."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    odd = [rank for rank, v in enumerate(values) if v != values[0]]
    if odd:
        raise ValueError(
            f"{what} of rank(s) {', '.join(map(str, odd))} differ from rank 0's: every machine "
            "must run the same commit with the same params.yaml and data (dvc pull)")


# This machine's place in a run across machines. Environment variables, not params.yaml keys:
# params.yaml is one file, the same on every machine and recorded by DVC, while the node rank
# differs from machine to machine and node 0's address says where a run happens, not what it
# computes. The number of machines changes the global batch, so it is a parameter (`nnodes`).
NODE_RANK_ENV = "BESTRQ_NODE_RANK"
MASTER_ADDR_ENV = "BESTRQ_MASTER_ADDR"
MASTER_PORT_ENV = "BESTRQ_MASTER_PORT"
DEFAULT_MASTER_PORT = 29500  # torchrun's


@dataclass(frozen=True)
class Nodes:
    """The machines of a torchrun launch: how many, which one this is, where node 0 listens."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT

    def torchrun_args(self) -> list[str]:
        if self.nnodes == 1:
            return ["--standalone"]  # a private rendezvous on a free local port
        # Static rendezvous: each machine's rank is the one it was given, so global rank 0, the
        # one that logs and writes, runs on node 0 (c10d would number nodes as they arrive).
        return ["--nnodes", str(self.nnodes), "--node_rank", str(self.node_rank),
                "--master_addr", self.master_addr, "--master_port", str(self.master_port)]


def _env_int(env: Mapping[str, str], name: str, low: int, high: int, meaning: str) -> int:
    text = env[name].strip()
    if not text.isdigit() or not low <= int(text) <= high:
        raise ValueError(f"{name}: must be an integer in [{low}, {high}] ({meaning}), "
                         f"got {env[name]!r}")
    return int(text)


def nodes_from_env(nnodes: int, env: Mapping[str, str] | None = None) -> Nodes:
    """This machine's place among `nnodes` machines, from BESTRQ_NODE_RANK, BESTRQ_MASTER_ADDR
    and BESTRQ_MASTER_PORT (default 29500); ValueError naming the variable when one is missing
    or bad. With one machine they are not needed; a node rank other than 0 is refused, as it
    means this machine's params.yaml does not say how many machines there are."""
    env = os.environ if env is None else env
    if nnodes < 1:
        raise ValueError(f"nnodes must be >= 1, got {nnodes}")
    if nnodes == 1:
        if env.get(NODE_RANK_ENV, "0").strip() not in ("", "0"):
            raise ValueError(f"{NODE_RANK_ENV}={env[NODE_RANK_ENV]} but nnodes is 1: set "
                             "nnodes to the number of machines in params.yaml on every machine")
        return Nodes()
    missing = [name for name in (NODE_RANK_ENV, MASTER_ADDR_ENV) if not env.get(name, "").strip()]
    if missing:
        raise ValueError(f"nnodes is {nnodes}: set {' and '.join(missing)} ({NODE_RANK_ENV}: 0 "
                         f"on the machine at {MASTER_ADDR_ENV}, 1 to {nnodes - 1} on the others)")
    node_rank = _env_int(env, NODE_RANK_ENV, 0, nnodes - 1, f"nnodes is {nnodes}")
    port = DEFAULT_MASTER_PORT
    if env.get(MASTER_PORT_ENV, "").strip():
        port = _env_int(env, MASTER_PORT_ENV, 1, 65535, "a TCP port")
    return Nodes(nnodes, node_rank, env[MASTER_ADDR_ENV].strip(), port)


def launch_torchrun(nproc: int, module: str, args: list[str], nodes: Nodes | None = None) -> int:
    """Run `python -m module *args` under torchrun on `nproc` processes on this machine, one
    machine of `nodes` (default: this one alone); its exit code."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    nodes = nodes or Nodes()
    command = [sys.executable, "-c", _TORCHRUN, *nodes.torchrun_args(),
               "--nproc_per_node", str(nproc), "-m", module, *args]
    return subprocess.run(command, check=False).returncode


# `python -m torch.distributed.run`, with its parser's abbreviations off: with them, an option
# of the module after its name that starts one of torchrun's (`train --nproc 2`: --nproc_per_node)
# is refused as ambiguous before the rest of the line is handed to the module.
_TORCHRUN = ("import sys; from torch.distributed.run import get_args_parser, run; "
             "parser = get_args_parser(); parser.allow_abbrev = False; "
             "run(parser.parse_args(sys.argv[1:]))")
