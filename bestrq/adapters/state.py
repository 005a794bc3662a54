"""Copying an adapter file's tensors into a module's, checked: the one rule both kinds follow."""

from __future__ import annotations

import torch
from torch import Tensor


def copy_matching(own: dict[str, Tensor], given: dict[str, Tensor], what: str,
                  hint: str = "") -> None:
    """Copy `given` into the module's tensors `own`, in place. Names must match exactly
    (KeyError naming the first missing and unexpected) and shapes too (ValueError naming the
    tensor; `hint` says what a wrong shape usually means). what: the tensors, in words."""
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    if missing or unexpected:
        raise KeyError(f"{what} do not match the model: missing {missing[:4]}, "
                       f"unexpected {unexpected[:4]}")
    with torch.no_grad():
        for name, param in own.items():
            if given[name].shape != param.shape:
                raise ValueError(f"{what}: {name}: shape {tuple(given[name].shape)} != "
                                 f"{tuple(param.shape)}{hint}")
            param.copy_(given[name])
