"""Peak memory of a BEST-RQ training step: an estimate from the model's shape, said before
training starts, and a measurement to hold it against.

The estimate adds what a step holds at its peak, the start of the backward pass:
- weights: every parameter and buffer of the model (frozen encoder, heads, quantizer), as held;
- trainable state: the adapter's and heads' gradients and AdamW's two moments (fp32);
- weight copies: under bf16 autocast, the frozen Linears' bf16 casts that backward keeps (one
  per block an adapted pass runs with a gradient; one block at a time with checkpointing);
- activations per clip: what autograd keeps of every adapted pass (`block_activation_bytes`;
  with `gradient_checkpointing`, each block's input and one block recomputed), the layer norms
  the losses read, the stock targets and the batch's inputs, plus backward's working set (the
  gradients of the residual stream and of the FFN's hidden layer).
Whisper's blocks are counted exactly as autograd saves them (tests/test_memory.py checks the
count against `saved_tensors_hooks`); the peak is checked against the CPU allocator's measured
peak within 25%. The fused loss's tile (`bestrq.model.chunk_shape`) is held while only the
BEST-RQ pass's activations are, so it counts only when that phase is the larger.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile
from whisper.audio import N_FRAMES

from bestrq.model import ENCODER_STRIDE, BestRQModel, chunk_shape

# Sources of a LoRA target's input in a block, and their width in units of d_model.
_LORA_INPUT = {"query": ("attn_ln", 1), "key": ("attn_ln", 1), "value": ("attn_ln", 1),
               "out": ("attention", 1), "fc1": ("mlp_ln", 1), "fc2": ("gelu", 4)}
# Frozen Linear weights of a block, in units of d_model ** 2 (query, key, value, out; fc1, fc2).
_BLOCK_WEIGHTS = 12
_FIRST_BLOCK_WEIGHTS = 9  # block 0: no gradient reaches its input, so q, k, v keep no copy


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training step holds at its peak (see the module's docstring)."""

    weights: int  # parameters and buffers, as held
    trainable_state: int  # gradients and AdamW's moments of the trainable numbers
    weight_copies: int  # bf16 casts of frozen weights kept for backward
    saved_per_clip: int  # what autograd keeps of the adapted passes, a clip
    other_per_clip: int  # inputs, stock targets, and backward's working set, a clip
    batch_size: int
    checkpointing: bool
    loss_phase: int = 0  # the BEST-RQ pass's activations and the loss's tile, whole batch

    @property
    def activations_per_clip(self) -> int:
        return self.saved_per_clip + self.other_per_clip

    @property
    def activations(self) -> int:
        """Activation bytes of the whole micro-batch at the peak."""
        return max(self.batch_size * self.activations_per_clip, self.loss_phase)

    @property
    def total(self) -> int:
        return self.weights + self.trainable_state + self.weight_copies + self.activations

    def line(self) -> str:
        """One line for the log, in MiB."""
        mib = 2**20
        return (f"peak memory estimate {self.total / mib:,.0f} MiB: weights "
                f"{self.weights / mib:,.0f}, adapter and heads state "
                f"{self.trainable_state / mib:,.0f}, bf16 weight copies "
                f"{self.weight_copies / mib:,.0f}, activations {self.activations / mib:,.0f} "
                f"({self.activations_per_clip / mib:,.1f} a clip x {self.batch_size}; "
                f"gradient_checkpointing {'on' if self.checkpointing else 'off'})")


def block_activation_bytes(d_model: int, n_head: int, adapter: str, act_bytes: int,
                           lora_rank: int = 0, lora_targets: tuple[str, ...] = (),
                           first: bool = False) -> int:
    """Bytes autograd keeps, per token, of one adapted Whisper block run with a gradient.

    act_bytes: 2 under bf16 autocast, 4 in fp32. The layer norms keep an fp32 input and
    statistics (Whisper's LayerNorm computes in fp32 whatever the autocast); the attention keeps its
    query, key, value, output and log-sum-exp; GELU its input. IA^3 keeps the key and value
    projections and the GELU output it rescales; LoRA each target's input (in fp32 one tensor
    per input, shared by its targets and, for `out`, with the attention's output; under
    autocast a bf16 cast per target) and its A output.
    first: block 0, whose input needs no gradient (its first layer norm keeps nothing, and its
    attention nothing either when no query, key or value is adapted)."""
    d, a = d_model, act_bytes
    lora = adapter == "lora"
    targets = set(lora_targets) if lora else set()
    # What needs a gradient: the block's input (past block 0), the projections an adapter
    # touches, and everything downstream of either.
    x_grad = not first
    qkv_grad = x_grad or not lora or bool(targets & {"query", "key", "value"})
    x1_grad = x_grad or qkv_grad or "out" in targets  # the residual after attention
    hidden_grad = x1_grad or "fc1" in targets  # the FFN's hidden layer
    total = (4 * d + 8) * (int(x_grad) + int(x1_grad))  # layer norms: fp32 input, mean, rstd
    if qkv_grad:
        total += 4 * d * a + 4 * n_head  # q, k, v, output; fp32 log-sum-exp per head
    if hidden_grad:
        total += 4 * d * a  # GELU's input
    if not lora:
        return total + 2 * d * a + 4 * d * a  # IA^3: k and v before scaling, GELU output
    sources: dict[str, int] = {}
    for target in lora_targets:
        source, width = _LORA_INPUT[target]
        total += lora_rank * a  # A's output, B's input
        if a != 4:  # PEFT casts the input to A's fp32, autocast back to bf16: one per target
            sources[target] = width * d * a
        elif source != "attention" or not qkv_grad:  # else: the attention's kept output
            sources[source] = width * d * a  # one fp32 tensor per input, shared by targets
    return total + sum(sources.values())


