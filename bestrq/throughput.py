"""Analytic FLOP count of a BEST-RQ training step, peak FLOP rates and model FLOP utilisation.

A multiply-add is 2 FLOPs; only matrix products and convolutions are counted (norms, softmax,
GELU and the IA^3 rescalings are negligible). The backward pass computes only what training
needs: the frozen encoder weights get no weight gradients, only input gradients (1x their
forward), and nothing before the first trainable IA^3 vector is differentiated at all (conv stem,
block 0's query/key/value projections and the query side of its QK^T). The heads get input and
weight gradients (2x). Recomputation (e.g. flash-attention backward) is not counted, as usual for
MFU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from whisper.model import AudioEncoder, ModelDimensions

# Dense peak rates from NVIDIA's data sheets (no sparsity), FLOP/s.
_PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
              ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12), ("L4", 121e12))
_PEAK_TF32 = (("H100 PCIe", 378e12), ("H100", 494e12), ("H200", 494e12), ("GH200", 494e12),
              ("A100", 156e12), ("L40S", 183e12), ("A10G", 35e12), ("L4", 60e12))


@dataclass(frozen=True)
class EncoderShape:
    n_mels: int
    n_ctx: int  # encoder frames; the mel input has 2 * n_ctx frames
    d_model: int
    n_head: int
    n_layer: int


def encoder_shape(dims: ModelDimensions | AudioEncoder | tuple[int, int, int, int, int]
                  ) -> EncoderShape:
    """Shape of an audio encoder from whisper dims, the encoder itself or
    (n_mels, n_ctx, d_model, n_head, n_layer)."""
    if isinstance(dims, ModelDimensions):
        return EncoderShape(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head,
                            dims.n_audio_layer)
    if isinstance(dims, AudioEncoder):
        return EncoderShape(dims.conv1.in_channels, dims.positional_embedding.shape[0],
                            dims.conv1.out_channels, dims.blocks[0].attn.n_head, len(dims.blocks))
    return EncoderShape(*(int(v) for v in dims))


def linear_flops(tokens: int, in_features: int, out_features: int, weight_grad: bool,
                 input_grad: bool) -> tuple[int, int]:
    """(forward, backward) FLOPs of a Linear on `tokens` rows; backward counts each gradient
    that is needed (input: dY W, weight: dY^T X), each as costly as the forward."""
    forward = 2 * tokens * in_features * out_features
    return forward, forward * (int(weight_grad) + int(input_grad))


def encoder_flops(dims: ModelDimensions | AudioEncoder | tuple[int, int, int, int, int],
                  batch: int, masked_targets: int = 0, head_outputs: int = 0, group: int = 1,
                  quantizer: tuple[int, int, int, int] | None = None) -> dict[str, int]:
    """FLOPs of one training step of the IA^3-adapted encoder on `batch` clips.

    masked_targets: targets fed to the heads in the whole batch; head_outputs: num_codebooks *
    codebook_size; group: encoder frames per target (the heads take group * d_model inputs).
    quantizer: (input_dim, code_dim, num_codebooks, codebook_size) to count the label
    computation (forward only) on the masked targets, the only ones training labels.
    Returns forward, backward and total FLOPs and the forward split by part.
    """
    s = encoder_shape(dims)
    t, d = batch * s.n_ctx, s.d_model  # encoder tokens in the batch
    conv = 2 * (s.n_mels * 3) * d * (2 * t) + 2 * (d * 3) * d * t
    attention_core = 2 * batch * s.n_ctx * s.n_ctx * d  # one of QK^T or AV, all heads
    forward_blocks = backward_blocks = 0
    for layer in range(s.n_layer):
        first = layer == 0  # its input needs no gradient: x does not depend on any IA^3
        for _ in range(3):  # query, key, value
            f, b = linear_flops(t, d, d, weight_grad=False, input_grad=not first)
            forward_blocks, backward_blocks = forward_blocks + f, backward_blocks + b
        # QK^T: dK always (keys carry l_k), dQ only past block 0; AV: dA and dV.
        forward_blocks += 2 * attention_core
        backward_blocks += attention_core * (1 if first else 2) + 2 * attention_core
        for fan_in, fan_out in ((d, d), (d, 4 * d), (4 * d, d)):  # out projection, MLP
            f, b = linear_flops(t, fan_in, fan_out, weight_grad=False, input_grad=True)
            forward_blocks, backward_blocks = forward_blocks + f, backward_blocks + b
    heads_f, heads_b = linear_flops(masked_targets, group * d, head_outputs, weight_grad=True,
                                    input_grad=True)
    labels = 0
    if quantizer is not None:
        input_dim, code_dim, n, k = quantizer
        labels = 2 * masked_targets * n * code_dim * (input_dim + k)
    forward = conv + forward_blocks + heads_f + labels
    backward = backward_blocks + heads_b
    return {"forward": forward, "backward": backward, "total": forward + backward,
            "forward_conv": conv, "forward_blocks": forward_blocks, "forward_heads": heads_f,
            "forward_quantizer": labels}


def model_flops(model: torch.nn.Module, batch: int, masked_targets: int) -> dict[str, int]:
    """`encoder_flops` of a `BestRQModel` (its encoder, heads and quantizer), plus, with the
    distillation guard on, its two encoder forwards on the clean input (stock, no gradient;
    adapted) and the adapted one's backward."""
    cfg = model.quantizer.config
    flops = encoder_flops(model.encoder, batch, masked_targets, model.heads.out_features,
                          model.group, (cfg.n_mels * cfg.stack_frames, cfg.code_dim,
                                        cfg.num_codebooks, cfg.codebook_size))
    if getattr(model, "distill_weight", 0.0) > 0:
        encoder = encoder_flops(model.encoder, batch)
        flops["forward_distill"] = 2 * encoder["forward"]
        flops["forward"] += flops["forward_distill"]
        flops["backward"] += encoder["backward"]
        flops["total"] = flops["forward"] + flops["backward"]
    return flops


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Dense peak FLOP/s of a known NVIDIA GPU for bf16 (or TF32 for fp32), else None."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    table = _PEAK_BF16 if dtype in (torch.bfloat16, torch.float16) else _PEAK_TF32
    for key, value in table:
        if key in name:
            return value
    return None


def mfu(flops_per_step: float, step_time: float, device: torch.device | str,
        dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over the device's peak (None when unknown)."""
    peak = peak_flops(device, dtype)
    if peak is None or step_time <= 0:
        return None
    return flops_per_step / step_time / peak
