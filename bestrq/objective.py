"""What a training run optimises (`Objective`), as the engine (`bestrq.train`) sees it: how
clips become items, how items become batches, which trainable tensors form which optimiser
group, and the FLOPs of an update. BEST-RQ's is `bestrq.pretraining.BEST_RQ`, the fine-tune's
`bestrq.finetune.FINETUNE`; the engine knows neither.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn
from torch.utils.data import Dataset


class StepOutput(Protocol):
    """What a trainable model's forward returns for a micro-batch."""
    loss: Tensor  # scalar fp32: mean over the micro-batch's `count` units
    count: int  # units the loss averages over (masked targets, target tokens)
    metrics: dict[str, float]


@dataclass
class ParamGroup:
    """Trainable tensors that share an optimiser group: a rate schedule and a decay.

    name: "" for the main group (its rate is logged as `learning_rate`), else the rate is logged
    as `learning_rate_<name>`. decays: AdamW's `weight_decay` applies. leads: the group trains
    alone for the first `heads_only_steps` updates and the other groups' schedules (warm-up
    included) start when that phase ends; with no leading group every schedule starts at 0."""
    name: str
    params: list[nn.Parameter] = field(default_factory=list)
    decays: bool = False
    leads: bool = False


def one_group(model: nn.Module) -> list[ParamGroup]:
    """Every trainable tensor in one undecayed group, on one schedule."""
    return [ParamGroup("", list(model.trainable_parameters().values()))]


@dataclass(frozen=True)
class Objective:
    """What a run optimises; `bestrq.train.train` is the same loop for every objective.

    The model (an nn.Module with `trainable_parameters()`) is called as
    `model(*batch, with_metrics=...)` and returns a `StepOutput`. A batch starts with
    (mel (batch, n_mels, frames), valid frames (batch,)); what follows is the objective's own.
    `items(model, dataset, seed)` turns the clips into a dataset keyed by (epoch, clip), with any
    per-clip randomness drawn from the clip's own seed; `collate` batches its items (None: torch's
    default); `groups(model)` splits the trainable tensors into optimiser groups (the main one
    first); `flops(model, clips, count)` counts the model FLOPs of one update, for MFU.
    """
    name: str
    items: Callable[[nn.Module, Dataset, int], Dataset]
    collate: Callable[[list[Any]], tuple[Tensor, ...]] | None = None
    groups: Callable[[nn.Module], list[ParamGroup]] = one_group
    flops: Callable[[nn.Module, int, int], float] | None = None
