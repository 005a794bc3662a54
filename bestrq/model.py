"""The BEST-RQ model: an adapted (IA^3 or LoRA) Whisper encoder, softmax heads, loss and metrics.

mel ─► normalise ─► quantizer ─► labels (targets, from the unmasked features)
          └──► span mask + noise ─► back to Whisper's log-mel scale ─► adapted encoder ─► heads
                                                             cross-entropy on masked targets ◄┘
The encoder sees Whisper's own log-mel scale on unmasked frames, so an adapter stays a small
change to a model that still works as Whisper; masking noise is drawn in the normalised space
as the paper specifies and mapped back with the same statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from whisper.model import AudioEncoder

from bestrq.adapters import IA3, AdapterConfig, adapter_disabled, adapter_state_dict, add_adapter
from bestrq.knobs import check, knob
from bestrq.masking import (
    MaskingConfig,
    apply_noise,
    draw_noise,
    span_mask,
    target_mask,
    target_valid,
)
from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer
from bestrq.seeding import HEADS_STREAM, generator
from bestrq.stock_cache import StockCache

ENCODER_STRIDE = 2  # Whisper's conv stem halves the 10 ms frame rate
Layer = Annotated[int, Field(ge=-1024, le=1023)]  # a block; negative counts from the top
DistillInput = Literal["clean", "masked"]


@dataclass
class LossConfig:
    """Where the losses read the encoder, and the weight of the distillation guard."""

    distill_weight: Annotated[float, knob(
        "weight of the distillation guard: MSE of the adapted to the stock encoder's output on "
        "the clean input (0: off)", ge=0, le=10**6)] = 0.0
    distill_layers: Annotated[list[Layer], knob(
        "encoder blocks whose outputs are distilled to the stock encoder's (a list; negative "
        "counts from the top; [-1]: the encoder's output)", min_length=1, max_length=1024)] = \
        field(default_factory=lambda: [-1])
    distill_padding: Annotated[bool, knob(
        "the distillation counts padded frames too (Whisper's decoder attends to them)")] = False
    distill_input: Annotated[DistillInput, knob(
        "what the adapted encoder is distilled on: clean (a second adapted pass, on the clean "
        "input, as BEARD) | masked (the BEST-RQ pass itself, its unmasked frames only: one "
        "adapted pass fewer a step)")] = "clean"
    distill_cache: Annotated[bool, knob(
        "keep the stock encoder's distilled outputs of each training clip after their first "
        "computation (float16, in a temporary file: 1.15 MB a 30 s window and distilled block "
        "for tiny, 3.84 MB for large-v3), so that the guard's stock forward runs once per clip, "
        "not once per epoch")] = False
    bestrq_layer: Annotated[Layer, knob(
        "encoder block whose output feeds the BEST-RQ heads (negative counts from the top; -1: "
        "the last; BEARD: a middle block, the upper ones distilled)")] = -1

    def validate(self) -> None:
        """Bounds only: which blocks exist is known with the encoder's depth (`resolve`)."""
        check(self)

    def resolve(self, num_blocks: int, encoder: str = "this encoder"
                ) -> tuple[int, tuple[int, ...]]:
        """(bestrq_layer, sorted distill_layers) as block indices from the bottom of an encoder
        of `num_blocks` blocks (`encoder` names it in messages); ValueError naming the knob for
        a block it lacks or a block distilled twice."""
        bestrq_layer = resolve_layer(self.bestrq_layer, num_blocks, "bestrq_layer", encoder)
        resolved = [resolve_layer(i, num_blocks, "distill_layers", encoder)
                    for i in self.distill_layers]
        if not resolved or len(set(resolved)) != len(resolved):
            raise ValueError(f"distill_layers: must be a non-empty list of distinct blocks, got "
                             f"{list(self.distill_layers)!r}")
        return bestrq_layer, tuple(sorted(resolved))


# What training holds of each number of the heads: its fp32 weight, gradient and AdamW's two
# moments.
HEAD_TRAINING_BYTES = 16


def heads_numbers(config: QuantizerConfig, d_model: int) -> int:
    """Weights and biases of the BEST-RQ heads of `config`'s codebooks over an encoder of width
    `d_model`: one linear map from a target's stack_frames / 2 encoder frames to each
    codebook's codes."""
    group = config.stack_frames // ENCODER_STRIDE
    return config.num_codebooks * config.codebook_size * (d_model * group + 1)


