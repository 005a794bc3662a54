"""Adapters: the small trainable part of a frozen Whisper, behind one interface.

Two kinds, one set of verbs, so that the training engine, the adapter files, evaluation and
export never ask which one they hold:
- `ia3` (ia3.py): vectors rescaling keys, values and the FFN's hidden activation;
- `lora` (lora.py): PEFT's low-rank updates of chosen Linears.

add_adapter(module, config)        -> trainable tensor names (everything else frozen)
adapter_state_dict(module)         -> {name: tensor} of the kind the module holds
load_adapter_state_dict(module, t) -> copy a file's tensors in (names and shapes checked)
adapter_disabled(module)           -> context: the stock module's output, nothing copied
merge_adapter(module)              -> fold into the weights: a stock Whisper module
count_adapter_parameters(module)   -> trainable scalars
identity_state_dict(module)        -> the values at which the module computes as stock
A module holds one kind: adding the other is refused, naming both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import torch
from torch import Tensor, nn

from bestrq.adapters.ia3 import (
    add_ia3,
    ia3_disabled,
    ia3_state_dict,
    load_ia3_state_dict,
    merge_ia3,
)
from bestrq.adapters.lora import (
    TARGETS,
    add_lora,
    lora_disabled,
    lora_state_dict,
    merge_lora,
    target_pattern,
)
from bestrq.adapters.state import copy_matching
from bestrq.knobs import check, knob

Kind = Literal["ia3", "lora"]
KINDS: tuple[str, ...] = get_args(Kind)
Target = Literal[tuple(TARGETS)]  # type: ignore[valid-type]


@dataclass(frozen=True)
class AdapterConfig:
    """Which adapter, and its shape (the lora_* fields matter only to LoRA)."""

    adapter: Annotated[Kind, knob(
        "what is trained, in pre-training (encoder) and the fine-tune (encoder and decoder): "
        "ia3 (vectors on k, v, FFN) | lora (PEFT's LoRA on lora_targets)")] = "ia3"
    lora_rank: Annotated[int, knob("LoRA's rank r (PEFT's Whisper recipe: 32)",
                                   ge=1, le=4096)] = 32
    lora_alpha: Annotated[float, knob("LoRA's alpha: the update is scaled by alpha / r",
                                      gt=0, le=10**6)] = 64.0
    # strict=False: params.yaml gives a list, the config holds a tuple.
    lora_targets: Annotated[tuple[Target, ...], knob(
        "Linears LoRA adapts, in every block (a list of query, key, value, out, fc1, fc2; "
        "attention targets in self- and cross-attention)",
        min_length=1, max_length=len(TARGETS), strict=False)] = ("query", "value")

    @property
    def kind(self) -> str:
        return self.adapter

    def validate(self) -> None:
        """ValueError naming the bad fields and what they must be."""
        check(self)
        if len(set(self.lora_targets)) != len(self.lora_targets):
            raise ValueError(f"lora_targets: names a target twice: {list(self.lora_targets)!r}")
        target_pattern(self.lora_targets)

    def to_dict(self) -> dict[str, Any]:
        """What an adapter file records: the kind, and LoRA's shape where it is LoRA."""
        if self.kind == "ia3":
            return {"kind": "ia3"}
        return {"kind": self.kind, "lora_rank": self.lora_rank,
                "lora_alpha": float(self.lora_alpha), "lora_targets": list(self.lora_targets)}

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> AdapterConfig:
        """The inverse of `to_dict` (a file names the knob `adapter` "kind"); None (files made
        before LoRA) is IA^3."""
        values = dict(values or {"kind": "ia3"})
        values["adapter"] = values.pop("kind")
        if "lora_targets" in values:
            values["lora_targets"] = tuple(values["lora_targets"])
        config = cls(**values)
        config.validate()
        return config


IA3 = AdapterConfig()


def adapter_kind(module: nn.Module) -> str | None:
    """The kind of adapter `module` holds, None if none."""
    if ia3_state_dict(module):
        return "ia3"
    if lora_state_dict(module):
        return "lora"
    return None


def add_adapter(module: nn.Module, config: AdapterConfig, seed: int = 0) -> list[str]:
    """Add `config`'s adapter to every Whisper block under `module`, in place; freeze the rest.

    Returns the adapter's tensor names. seed: LoRA's A draw (IA^3 starts at one). Idempotent;
    a module that already holds the other kind is refused (ValueError naming both)."""
    config.validate()
    held = adapter_kind(module)
    if held is not None and held != config.kind:
        raise ValueError(f"the model already holds a {held} adapter; a {config.kind} adapter "
                         "cannot be added beside it")
    if config.kind == "ia3":
        return add_ia3(module)
    return add_lora(module, config.lora_rank, config.lora_alpha, config.lora_targets, seed)


def adapter_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors of `module` (IA^3 vectors or LoRA matrices), by stock module name."""
    return {**ia3_state_dict(module), **lora_state_dict(module)}


def identity_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """Values of `module`'s adapter tensors at which it computes as the stock module: IA^3's
    vectors at one, LoRA's B at zero (A as it is, so that training can start from there)."""
    out: dict[str, Tensor] = {}
    for name, value in adapter_state_dict(module).items():
        if name.endswith(".lora_B"):
            out[name] = torch.zeros_like(value)
        elif name.endswith(".lora_A"):
            out[name] = value.detach().clone()
        else:
            out[name] = torch.ones_like(value)
    return out


def load_adapter_state_dict(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Copy adapter tensors into `module`, which must already hold that adapter; names and
    shapes must match exactly (KeyError / ValueError naming the first that does not)."""
    if adapter_kind(module) == "ia3":
        load_ia3_state_dict(module, tensors)
        return
    copy_matching(lora_state_dict(module), tensors, "LoRA tensors", " (another lora_rank?)")


@contextmanager
def adapter_disabled(module: nn.Module) -> Iterator[None]:
    """Within the block, `module` computes as the stock model (see `ia3_disabled`,
    `lora_disabled`); safe inside a forward whose graph holds the adapter."""
    with ExitStack() as stack:
        stack.enter_context(ia3_disabled(module))
        stack.enter_context(lora_disabled(module))
        yield


def merge_adapter(module: nn.Module) -> nn.Module:
    """Fold the adapter into the weights, in place: a stock Whisper module that computes what
    the adapted one does."""
    return merge_lora(merge_ia3(module))


def count_adapter_parameters(module: nn.Module) -> int:
    """Scalars of the adapter in `module` (IA^3: 6 d per encoder layer, 8 d per decoder layer;
    LoRA: r (in + out) per targeted Linear)."""
    return sum(v.numel() for v in adapter_state_dict(module).values())


__all__ = ["IA3", "KINDS", "TARGETS", "AdapterConfig", "adapter_disabled", "adapter_kind",
           "adapter_state_dict", "add_adapter", "count_adapter_parameters",
           "identity_state_dict", "load_adapter_state_dict", "merge_adapter"]
