"""Supervised adapter fine-tuning of Whisper: the objective that measures what pre-training bought.

The question a user brings is whether pre-training on unlabelled audio gives a better model than
fine-tuning on the few transcribed hours alone. So the same supervised fine-tune (same clips,
steps, seed and schedule) runs twice, from stock Whisper and from the BEST-RQ adapter, and the
two are compared on held-out clips (BEARD, arXiv 2510.24570, uses this protocol).

The objective is Whisper's own: teacher-forced cross-entropy of the transcript tokens given the
audio, with whisper's tokenizer and special tokens. The decoder input is
<|startoftranscript|> [<|lang|> <|transcribe|>] <|notimestamps|> text..., the targets are the
next tokens, text... <|endoftext|>: the prompt tokens are forced at decoding time, so their
prediction is not trained (target -100, like padding). Only the adapter is trained (IA^3: the
encoder's self-attention k, v and FFN vectors, the decoder's self- and cross-attention k, v and
FFN; LoRA: its targets in both); every Whisper weight stays frozen. The loss is computed in
fp32 whatever the autocast.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from whisper.model import Whisper
from whisper.tokenizer import Tokenizer, get_tokenizer

from bestrq.adapters import IA3, AdapterConfig, add_adapter
from bestrq.knobs import (
    Accumulate,
    BatchSize,
    ClipCount,
    LearningRate,
    Length,
    Ratio,
    Seed,
    Steps,
    check,
    knob,
)
from bestrq.objective import Objective
from bestrq.schedule import Schedule
from bestrq.seeding import LABELS_STREAM, generator
from bestrq.train import TrainConfig

IGNORE = -100  # target of padding and prompt positions: no loss
FRAMES_PER_MINUTE = 100 * 60  # Whisper's log-mel has 100 frames a second

# The knobs of the fine-tune that differ from pre-training's (section `finetune` of params.yaml);
# the rest of the engine (precision, device, workers, AdamW betas, clipping) is shared.
TRAIN_OVERRIDES = ("batch_size", "accumulate_gradients", "learning_rate", "lr_schedule",
                   "warmup_steps", "max_steps", "min_lr_ratio", "checkpoint_every")


@dataclass
class FinetuneConfig:
    """How much labelled data, and how long, the supervised fine-tune gets."""

    max_clips: Annotated[ClipCount, knob(
        "transcribed train clips used (0: all), drawn with the seed")] = 0
    max_minutes: Annotated[float, knob(
        "and at most this many minutes of their audio (0: no limit)", ge=0, le=10**8)] = 0.0
    # The engine's knobs that the fine-tune sets apart from pre-training (TRAIN_OVERRIDES).
    batch_size: Annotated[BatchSize, knob("the fine-tune's clips per micro-batch")] = 4
    accumulate_gradients: Annotated[Accumulate, knob(
        "the fine-tune's micro-batches per update")] = 1
    learning_rate: Annotated[LearningRate, knob("the fine-tune's peak rate")] = 3e-3
    lr_schedule: Annotated[Schedule, knob("the fine-tune's schedule")] = "constant"
    warmup_steps: Annotated[Length, knob(
        "the fine-tune's warm-up (share of its max_steps, or updates)")] = 2
    max_steps: Annotated[Steps, knob("the fine-tune's updates")] = 10
    min_lr_ratio: Annotated[Ratio, knob("the fine-tune's schedule floor")] = 0.0
    checkpoint_every: Annotated[Steps, knob(
        "the fine-tune's updates between checkpoints", speed_only=True)] = 5
    # Figures are given per seed and pooled; the first seed's adapters are the stage's main
    # outputs.
    seeds: Annotated[list[Seed], knob(
        "both fine-tunes are run once per seed (labelled draw and data order)",
        min_length=1, max_length=100)] = field(default_factory=lambda: [0])

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """The engine's config: pre-training's, with this section's knobs in place (and no
        heads-only phase: the fine-tune has no BEST-RQ heads)."""
        return replace(base, heads_only_steps=0.0,
                       **{name: getattr(self, name) for name in TRAIN_OVERRIDES})

    def validate(self, base: TrainConfig) -> None:
        """Raise ValueError naming the invalid `finetune.` parameters."""
        check(self, "finetune.")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"finetune.seeds: names a seed twice: {self.seeds!r}")
        try:
            self.train_config(base).validate()
        except ValueError as err:
            raise ValueError(f"finetune.{err}") from err

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ("max_clips", "max_minutes",
                                                       *TRAIN_OVERRIDES)}


def tokenizer_for(model: Whisper, language: str) -> Tokenizer:
    """Whisper's tokenizer for `model`, transcribing `language` (ignored by English-only
    models)."""
    if not model.is_multilingual:
        return get_tokenizer(multilingual=False)
    return get_tokenizer(multilingual=True, num_languages=model.num_languages,
                         language=language, task="transcribe")


def token_targets(tokenizer: Tokenizer, text: str, max_tokens: int) -> tuple[Tensor, Tensor]:
    """Decoder input and targets of one transcript, both (length,) int64, length <= max_tokens.

    input:  sot [lang transcribe] notimestamps t1 ... tn
    target: -100 ...          -100 t1          t2 ... eot
    A transcript longer than the decoder's context is cut (its end-of-text is then not
    trained); `truncated` in `LabelledClips` counts such clips.
    """
    prompt = list(tokenizer.sot_sequence_including_notimestamps)
    text_tokens = tokenizer.encode(" " + text.strip())
    sequence = prompt + text_tokens + [tokenizer.eot]
    sequence = sequence[:max_tokens + 1]
    inputs = torch.tensor(sequence[:-1], dtype=torch.int64)  # (length,)
    targets = torch.tensor(sequence[1:], dtype=torch.int64)  # (length,)
    targets[:len(prompt) - 1] = IGNORE
    return inputs, targets


def select_labelled(transcripts: list[str | None], num_frames: np.ndarray, max_clips: int,
                    max_minutes: float, seed: int) -> list[int]:
    """The transcribed clips a fine-tune may use: a seeded random order of the clips with a
    transcript, cut at `max_clips` clips and `max_minutes` of audio (0: no limit); sorted."""
    candidates = [i for i, t in enumerate(transcripts) if t and t.strip()]
    order = torch.randperm(len(candidates), generator=generator(seed, LABELS_STREAM)).tolist()
    chosen: list[int] = []
    frames = 0
    for k in order:
        clip = candidates[k]
        if max_clips and len(chosen) >= max_clips:
            break
        if max_minutes and frames + int(num_frames[clip]) > max_minutes * FRAMES_PER_MINUTE:
            continue  # too long for what is left of the budget; a shorter clip may fit
        chosen.append(clip)
        frames += int(num_frames[clip])
    return sorted(chosen)


class LabelledClips(Dataset):
    """Transcribed clips of a feature split: item i is (mel (n_mels, frames), valid frames,
    decoder input (length,), targets (length,))."""

    def __init__(self, dataset: Dataset, indices: list[int], tokenizer: Tokenizer,
                 max_tokens: int) -> None:
        transcripts = dataset.transcripts  # type: ignore[attr-defined]
        self.dataset, self.indices = dataset, list(indices)
        self.tokens = [token_targets(tokenizer, transcripts[i], max_tokens) for i in indices]
        self.truncated = sum(int(t[-1]) != tokenizer.eot for _, t in self.tokens)
        frames = dataset.num_frames  # type: ignore[attr-defined]
        self.minutes = float(sum(int(frames[i]) for i in indices)) / FRAMES_PER_MINUTE

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        mel, num_frames = self.dataset[self.indices[i]]
        inputs, targets = self.tokens[i]
        return mel, num_frames, inputs, targets


class ByClip(Dataset):
    """Items keyed by (epoch, clip), as the engine's sampler asks for them: no per-clip
    randomness here, so the epoch is ignored."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.dataset[key[1]]


