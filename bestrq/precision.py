"""What autocast runs in: bf16 where the hardware multiplies bf16 (CUDA, or a CPU with AVX-512
BF16 or AMX), fp32 elsewhere. Training and decoding ask the same question here."""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["auto", "bf16", "fp32"]


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX), as PyTorch's build
    reports it. Elsewhere bf16 is emulated and slower than fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def wants_bf16(precision: str, device: torch.device) -> bool:
    """`precision` (auto | bf16 | fp32) resolved on `device`: auto is bf16 on CUDA and on a CPU
    with bf16 hardware."""
    if precision == "bf16":
        return True
    return precision == "auto" and (device.type == "cuda" or
                                    (device.type == "cpu" and cpu_has_bf16()))


def describe_precision(dtype: torch.dtype | None, device: torch.device) -> str:
    """One line for logs: what autocast runs in, and why."""
    if dtype is None:
        return "fp32"
    if device.type == "cpu":
        return "bf16 autocast (CPU with AVX-512 BF16 / AMX)" if cpu_has_bf16() else \
            "bf16 autocast (CPU without bf16 hardware: emulated, slow)"
    return f"bf16 autocast ({device.type})"
