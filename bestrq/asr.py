"""ASR on held-out transcribed clips: word error rate of stock vs adapted Whisper.

BEST-RQ trains the encoder's IA^3 vectors without labels, while Whisper's decoder stays as it
was; whether the adapted encoder still suits that decoder is what the WER tells. Decoding is
whisper's own (`whisper.decode`, greedy at temperature 0, no timestamps) on the stored log-mel
windows, text is normalised with whisper's normaliser (English for `.en` and English-language
models, basic otherwise), and errors are counted with jiwer over the whole set (errors / reference
words, not a mean of per-clip rates).

A WER difference comes with a 95% paired bootstrap interval (`wer_comparison`): clips are
resampled with replacement, the same clips for both systems, so that the interval reflects how
much the difference depends on which clips were drawn, not the (shared) difficulty of the clips.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import jiwer
import numpy as np
import torch
import whisper
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm
from whisper.model import Whisper
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

from bestrq.dataset import as_mel
from bestrq.seeding import FALLBACK_STREAM, derived_seed


@dataclass
class AsrConfig:
    """Which clips are transcribed and how."""

    max_clips: int = 0  # 0: every eval clip with a transcript
    batch_size: int = 8
    language: str = "en"  # the eval audio's language (ignored by English-only models)
    bootstrap_samples: int = 1000  # resamples of the WER interval
    seed: int = 0  # of the bootstrap resampling
    # What the intervals resample: speakers (then their windows), or windows as independent.
    bootstrap_unit: str = "speaker"
    # fallback: whisper.transcribe's temperature fallback, as users decode; greedy: temperature 0
    decoding: str = "fallback"
    # The top-level `precision`. On a CPU, bf16 runs the encoder under bf16 autocast and the
    # decoder in fp32; auto and fp32 decode in fp32 (bf16 measured no faster: README). On CUDA,
    # whisper's own fp16.
    precision: str = "auto"

    def validate(self) -> None:
        """Whether Whisper knows the language (the bounds are `EvaluateConfig`'s knobs)."""
        if self.language not in whisper.tokenizer.LANGUAGES:
            raise ValueError(f"evaluate.language: {self.language!r} is not a Whisper language "
                             f"code (en, de, fr, ...)")


def normalizer_for(model: Whisper, language: str) -> Callable[[str], str]:
    """Whisper's English normaliser for English, its basic one for other languages."""
    if not model.is_multilingual or language == "en":
        return EnglishTextNormalizer()
    return BasicTextNormalizer()


def transcribed_clips(dataset: Dataset, config: AsrConfig,
                      normalize: Callable[[str], str] | None = None) -> list[int]:
    """Indices of the clips with a transcript that has words (after `normalize`, when given:
    "(laughs)" or "?!" leaves none to score), at most `config.max_clips` of them."""
    transcripts = getattr(dataset, "transcripts", None)
    if transcripts is None:
        return []
    normalize = normalize or (lambda text: text)
    chosen = [i for i, t in enumerate(transcripts) if t and normalize(t).strip()]
    return chosen[:config.max_clips] if config.max_clips else chosen


# whisper.transcribe's defaults: the temperatures it retries a window at, and when it does.
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
COMPRESSION_RATIO_THRESHOLD = 2.4  # gzip ratio of the text above this: a loop
LOGPROB_THRESHOLD = -1.0  # mean token log-probability below this: a guess
NO_SPEECH_THRESHOLD = 0.6  # with a low log-probability: silence, transcribed as nothing


def needs_fallback(result: whisper.DecodingResult) -> bool:
    """whisper.transcribe's rule for decoding a window again at the next temperature."""
    failed = (result.compression_ratio > COMPRESSION_RATIO_THRESHOLD
              or result.avg_logprob < LOGPROB_THRESHOLD)
    silent = result.no_speech_prob > NO_SPEECH_THRESHOLD and \
        result.avg_logprob < LOGPROB_THRESHOLD
    return failed and not silent


def is_silence(result: whisper.DecodingResult) -> bool:
    """whisper.transcribe skips such a window: no text."""
    return result.no_speech_prob > NO_SPEECH_THRESHOLD and \
        not result.avg_logprob > LOGPROB_THRESHOLD


def fallback_seed(seed: int, clip: int) -> int:
    """The seed of clip `clip`'s sampled re-decodings (temperatures above 0)."""
    return derived_seed(seed, clip, 0, FALLBACK_STREAM)


def decode_with_fallback(model: Whisper, mel: Tensor, options: whisper.DecodingOptions,
                         seed: int) -> whisper.DecodingResult:
    """One window (1, n_mels, frames) or its features, as whisper.transcribe decodes it: at
    each temperature in turn until the result is neither a loop nor a guess. Sampling draws
    from torch's RNG, seeded with `seed` for this window and restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for temperature in FALLBACK_TEMPERATURES:
            result = whisper.decode(model, mel, replace(options, temperature=temperature))[0]
            if not needs_fallback(result):
                break
    return result


@torch.no_grad()
def transcribe(model: Whisper, dataset: Dataset, indices: list[int], config: AsrConfig,
               device: torch.device, desc: str = "transcribe",
               stats: dict[str, int] | None = None) -> list[str]:
    """Whisper's transcripts of `dataset[i]` (stored log-mel windows) for i in indices: greedy,
    or (`config.decoding` fallback) with whisper.transcribe's temperature fallback and silence
    rule. `stats`, when given, counts the windows decoded again (`fallbacks`) and those taken
    for silence (`silent`)."""
    model.eval().to(device)
    options = whisper.DecodingOptions(
        task="transcribe", language=config.language if model.is_multilingual else "en",
        temperature=0.0, without_timestamps=True, fp16=device.type == "cuda")
    # auto stays fp32 on a CPU: bf16 decoding measured no faster there (bench/decode_speed.py)
    bf16 = device.type == "cpu" and config.precision == "bf16"
    counts = stats if stats is not None else {}
    counts.setdefault("fallbacks", 0)
    counts.setdefault("silent", 0)
    texts: list[str] = []
    for start in tqdm(range(0, len(indices), config.batch_size), desc=desc):
        batch = indices[start:start + config.batch_size]
        windows = torch.stack([dataset[i][0] for i in batch]).to(device)
        mel = as_mel(windows, dataset)  # (batch, n_mels, 3000)
        if bf16:
            # The encoder's large matmuls gain from bf16 (1.5x here); the token-by-token decoder
            # does not (2x slower under autocast: small matmuls, casts), so it stays fp32 and
            # takes the encoder's output cast back (whisper.decode takes features for a mel).
            with torch.autocast("cpu", dtype=torch.bfloat16):
                features = model.encoder(mel)  # (batch, audio ctx, d_model)
            mel = features.float()
        results = whisper.decode(model, mel, options)
        for j, clip in enumerate(batch):
            if config.decoding == "fallback":
                if needs_fallback(results[j]):
                    counts["fallbacks"] += 1
                    results[j] = decode_with_fallback(model, mel[j:j + 1], options,
                                                      fallback_seed(config.seed, clip))
                if is_silence(results[j]):
                    counts["silent"] += 1
                    texts.append("")
                    continue
            texts.append(results[j].text)
    return texts


def _process(references: list[str], hypotheses: list[str],
             normalize: Callable[[str], str]) -> jiwer.WordOutput:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    return jiwer.process_words([normalize(r) for r in references],
                               [normalize(h) for h in hypotheses])


def _clip_counts(out: jiwer.WordOutput) -> tuple[np.ndarray, np.ndarray]:
    """Per-clip word edits and reference words of a jiwer alignment."""
    edits = np.array([sum((c.hyp_end_idx - c.hyp_start_idx) if c.type == "insert"
                          else (c.ref_end_idx - c.ref_start_idx)
                          for c in chunks if c.type != "equal")
                      for chunks in out.alignments], dtype=np.int64)  # (clips,)
    words = np.array([len(r) for r in out.references], dtype=np.int64)  # (clips,)
    return edits, words


def _corpus_counts(out: jiwer.WordOutput) -> dict[str, float]:
    words = out.hits + out.substitutions + out.deletions
    return {"wer": float(out.wer), "substitutions": float(out.substitutions),
            "deletions": float(out.deletions), "insertions": float(out.insertions),
            "reference_words": float(words)}


def word_errors(references: list[str], hypotheses: list[str],
                normalize: Callable[[str], str]) -> dict[str, float]:
    """Corpus WER and its parts after normalising both sides."""
    return _corpus_counts(_process(references, hypotheses, normalize))


def clip_errors(references: list[str], hypotheses: list[str],
                normalize: Callable[[str], str]) -> tuple[np.ndarray, np.ndarray]:
    """Per clip, word edits (substitutions + deletions + insertions) and reference words after
    normalising both sides: two int64 arrays (clips,) whose sums are `word_errors`' counts."""
    return _clip_counts(_process(references, hypotheses, normalize))


def paired_bootstrap(edits: np.ndarray, words: np.ndarray, samples: int = 1000,
                     seed: int = 0, groups: np.ndarray | list | None = None) -> np.ndarray:
    """Corpus WER of `samples` resamples of the clips, drawn with replacement and shared by all
    systems: edits (systems, clips), words (clips,) -> WER (samples, systems).

    A resample's WER is sum(edits) / sum(words) over its clips (a corpus rate, like jiwer's).
    With `groups` (clips,), the speaker (or recording) of each clip, the resampling follows the
    data's nesting: a resample draws as many speakers as there are, with replacement, then for
    each drawn speaker as many of its clips as it has, with replacement (a two-stage cluster
    bootstrap). Clips of one speaker share its voice and errors, so resampling clips alone
    treats them as independent and gives intervals that are too narrow.
    """
    edits = np.atleast_2d(np.asarray(edits, dtype=np.float64))  # (systems, clips)
    words = np.asarray(words, dtype=np.float64)  # (clips,)
    clips = words.shape[0]
    if edits.shape[1] != clips or clips == 0:
        raise ValueError(f"edits {edits.shape} and words {words.shape} must cover the same, "
                         f"non-zero number of clips")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    rng = np.random.default_rng(seed)
    out = np.empty((samples, edits.shape[0]))
    if groups is not None:
        labels = np.asarray(groups)
        if labels.shape != (clips,):
            raise ValueError(f"groups {labels.shape} must give one speaker per clip ({clips})")
        members = [np.flatnonzero(labels == g) for g in np.unique(labels)]
        for s in range(samples):
            drawn = rng.integers(0, len(members), size=len(members))
            idx = np.concatenate([m[rng.integers(0, len(m), size=len(m))]
                                  for m in (members[g] for g in drawn)])  # (clips drawn,)
            total = max(words[idx].sum(), 1.0)
            out[s] = edits[:, idx].sum(axis=1) / total
        return out
    # Resample in blocks so that the (block, clips) index matrix stays near 2M entries
    # whatever the number of clips.
    block = max(1, (1 << 21) // clips)
    for start in range(0, samples, block):
        idx = rng.integers(0, clips, size=(min(block, samples - start), clips))  # (b, clips)
        # A resample with no reference words (only empty references) would divide by zero.
        total = np.maximum(words[idx].sum(axis=1), 1.0)  # (b,)
        out[start:start + idx.shape[0]] = edits[:, idx].sum(axis=2).T / total[:, None]
    return out


def wer_comparison(references: list[str], hypotheses: dict[str, list[str]],
                   normalize: Callable[[str], str], baseline: str, other: str,
                   samples: int = 1000, seed: int = 0, groups: list[str] | None = None,
                   repeats: list[str] | None = None) -> dict[str, float]:
    """Corpus WER of each system in `hypotheses` with its 95% bootstrap interval and error
    counts (`{name}/wer`, `/wer_low`, `/wer_high`, `/substitutions`, `/deletions`,
    `/insertions`, `/reference_words`), and `delta/wer` = WER(other) - WER(baseline) on all
    clips with its paired 95% interval (`delta/wer_low`, `delta/wer_high`) and
    `delta/wer_relative` (delta / baseline WER; 0 when that is 0). `groups`: each clip's
    speaker, for intervals that resample speakers (`paired_bootstrap`); None: clips.

    `repeats` (e.g. fine-tune seeds): the systems were run once per repeat r, keyed
    `{name}@{r}`. Each repeat's figures come as `seed_{r}/...`; the unprefixed ones are pooled:
    the mean over repeats of each figure, with intervals from the same resamples of speakers
    (and their clips) for every repeat, the statistic averaged across repeats before the
    percentiles are taken."""
    runs = repeats or [""]
    key = (lambda name, r: f"{name}@{r}") if repeats else (lambda name, r: name)
    for r in runs:
        for name in (baseline, other):
            if key(name, r) not in hypotheses:
                raise ValueError(f"no hypotheses for {key(name, r)!r}; have {sorted(hypotheses)}")
    names = list(hypotheses)
    outputs = [_process(references, hypotheses[name], normalize) for name in names]
    counts = [_clip_counts(o) for o in outputs]
    words = counts[0][1]  # (clips,) the same references for every system
    edits = np.stack([e for e, _ in counts])  # (systems, clips)
    wer = paired_bootstrap(edits, words, samples, seed, groups)  # (samples, systems)
    result: dict[str, float] = {}
    for s, (name, o) in enumerate(zip(names, outputs, strict=True)):
        low, high = np.percentile(wer[:, s], [2.5, 97.5])
        result.update({f"{name}/{k}": v for k, v in _corpus_counts(o).items()})
        result.update({f"{name}/wer_low": float(low), f"{name}/wer_high": float(high)})
    deltas = []  # (samples,) per repeat
    for r in runs:
        b, o = names.index(key(baseline, r)), names.index(key(other, r))
        deltas.append(wer[:, o] - wer[:, b])
        low, high = np.percentile(deltas[-1], [2.5, 97.5])
        delta = result[f"{key(other, r)}/wer"] - result[f"{key(baseline, r)}/wer"]
        base = result[f"{key(baseline, r)}/wer"]
        prefix = f"seed_{r}/" if repeats else ""
        result.update({f"{prefix}delta/wer": delta, f"{prefix}delta/wer_low": float(low),
                       f"{prefix}delta/wer_high": float(high),
                       f"{prefix}delta/wer_relative": delta / base if base else 0.0})
    if not repeats:
        return result
    per_seed = {f"seed_{r}/{name}/{k[len(key(name, r)) + 1:]}": v
                for name in (baseline, other) for r in runs
                for k, v in result.items() if k.startswith(f"{key(name, r)}/")}
    pooled: dict[str, float] = {}
    for name in (baseline, other):
        columns = [names.index(key(name, r)) for r in runs]
        low, high = np.percentile(wer[:, columns].mean(axis=1), [2.5, 97.5])
        for k in _corpus_counts(outputs[columns[0]]):
            pooled[f"{name}/{k}"] = float(np.mean([result[f"{key(name, r)}/{k}"] for r in runs]))
        pooled.update({f"{name}/wer_low": float(low), f"{name}/wer_high": float(high)})
    low, high = np.percentile(np.mean(deltas, axis=0), [2.5, 97.5])
    delta = pooled[f"{other}/wer"] - pooled[f"{baseline}/wer"]
    base = pooled[f"{baseline}/wer"]
    pooled.update({"delta/wer": delta, "delta/wer_low": float(low), "delta/wer_high": float(high),
                   "delta/wer_relative": delta / base if base else 0.0, "seeds": float(len(runs))})
    return {**pooled, **per_seed, **{k: v for k, v in result.items() if k.startswith("seed_")}}
