"""Which device a config's `device` knob names. Its own module, so that the features stage
resolves `features.device` without depending on the training processes' set-up
(`bestrq.distributed`, which imports this)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def default_device(local_rank: int) -> torch.device:
    """The GPU of local rank `local_rank` (round robin over the visible ones), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """A config device string ("auto", "cpu", "cuda:1", ...) as a torch.device; "auto" is this
    process's GPU under torchrun, else the first GPU, else the CPU."""
    if name != "auto":
        return torch.device(name)
    joined = dist.is_available() and dist.is_initialized()
    return default_device(int(os.environ.get("LOCAL_RANK", "0")) if joined else 0)
