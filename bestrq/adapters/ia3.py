"""IA^3 (arXiv 2205.05638 sec. 3.3) for openai-whisper models.

Learned vectors rescale the keys (l_k) and values (l_v) of every attention layer and the FFN's
hidden activation after GELU (l_ff). They start at one, so an adapted model starts as the stock
one; nothing else is trained and there are no biases. The functions walk any module that holds
whisper `ResidualAttentionBlock`s: the encoder gets 6 * d vectors per layer (self-attention
key/value, FFN) and the decoder 8 * d (self- and cross-attention key/value, FFN).

Wrapping `key`/`value` keeps whisper's kv-cache working: its hooks sit on the attention's `key`
and `value` modules, which are then the wrappers, so the cache holds the rescaled projections.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from whisper.model import MultiHeadAttention, ResidualAttentionBlock

from bestrq.adapters.state import copy_matching


class IA3Scale(nn.Module):
    """Wraps a module and multiplies its output, elementwise on the last axis, by a vector."""

    def __init__(self, inner: nn.Module, size: int,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.inner = inner
        # On the wrapped weights' device: a model moved to the GPU before adding IA^3 must not
        # get CPU vectors.
        self.scale = nn.Parameter(torch.ones(size, device=device))  # (size,)
        self.enabled = True  # False inside `ia3_disabled`: the stock module's output

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        return out * self.scale.to(x.dtype) if self.enabled else out


@contextmanager
def ia3_disabled(module: nn.Module) -> Iterator[None]:
    """Within the block, `module` computes as the stock model: every IA^3 wrapper under it
    passes its inner output through unscaled. Nothing is copied and the vectors are not
    touched, so it is safe inside a forward whose graph holds them (e.g. a distillation
    target from the same weights)."""
    wrappers = [m for m in module.modules() if isinstance(m, IA3Scale)]
    for m in wrappers:
        m.enabled = False
    try:
        yield
    finally:
        for m in wrappers:
            m.enabled = True


def _attention_layers(block: ResidualAttentionBlock) -> list[tuple[str, MultiHeadAttention]]:
    layers = [("attn", block.attn)]
    if block.cross_attn is not None:
        layers.append(("cross_attn", block.cross_attn))
    return layers


def add_ia3(module: nn.Module) -> list[str]:
    """Insert IA^3 vectors into every ResidualAttentionBlock under `module`, in place.

    Freezes every other parameter of `module` and returns the names of all its IA^3 vectors.
    Idempotent: vectors already there are kept, values and trainability alike (freezing them
    too would silently stop a model that is adapted twice, e.g. loaded then re-adapted, from
    learning).
    """
    existing = {id(v) for v in ia3_state_dict(module).values()}
    for p in module.parameters():
        if id(p) not in existing:
            p.requires_grad_(False)
    for block in module.modules():
        if not isinstance(block, ResidualAttentionBlock):
            continue
        for _, attn in _attention_layers(block):
            if not isinstance(attn.key, IA3Scale):
                attn.key = IA3Scale(attn.key, attn.key.out_features, attn.key.weight.device)
                attn.value = IA3Scale(attn.value, attn.value.out_features,
                                      attn.value.weight.device)
        if not isinstance(block.mlp[1], IA3Scale):
            block.mlp[1] = IA3Scale(block.mlp[1], block.mlp[0].out_features,
                                    block.mlp[0].weight.device)
    return list(ia3_state_dict(module))


def ia3_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The IA^3 vectors of `module`, named by the stock module they rescale
    (e.g. `blocks.0.attn.key`, `blocks.0.mlp.1`)."""
    return {name: m.scale for name, m in module.named_modules() if isinstance(m, IA3Scale)}


def load_ia3_state_dict(module: nn.Module, vectors: dict[str, Tensor]) -> None:
    """Copy IA^3 vectors into `module` (which must already have them); names must match exactly."""
    copy_matching(ia3_state_dict(module), vectors, "IA^3 vectors")


def count_ia3_parameters(module: nn.Module) -> int:
    """Number of IA^3 scalars in `module`: 6 * d per encoder layer, 8 * d per decoder layer."""
    return sum(v.numel() for v in ia3_state_dict(module).values())


@torch.no_grad()
def merge_ia3(module: nn.Module) -> nn.Module:
    """Fold every IA^3 vector into the weights it rescales and remove the wrappers, in place.

    k' = l_k * (W_k x)            -> W_k <- diag(l_k) W_k
    v' = l_v * (W_v x + b_v)      -> W_v <- diag(l_v) W_v,  b_v <- l_v * b_v
    W_2 (l_ff * h) + b_2          -> W_2 <- W_2 diag(l_ff)
    The result is a stock whisper module whose output equals the adapted one.
    """
    for block in module.modules():
        if not isinstance(block, ResidualAttentionBlock):
            continue
        for _, attn in _attention_layers(block):
            for name in ("key", "value"):
                wrapped = getattr(attn, name)
                if isinstance(wrapped, IA3Scale):
                    linear = wrapped.inner
                    scale = wrapped.scale.to(linear.weight.dtype)
                    linear.weight.mul_(scale[:, None])
                    if linear.bias is not None:
                        linear.bias.mul_(scale)
                    setattr(attn, name, linear)
        if isinstance(block.mlp[1], IA3Scale):
            scale = block.mlp[1].scale
            block.mlp[2].weight.mul_(scale.to(block.mlp[2].weight.dtype)[None, :])
            block.mlp[1] = block.mlp[1].inner
    return module