def pad_batch(items: list[tuple[Tensor, Tensor, Tensor, Tensor]]
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stack mels and frame counts; right-pad decoder inputs (with token 0: its positions come
    after the sequence's own, so causal attention never lets them change its logits) and
    targets (with -100: no loss) to the longest in the batch."""
    mels = torch.stack([item[0] for item in items])  # (batch, n_mels, frames)
    frames = torch.stack([item[1] for item in items])  # (batch,)
    length = max(item[2].shape[0] for item in items)
    inputs = torch.zeros(len(items), length, dtype=torch.int64)  # (batch, length)
    targets = torch.full((len(items), length), IGNORE, dtype=torch.int64)  # (batch, length)
    for row, (_, _, x, y) in enumerate(items):
        inputs[row, :x.shape[0]] = x
        targets[row, :y.shape[0]] = y
    return mels, frames, inputs, targets


@dataclass
class FinetuneOutput:
    loss: Tensor  # scalar fp32: mean cross-entropy over the batch's target tokens
    count: int  # target tokens (not padding, not prompt)
    metrics: dict[str, float] = field(default_factory=dict)


class FinetuneModel(nn.Module):
    """Whisper with an adapter in its encoder and decoder; only the adapter is trainable.
    An adapter already in place (a BEST-RQ start) is kept; LoRA's new A is drawn from `seed`."""

    def __init__(self, model: Whisper, adapter: AdapterConfig = IA3, seed: int = 0) -> None:
        super().__init__()
        add_adapter(model.encoder, adapter, seed)
        add_adapter(model.decoder, adapter, seed)
        self.whisper = model

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def forward(self, mel: Tensor, num_frames: Tensor, inputs: Tensor, targets: Tensor,
                with_metrics: bool = True) -> FinetuneOutput:
        """Teacher-forced loss of a batch: mel (batch, n_mels, frames), inputs and targets
        (batch, length). `num_frames` is not needed: Whisper attends to its zero-padding as it
        was trained to."""
        audio = self.whisper.encoder(mel)  # (batch, frames / 2, d_model)
        logits = self.whisper.decoder(inputs, audio)  # (batch, length, vocab)
        keep = targets != IGNORE  # (batch, length)
        count = int(keep.sum())
        with torch.autocast(device_type=logits.device.type, enabled=False):
            selected = logits[keep].float()  # (tokens, vocab)
            y = targets[keep]  # (tokens,)
            # Without targets, keep every vector in the graph (zero gradients) so that DDP
            # ranks reduce the same buckets.
            loss = F.cross_entropy(selected, y) if count else logits.float().sum() * 0.0
        metrics: dict[str, float] = {}
        if with_metrics and count:
            with torch.no_grad():
                # Next-token accuracy of the teacher-forced targets.
                metrics["accuracy"] = float((selected.argmax(-1) == y).float().mean())
                metrics["tokens"] = float(count)
        return FinetuneOutput(loss=loss, count=count, metrics=metrics)


FINETUNE = Objective(name="finetune", items=lambda model, dataset, seed: ByClip(dataset),
                     collate=pad_batch)


def max_decoder_tokens(model: Whisper) -> int:
    """Longest decoder input a model takes (its text context, 448 for every released size)."""
    return int(model.dims.n_text_ctx)
