"""LoRA (arXiv 2106.09685) for openai-whisper models, from PEFT's layers.

Each targeted Linear W gets a low-rank update: W x + (alpha / r) B A x, A (r, in) and B (out, r),
A drawn as PEFT draws it (Kaiming-uniform) and B zero, so an adapted model starts as the stock
one. PEFT's `inject_adapter_in_model` wraps the modules in place (no PeftModel around Whisper),
so the attention's `key` and `value` are then PEFT's wrappers and whisper's kv-cache hooks, which
sit on those modules, cache the adapted projections.

Targets are named as in Whisper's blocks: query, key, value, out (self- and cross-attention) and
fc1, fc2 (the FFN's `mlp.0`, `mlp.2`). The PEFT Whisper recipe is r=32, alpha=64 on query and
value. Dropout is off: a run is a function of its seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

ADAPTER_NAME = "default"  # PEFT's name for the one adapter a module holds
# Whisper's module names (relative to a block) of each target.
TARGETS: dict[str, str] = {
    "query": r"(attn|cross_attn)\.query",
    "key": r"(attn|cross_attn)\.key",
    "value": r"(attn|cross_attn)\.value",
    "out": r"(attn|cross_attn)\.out",
    "fc1": r"mlp\.0",
    "fc2": r"mlp\.2",
}


def target_pattern(targets: Sequence[str]) -> str:
    """PEFT's `target_modules` regex (a full match on module names) for Whisper targets."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"lora_targets: must be a non-empty list of {', '.join(TARGETS)}, got "
                         f"{list(targets)!r}")
    return r"(.*\.)?blocks\.\d+\.(" + "|".join(TARGETS[t] for t in targets) + ")"


def lora_layers(module: nn.Module) -> dict[str, LoraLayer]:
    """The LoRA-wrapped Linears under `module`, by the name of the module they replace."""
    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def add_lora(module: nn.Module, rank: int, alpha: float, targets: Sequence[str],
             seed: int = 0) -> list[str]:
    """Wrap the targeted Linears of every Whisper block under `module` with LoRA, in place.

    Freezes every other parameter of `module` and returns the names of the LoRA tensors.
    A's draw is made from `seed`, never from the global RNG (which is left as it was).
    Idempotent like `add_ia3`: LoRA already there is kept, values and trainability alike.
    """
    pattern = target_pattern(targets)
    existing = lora_layers(module)
    kept = {id(p) for layer in existing.values() for p in layer.parameters()
            if p.requires_grad}
    for p in module.parameters():
        if id(p) not in kept:
            p.requires_grad_(False)
    if not existing:
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                            target_modules=pattern)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)
    return list(lora_state_dict(module))


def lora_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The LoRA matrices of `module`, named by the module they adapt and the factor
    (e.g. `blocks.0.attn.query.lora_A` (r, in), `blocks.0.attn.query.lora_B` (out, r))."""
    out: dict[str, Tensor] = {}
    for name, layer in lora_layers(module).items():
        out[f"{name}.lora_A"] = layer.lora_A[ADAPTER_NAME].weight
        out[f"{name}.lora_B"] = layer.lora_B[ADAPTER_NAME].weight
    return out


@contextmanager
def lora_disabled(module: nn.Module) -> Iterator[None]:
    """Within the block, every LoRA layer under `module` computes its base Linear alone.
    PEFT's switch also changes the adapters' `requires_grad`; the flags are put back as they
    were, so a frozen adapter (evaluation) stays frozen and a trained one trainable."""
    layers = list(lora_layers(module).values())
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.no_grad()
def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base Linear (W <- W + (alpha / r) B A) and put the base
    Linear back in the wrapper's place, in place: the result is a stock Whisper module."""
    for name, layer in lora_layers(module).items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    return module