def seeded_linear(in_features: int, out_features: int, gen: torch.Generator) -> nn.Linear:
    """An nn.Linear with PyTorch's default init (U(-1/sqrt(in), 1/sqrt(in)) for weight and
    bias) drawn from `gen`, never from the global RNG, so that it is the same in every process
    whatever ran before it."""
    layer = torch.nn.utils.skip_init(nn.Linear, in_features, out_features)
    bound = 1.0 / math.sqrt(in_features)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=gen)
        layer.bias.uniform_(-bound, bound, generator=gen)
    return layer


# fp32 log-probabilities of one tile of the loss (masked targets x codebooks): bounds the loss's
# working memory, forward and backward, whatever the batch. A tile also holds its logits in the
# matmuls' dtype, so it works in 2x (fp32) or 1.5x (bf16) this; 2.5x under bf16 on a CPU,
# whose log_softmax makes an fp32 copy of the logits first (measured: bestrq.memory); its
# matmuls stay large (on a GPU batch of 64 clips: 4096 targets x one 8192-way head).
LOGITS_BUDGET_BYTES = 128 * 2**20


def chunk_shape(targets: int, num_codebooks: int, codebook_size: int,
                budget_bytes: int = LOGITS_BUDGET_BYTES) -> tuple[int, int]:
    """(rows, codebooks) of a tile whose fp32 log-probabilities fit in `budget_bytes`: every
    target and as many codebooks as fit, else one codebook and as many targets as fit (at
    least one).

    Whole codebooks first: a tile then spans as many targets as fit, so the fp32
    read-modify-write of its heads' weight gradient, once per tile, stays small beside its
    matmuls; tiles of a few hundred targets across all 16 heads would make that write, not the
    matmuls, a GPU's cost."""
    per_codebook = 4 * codebook_size * targets
    if per_codebook <= budget_bytes:
        return targets, min(num_codebooks, budget_bytes // per_codebook)
    return max(1, budget_bytes // (4 * codebook_size)), 1


@torch.no_grad()
def multi_softmax_chunks(x: Tensor, weight: Tensor, bias: Tensor, y: Tensor,
                         chunk: tuple[int, int], dtype: torch.dtype | None,
                         need: tuple[bool, bool, bool], accuracy: bool = True
                         ) -> tuple[Tensor, Tensor | None, list[Tensor | None]]:
    """Cross-entropy of the heads' N softmaxes, in one pass over tiles of `chunk` = (rows,
    codebooks).

    x: (M, D) head inputs; weight: (N * K, D), bias: (N * K,) the fused heads; y: (M, N) labels;
    dtype: the matmuls' dtype (autocast's), None for x's own. Softmax and loss are fp32.
    Returns the mean over targets and codebooks (fp32 scalar), the correct argmax predictions
    per codebook (N,) (None unless `accuracy`) and, for those of (x, weight, bias) flagged in
    `need`, the gradient of the *sum* (M N times the mean's; else None), in fp32.
    """
    m, n = y.shape
    k = weight.shape[0] // n
    rows, group = chunk
    dt = dtype or x.dtype
    xs, w, b = x.to(dt), weight.to(dt), bias.to(dt)  # (M, D), (N * K, D), (N * K,)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    correct = torch.zeros(n, dtype=torch.long, device=x.device) if accuracy else None
    dx = torch.zeros_like(x, dtype=torch.float32) if need[0] else None  # (M, D)
    dw = torch.zeros_like(weight, dtype=torch.float32) if need[1] else None  # (N * K, D)
    db = torch.zeros_like(bias, dtype=torch.float32) if need[2] else None  # (N * K,)
    with torch.autocast(x.device.type, enabled=False):
        for first in range(0, n, group):
            last = min(first + group, n)
            cbs, cols = slice(first, last), slice(first * k, last * k)
            for start in range(0, m, rows):
                tile = slice(start, start + rows)
                xc, yc = xs[tile], y[tile, cbs, None]  # (R, D), (R, C, 1)
                logits = torch.addmm(b[cols], xc, w[cols].t())  # (R, C * K), dtype dt
                z = logits.view(xc.shape[0], -1, k)  # (R, C, K)
                if correct is not None:
                    correct[cbs] += (z.argmax(-1, keepdim=True) == yc).sum((0, 2))
                logp = torch.log_softmax(z, -1, dtype=torch.float32)  # (R, C, K)
                total -= logp.gather(-1, yc).sum()
                if not any(need):
                    continue
                # d sum / d logits = softmax - onehot, made in the logits' own buffer.
                torch.exp(logp, out=z).scatter_add_(-1, yc, torch.full_like(yc, -1, dtype=dt))
                del logp
                if db is not None:
                    db[cols] += logits.sum(0, dtype=torch.float32)
                if dt == torch.float32:
                    # Summed in place, with no product-sized temporary; out= (not addmm_)
                    # keeps the products visible to torch's FlopCounterMode.
                    if dx is not None:
                        torch.addmm(dx[tile], logits, w[cols], out=dx[tile])
                    if dw is not None:
                        torch.addmm(dw[cols], logits.t(), xc, out=dw[cols])
                    continue
                if dx is not None:
                    dx[tile] += logits @ w[cols]
                # A low-precision product reaches the fp32 sum one codebook at a time, so that
                # its temporary is (K, D), never the tile's codebooks' (C * K, D).
                for i in range(0, logits.shape[1] if dw is not None else 0, k):
                    dw[cols.start + i:cols.start + i + k] += logits[:, i:i + k].t() @ xc
    return total / (m * n), correct, [dx, dw, db]


class FusedMultiSoftmaxCE(torch.autograd.Function):
    """`multi_softmax_chunks` as an autograd op: the loss is a scalar, so its gradients are
    formed in the forward pass, tile by tile, and backward only scales them by the incoming
    gradient; no pass recomputes or keeps the logits. Backward runs once (no retain_graph)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, y: Tensor,
                chunk: tuple[int, int], dtype: torch.dtype | None, accuracy: bool
                ) -> tuple[Tensor, Tensor | None]:
        loss, correct, ctx.grads = multi_softmax_chunks(
            x, weight, bias, y, chunk, dtype, tuple(ctx.needs_input_grad[:3]), accuracy)
        ctx.dtypes, ctx.scale = (x.dtype, weight.dtype, bias.dtype), 1.0 / y.numel()
        if correct is not None:
            ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _: Tensor | None) -> tuple[Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("the fused multi-softmax loss can be differentiated only once")
        # Dropping ctx's reference lets autograd take the buffers as .grad without a copy.
        grads, ctx.grads = ctx.grads, None
        factor = grad_loss.float() * ctx.scale  # the sum's gradients -> the mean's, scaled
        return *(None if g is None else g.mul_(factor).to(like)
                 for g, like in zip(grads, ctx.dtypes, strict=True)), None, None, None, None


def resolve_layer(index: int, num_blocks: int, name: str, encoder: str = "this encoder"
                  ) -> int:
    """A block index counted from the bottom (0) or, when negative, from the top (-1: the
    last); ValueError naming `name`, the `encoder` and the valid range otherwise."""
    if isinstance(index, bool) or not isinstance(index, int) \
            or not -num_blocks <= index < num_blocks:
        raise ValueError(f"{name}: must be a block of {encoder}, an integer in "
                         f"[{-num_blocks}, {num_blocks - 1}] ({num_blocks} blocks; negative "
                         f"counts from the top), got {index!r}")
    return index % num_blocks


def encoder_states(encoder: AudioEncoder, x: Tensor, layers: Sequence[int],
                   checkpointed: bool = False) -> dict[int, Tensor]:
    """The outputs of encoder blocks `layers` (non-negative indices) for input x (batch, n_mels,
    frames), each (batch, frames / 2, d_model), running the blocks no higher than needed: the
    last block's through `ln_post`, the encoder's own output, and a lower block's through a
    layer norm without parameters (its residual stream, at a scale a head or a distillation
    loss can use). Whisper's AudioEncoder.forward, stopped early.

    checkpointed: each block keeps only its input for the backward pass and runs again there
    (`torch.utils.checkpoint`), so a pass holds one block's activations at a time instead of
    every block's; the same numbers, about one more forward of the blocks in time. It matters
    only where a gradient is taken."""
    last = len(encoder.blocks) - 1
    top = max(layers)
    h = F.gelu(encoder.conv1(x))
    h = F.gelu(encoder.conv2(h)).permute(0, 2, 1)  # (batch, frames / 2, d_model)
    h = (h + encoder.positional_embedding[:h.shape[1]]).to(h.dtype)
    out: dict[int, Tensor] = {}
    recompute = checkpointed and torch.is_grad_enabled()
    for i, block in enumerate(encoder.blocks[:top + 1]):
        # preserve_rng_state: the recomputation draws what the forward drew (Whisper's blocks
        # draw nothing today; a block with dropout would still give the same gradients).
        h = checkpoint(block, h, use_reentrant=False, preserve_rng_state=True) if recompute \
            else block(h)  # (batch, frames / 2, d_model)
        if i in layers:
            out[i] = encoder.ln_post(h) if i == last else F.layer_norm(h, h.shape[-1:])
    return out


@dataclass
class BestRQOutput:
    loss: Tensor  # scalar fp32, mean over codebooks of the masked-frame cross-entropy
    metrics: dict[str, float] = field(default_factory=dict)
    num_masked: int = 0  # masked valid targets in the batch (the loss's denominator)

    @property
    def count(self) -> int:
        """The training engine's name for the loss's denominator."""
        return self.num_masked


class BestRQModel(nn.Module):
    """Adapted encoder + one linear softmax head per codebook (held as one fused Linear)."""

    def __init__(self, encoder: AudioEncoder, quantizer: RandomProjectionQuantizer,
                 masking: MaskingConfig, distill_weight: float = 0.0, bestrq_layer: int = -1,
                 distill_layers: Sequence[int] = (-1,), distill_padding: bool = False,
                 adapter: AdapterConfig = IA3, distill_input: str = "clean",
                 distill_cache: bool = False, gradient_checkpointing: bool = False) -> None:
        """bestrq_layer: the block whose output feeds the heads (BEARD puts them on a middle
        block; blocks above it then get no BEST-RQ gradient); distill_layers: the blocks whose
        outputs are distilled to the stock encoder's, `distill_weight` times their mean MSE;
        distill_padding: count the padded frames too (Whisper's decoder attends to them);
        distill_input: "clean" distils a second adapted pass on the clean input, "masked" the
        BEST-RQ pass's own block outputs on its unmasked frames (`distillation`);
        distill_cache: keep each training clip's stock outputs once computed
        (`cache_stock_outputs`); adapter: what is trained in the encoder (LoRA's A drawn from
        the quantizer's seed); gradient_checkpointing: the adapted passes keep only each
        block's input and run the block again in the backward pass (`encoder_states`)."""
        super().__init__()
        masking.validate()
        loss = LossConfig(distill_weight, list(distill_layers), distill_padding, distill_input,
                          distill_cache, bestrq_layer)  # type: ignore[arg-type]
        check(loss)
        self.distill_input = distill_input
        self.distill_cache = distill_cache
        self.gradient_checkpointing = gradient_checkpointing
        self.stock_cache: StockCache | None = None
        self.distill_weight = float(distill_weight)
        self.bestrq_layer, self.distill_layers = loss.resolve(len(encoder.blocks))
        self.distill_padding = distill_padding
        stack = quantizer.config.stack_frames
        if stack % ENCODER_STRIDE:
            raise ValueError(f"stack_frames must be a multiple of the encoder stride "
                             f"{ENCODER_STRIDE}, got {stack}")
        if encoder.conv1.in_channels != quantizer.config.n_mels:
            raise ValueError(f"the quantizer expects {quantizer.config.n_mels} mel bins but the "
                             f"Whisper encoder takes {encoder.conv1.in_channels}")
        add_adapter(encoder, adapter, quantizer.config.seed)
        self.adapter = adapter
        self.encoder = encoder
        self.quantizer = quantizer
        self.masking = masking
        self.group = stack // ENCODER_STRIDE  # encoder frames per target
        d_model = encoder.ln_post.normalized_shape[0]
        cfg = quantizer.config
        self.heads = seeded_linear(d_model * self.group, cfg.num_codebooks * cfg.codebook_size,
                                   generator(cfg.seed, HEADS_STREAM))
        self.logits_budget = LOGITS_BUDGET_BYTES  # fp32 log-prob bytes per loss tile

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Everything an adapter file holds: the encoder's adapter, heads and quantizer state."""
        kind = self.adapter.kind
        state = {f"{kind}.encoder.{k}": v for k, v in adapter_state_dict(self.encoder).items()}
        state.update({f"heads.{k}": v for k, v in self.heads.state_dict().items()})
        state.update({f"quantizer.{k}": v for k, v in self.quantizer.state_dict().items()})
        return state

    def make_inputs(self, mel: Tensor, num_valid: Tensor, frame_mask: Tensor | None = None,
                    noise: Tensor | None = None, generator: torch.Generator | None = None,
                    all_labels: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Labels and masked encoder input for a batch.

        mel: (batch, n_mels, frames) Whisper log-mel; num_valid: (batch,) non-padding frames.
        frame_mask (batch, frames) and noise (batch, n_mels, frames) come from the data loader
        (`masking.draw_sample_mask`) in training; when absent they are drawn with `generator`.
        Returns (encoder input (batch, n_mels, frames), labels (batch, N, targets) of the
        predicted targets, -1 elsewhere (of every target with `all_labels`), loss mask
        (batch, targets): masked and made of real audio, valid (batch, targets)).
        """
        stack = self.quantizer.config.stack_frames
        z = self.quantizer.normalize(mel.float())  # (batch, n_mels, frames)
        if frame_mask is None:
            frame_mask = self.draw_frame_mask(num_valid, mel.shape[-1], generator)
        if noise is None:
            noise = draw_noise(tuple(z.shape), self.masking.mask_noise_std, generator)
        noisy = apply_noise(z, frame_mask.to(z.device), noise)
        x = self.quantizer.denormalize(noisy)  # (batch, n_mels, frames)
        targets = mel.shape[-1] // stack
        valid = target_valid(num_valid, targets, stack)  # (batch, targets)
        loss_mask = target_mask(frame_mask.to(z.device), stack,
                                self.masking.mask_target_share)[:, :targets] & valid
        # Labels of the unmasked features, for the predicted targets only (-1 elsewhere).
        labels = self.quantizer(self.quantizer.label_input(mel, num_valid),
                                where=None if all_labels else loss_mask)
        return x, labels, loss_mask, valid

    def draw_frame_mask(self, num_valid: Tensor, frames: int,
                        generator: torch.Generator | None) -> Tensor:
        """The spans `masking` masks, (batch, frames) bool, drawn with `generator`."""
        return span_mask(num_valid, frames, self.masking.mask_prob, self.masking.span_frames,
                         generator)

    def layers(self) -> dict[str, object]:
        """What an adapter file records of where the losses read the encoder."""
        return {"bestrq_layer": self.bestrq_layer, "distill_layers": list(self.distill_layers),
                "distill_padding": self.distill_padding, "distill_input": self.distill_input}

    def encode(self, x: Tensor) -> Tensor:
        """Encoder input (batch, n_mels, frames) -> (batch, targets, group * d_model), from
        block `bestrq_layer` (the blocks above it are not run)."""
        return self.heads_input(encoder_states(self.encoder, x, [self.bestrq_layer],
                                               self.gradient_checkpointing)[self.bestrq_layer])

    def heads_input(self, h: Tensor) -> Tensor:
        """Block output (batch, frames / 2, d_model) -> the heads' input (batch, targets,
        group * d_model)."""
        batch, frames, d = h.shape
        usable = frames // self.group * self.group
        return h[:, :usable].reshape(batch, usable // self.group, self.group * d)

    def cache_stock_outputs(self, num_clips: int) -> bool:
        """With `distill_cache` and the guard on, start a cache of the stock outputs of a
        training set of `num_clips` clips, read by `forward` when given the batch's clip
        indices; whether it did (the data loader then has to give them)."""
        if not (self.distill_cache and self.distill_weight > 0):
            return False
        if self.stock_cache is not None:
            self.stock_cache.close()
        d_model = self.encoder.ln_post.normalized_shape[0]
        frames = self.encoder.positional_embedding.shape[0]  # a whole window's encoder frames
        self.stock_cache = StockCache(num_clips, (len(self.distill_layers), frames, d_model))
        return True

    def forward(self, mel: Tensor, num_valid: Tensor, frame_mask: Tensor | None = None,
                noise: Tensor | None = None, clips: Tensor | None = None,
                generator: torch.Generator | None = None,
                with_metrics: bool = True) -> BestRQOutput:
        """Loss (and, unless `with_metrics` is False, metrics that cost host syncs) of a batch:
        BEST-RQ's, plus `distill_weight` times the distillation term when it is on. clips:
        (batch,) the clips' indices in the training set, for the stock-output cache."""
        on_masked = self.distill_weight > 0 and self.distill_input == "masked"
        if on_masked and frame_mask is None:  # drawn as make_inputs would, to be known here
            frame_mask = self.draw_frame_mask(num_valid, mel.shape[-1], generator)
        x, labels, loss_mask, valid = self.make_inputs(mel, num_valid, frame_mask, noise,
                                                       generator)
        states = None
        if on_masked:  # one adapted pass for both losses
            states = encoder_states(self.encoder, x, sorted({self.bestrq_layer,
                                                             *self.distill_layers}),
                                    self.gradient_checkpointing)
            h = self.heads_input(states[self.bestrq_layer])
        else:
            h = self.encode(x)  # (batch, targets, group * d_model)
        out = self.loss(h, labels, loss_mask, valid if with_metrics else None)
        if self.distill_weight > 0:
            distill, per_layer = self.distillation(
                mel, num_valid, None if states is None else
                {i: states[i] for i in self.distill_layers}, frame_mask if on_masked else None,
                clips)
            if with_metrics:
                out.metrics["bestrq_loss"] = float(out.loss.detach())
                out.metrics["distill_loss"] = float(distill.detach())
                if len(per_layer) > 1:
                    out.metrics.update({f"distill_loss_l{i}": float(v.detach())
                                        for i, v in per_layer.items()})
            out.loss = out.loss + self.distill_weight * distill
        return out

    def distillation(self, mel: Tensor, num_valid: Tensor, states: dict[int, Tensor] | None = None,
                     hidden: Tensor | None = None, clips: Tensor | None = None
                     ) -> tuple[Tensor, dict[int, Tensor]]:
        """Mean squared difference, over valid encoder frames (all frames with
        `distill_padding`) and channels, between the adapted encoder's block outputs on the
        clean input and the stock encoder's (the same weights with the adapter switched off, no
        gradient), for each of `distill_layers`, and its mean over them: a guard that keeps the
        adapted encoder where Whisper's decoder expects it (BEARD, arXiv 2510.24570, distils
        the upper blocks from the frozen encoder). mel: (batch, n_mels, frames) Whisper
        log-mel; scalar fp32, and the per-block terms.

        With `states` (the adapted block outputs of the BEST-RQ pass, on the masked input) and
        `hidden` (batch, mel frames), the frames it masked, those outputs are distilled instead,
        on the encoder frames none of whose mel frames is masked: the adapted pass on the
        clean input is not run (`distill_input: masked`). `clips`: see `stock_states`."""
        targets = self.stock_states(mel, clips)
        if states is None:
            states = encoder_states(self.encoder, mel, self.distill_layers,
                                    self.gradient_checkpointing)
        first = next(iter(states.values()))  # (batch, frames / 2, d_model), as every block's
        frames = (num_valid + ENCODER_STRIDE - 1) // ENCODER_STRIDE  # (batch,)
        valid = torch.arange(first.shape[1], device=first.device)[None] < frames[:, None]
        if self.distill_padding:
            valid = torch.ones_like(valid)
        if hidden is not None:  # (batch, mel frames) -> (batch, encoder frames)
            enc = first.shape[1]
            valid = valid & ~hidden[:, :ENCODER_STRIDE * enc].to(valid.device).reshape(
                -1, enc, ENCODER_STRIDE).any(-1)
        per_layer: dict[int, Tensor] = {}
        for i, h in states.items():  # (batch, frames / 2, d_model)
            diff = h.float()[valid] - targets[i].float()[valid]  # (valid frames, d_model)
            # No valid frame: zero, with every vector still in the graph (DDP buckets).
            per_layer[i] = diff.pow(2).mean() if diff.numel() else h.float().sum() * 0.0
        return torch.stack(list(per_layer.values())).mean(), per_layer

    def stock_states(self, mel: Tensor, clips: Tensor | None = None) -> dict[int, Tensor]:
        """The stock encoder's outputs of `distill_layers` for mel (batch, n_mels, frames), no
        gradient, each (batch, frames / 2, d_model). With the cache started and `clips` (batch,)
        given, only the clips not seen before are run, and every clip's outputs are read back
        from the cache (float16), so a clip's targets are the same in every epoch."""
        cache = self.stock_cache if clips is not None else None
        todo = None if cache is None else cache.missing(clips)  # (batch,) bool
        if todo is None or bool(todo.any()):
            with torch.no_grad(), adapter_disabled(self.encoder):
                states = encoder_states(self.encoder, mel if todo is None
                                        else mel[todo.to(mel.device)], self.distill_layers)
            if cache is None:
                return states
            cache.put(clips.cpu()[todo],  # (new, layers, frames / 2, d_model)
                      torch.stack([states[i] for i in self.distill_layers], 1))
        rows = cache.get(clips).to(mel.device)  # (batch, layers, frames / 2, d_model) float16
        return {layer: rows[:, j] for j, layer in enumerate(self.distill_layers)}

    def loss(self, h: Tensor, labels: Tensor, loss_mask: Tensor,
             valid: Tensor | None = None) -> BestRQOutput:
        """Masked-target cross-entropy, mean over codebooks, in fp32 whatever the autocast.

        The heads and the softmaxes run fused, in tiles of `chunk_shape(M, N, K,
        self.logits_budget)` (masked targets, codebooks), forward and backward, so that no
        (masked targets, N, K) logits are ever held whole; under autocast the heads' matmuls run
        in its dtype. With `valid` (batch, targets) given, metrics are computed too, the
        accuracies from the same tiles.
        """
        cfg = self.quantizer.config
        n, k = cfg.num_codebooks, cfg.codebook_size
        targets = min(h.shape[1], labels.shape[-1])
        labels, loss_mask = labels[:, :, :targets], loss_mask[:, :targets]
        selected = h[:, :targets][loss_mask]  # (M, group * d_model): only masked frames
        y = labels.transpose(1, 2)[loss_mask]  # (M, N)
        num_masked = int(selected.shape[0])
        accuracy = None
        if num_masked == 0:
            # Keep every trainable tensor (heads' weight and bias, the adapter through h) in
            # the graph, with zero gradients, so that every rank of a distributed run reduces
            # the same buckets.
            loss = self.heads(selected).float().sum() * 0.0
        else:
            device = selected.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
            chunk = chunk_shape(num_masked, n, k, self.logits_budget)
            weight, bias = self.heads.weight, self.heads.bias
            with_accuracy = valid is not None  # argmax costs a pass over the logits
            if torch.is_grad_enabled() and any(
                    t.requires_grad for t in (selected, weight, bias)):
                loss, correct = FusedMultiSoftmaxCE.apply(selected, weight, bias, y, chunk,
                                                          dtype, with_accuracy)
            else:  # evaluation: no gradient buffers at all
                loss, correct, _ = multi_softmax_chunks(selected, weight, bias, y, chunk, dtype,
                                                        (False, False, False), with_accuracy)
            if correct is not None:
                accuracy = correct.float() / num_masked  # (N,)
        metrics = {} if valid is None else self.metrics(labels, loss_mask, valid[:, :targets],
                                                         accuracy)
        return BestRQOutput(loss=loss, metrics=metrics, num_masked=num_masked)

    @torch.no_grad()
    def metrics(self, labels: Tensor, loss_mask: Tensor, valid: Tensor,
                accuracy: Tensor | None) -> dict[str, float]:
        """Masked accuracy per codebook (`accuracy`, (N,), from the loss's tiles) and their
        mean, share of valid targets masked, and the codebook utilisation over the masked
        targets (the only ones labelled): distinct labels and exp(label entropy)."""
        cfg = self.quantizer.config
        metrics: dict[str, float] = {
            "mask_fraction": float(loss_mask.sum()) / max(float(valid.sum()), 1.0)}
        if accuracy is not None:
            for i, acc in enumerate(accuracy.tolist()):
                metrics[f"accuracy_cb{i}"] = acc
            metrics["accuracy"] = float(accuracy.mean())
        picked = labels.transpose(1, 2)[loss_mask]  # (M, N)
        distinct, perplexity = [], []
        for i in range(cfg.num_codebooks):
            counts = torch.bincount(picked[:, i], minlength=cfg.codebook_size).float()
            total = counts.sum().clamp_min(1.0)
            probs = counts[counts > 0] / total
            distinct.append(float((counts > 0).sum()))
            perplexity.append(float(torch.exp(-(probs * probs.log()).sum())) if probs.numel()
                              else 0.0)
        metrics["distinct_labels"] = sum(distinct) / len(distinct)
        metrics["perplexity"] = sum(perplexity) / len(perplexity)
        return metrics