def adapted_passes(model: BestRQModel) -> list[tuple[int, tuple[int, ...]]]:
    """(highest block run, blocks read) of each encoder pass of a step that takes a gradient:
    the BEST-RQ pass, and with the distillation guard on clean input a second one."""
    distill = model.distill_weight > 0
    if distill and model.distill_input == "masked":
        read = tuple(sorted({model.bestrq_layer, *model.distill_layers}))
        return [(max(read), read)]
    passes = [(model.bestrq_layer, (model.bestrq_layer,))]
    if distill:
        passes.append((max(model.distill_layers), tuple(model.distill_layers)))
    return passes


def read_bytes(layer: int, top: int, last: int, d_model: int, act_bytes: int) -> int:
    """Bytes per token the layer norm a loss reads block `layer`'s output through keeps, in a
    pass that runs blocks up to `top` of an encoder whose last is `last`: ln_post (Whisper's
    LayerNorm) an fp32 copy; a lower block's F.layer_norm its input in autocast's dtype, in
    fp32 the very tensor the next block's first layer norm keeps, when that block runs."""
    if layer == last:
        return 4 * d_model + 8
    if act_bytes == 4 and layer < top:
        return 8
    return act_bytes * d_model + 8


def masked_share(model: BestRQModel) -> float:
    """Expected share of frames a span mask covers: a frame is masked when a span starts in
    the span's length of frames before it (merged spans, no padding)."""
    return 1.0 - (1.0 - model.masking.mask_prob) ** model.masking.span_frames


def estimate_peak_memory(model: BestRQModel, batch_size: int, dtype: torch.dtype | None,
                         checkpointing: bool | None = None, frames: int = N_FRAMES
                         ) -> MemoryEstimate:
    """The estimate of a training step's peak memory for `model` on micro-batches of
    `batch_size` clips of `frames` mel frames, under autocast `dtype` (None: fp32), with
    `checkpointing` (None: the model's `gradient_checkpointing`)."""
    if checkpointing is None:
        checkpointing = model.gradient_checkpointing
    encoder = model.encoder
    d, n_head = encoder.ln_post.normalized_shape[0], encoder.blocks[0].attn.n_head
    tokens = frames // ENCODER_STRIDE
    a = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    adapter = model.adapter

    def block(first: bool) -> int:  # bytes per clip
        return tokens * block_activation_bytes(d, n_head, adapter.kind, a, adapter.lora_rank,
                                               tuple(adapter.lora_targets), first)

    trainable = sum(p.numel() for p in model.trainable_parameters().values())
    weights = sum(t.numel() * t.element_size()
                  for t in (*model.parameters(), *model.buffers()))
    per_pass_copies = [(_FIRST_BLOCK_WEIGHTS + _BLOCK_WEIGHTS * top) * d * d * 2
                       for top, _ in adapted_passes(model)] if a == 2 else [0]
    copies = _BLOCK_WEIGHTS * d * d * 2 if a == 2 and checkpointing else sum(per_pass_copies)

    held = []  # per pass, bytes per clip kept until the backward pass
    last = len(encoder.blocks) - 1
    for top, read in adapted_passes(model):
        blocks = block(True) + top * block(False) if not checkpointing else \
            (top + 1) * tokens * d * a  # each block's input, in the residual stream's dtype
        held.append(blocks + tokens * sum(read_bytes(i, top, last, d, a) for i in read))
    distilled = len(model.distill_layers) if model.distill_weight > 0 else 0
    inputs = 3 * encoder.conv1.in_channels * frames * 4  # mel, noise, encoder input
    targets = distilled * tokens * d * 4  # the stock encoder's outputs
    # The MSE's, kept for its backward: on valid frames; on the masked pass, unmasked ones.
    differences = distilled * tokens * d * 4
    if model.distill_input == "masked":
        differences = round(differences * (1.0 - masked_share(model)))
    working = tokens * d * (a + 8 * a)  # residual-stream and two FFN-hidden gradients
    recomputed = block(False) if checkpointing else 0  # one block's, in its backward

    cfg = model.quantizer.config
    masked = max(1, round(batch_size * tokens // model.group * masked_share(model)))
    rows, books = chunk_shape(masked, cfg.num_codebooks, cfg.codebook_size, model.logits_budget)
    # A tile's logits in autocast's dtype and fp32 log-probabilities; under bf16 also the
    # fp32 copy of the logits log_softmax(dtype=float32) makes first on a CPU (measured: 2.5x
    # the log-probabilities' bytes, 2x in fp32), and the heads' weights cast once.
    tile = rows * books * cfg.codebook_size * (8 if a == 4 else 10)
    heads_copy = 0 if a == 4 else model.heads.weight.numel() * a
    loss_phase = batch_size * (held[0] + inputs) + tile + heads_copy \
        + masked * model.heads.in_features * 4  # the heads input's gradient, fp32
    return MemoryEstimate(weights=weights, trainable_state=12 * trainable,
                          weight_copies=copies, saved_per_clip=sum(held) + differences,
                          other_per_clip=inputs + targets + working + recomputed,
                          batch_size=batch_size, checkpointing=checkpointing,
                          loss_phase=loss_phase)


def measured_cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensors allocated while `fn` runs, above what was allocated before it,
    from the profiler's allocation events (torch keeps no CPU allocator statistics; on CUDA,
    `torch.cuda.max_memory_allocated` says it). Build the model inside `fn` for the peak of a
    whole step, weights and optimiser state included."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, acc_events=True) as prof:
        fn()
    cpu = torch._C._autograd.DeviceType.CPU
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == cpu)
    live = peak = 0
    for _, nbytes in events:  # allocations positive, frees negative
        live += nbytes
        peak = max(peak, live)
    return peak
