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
import torch.nn.functional as F
import whisper
from torch import Tensor
from torch.distributions import Categorical
from torch.utils.data import Dataset
from tqdm import tqdm
from whisper.decoding import DecodingTask, GreedyDecoder
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
    from torch's RNG, seeded with `seed` for this window and restored afterwards. The
    definition that `transcribe`'s batched fallback reproduces (its `per_window` reference)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for temperature in FALLBACK_TEMPERATURES:
            result = whisper.decode(model, mel, replace(options, temperature=temperature))[0]
            if not needs_fallback(result):
                break
    return result


class SeededSampler(GreedyDecoder):
    """whisper's sampler (`GreedyDecoder` above temperature 0) for a batch in which window i
    draws from its own generator: it samples the tokens it would sample decoded alone after
    `torch.manual_seed(seed_i)`. A batched `Categorical.sample` draws every row from one
    generator, so a window's tokens would depend on its batch. A window draws only while it
    is unfinished, as one decoded alone stops at its end of text: its generator is left where
    its own decoding leaves it, and the next temperature continues that stream."""

    def __init__(self, temperature: float, eot: int, generators: list[torch.Generator]) -> None:
        super().__init__(temperature, eot)
        self.generators = generators

    def update(self, tokens: Tensor, logits: Tensor,
               sum_logprobs: Tensor) -> tuple[Tensor, bool]:
        # tokens (batch, length), logits (batch, vocab), sum_logprobs (batch,)
        if len(self.generators) != tokens.shape[0]:
            raise ValueError(f"{len(self.generators)} generators for {tokens.shape[0]} windows")
        live = (tokens[:, -1] != self.eot).tolist()
        next_tokens = torch.full((tokens.shape[0],), self.eot, dtype=torch.long,
                                 device=tokens.device)  # (batch,)
        for i, generator in enumerate(self.generators):
            if live[i]:
                # What Categorical(logits=...).sample() draws for this window alone: one
                # multinomial draw from its (1, vocab) probabilities.
                probs = Categorical(logits=logits[i:i + 1] / self.temperature).probs
                next_tokens[i] = torch.multinomial(probs, 1, True, generator=generator)[0, 0]
        # The rest is GreedyDecoder.update's.
        logprobs = F.log_softmax(logits.float(), dim=-1)  # (batch, vocab)
        current = logprobs[torch.arange(logprobs.shape[0]), next_tokens]  # (batch,)
        sum_logprobs += current * (tokens[:, -1] != self.eot)
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=-1)  # (batch, length + 1)
        return tokens, bool((tokens[:, -1] == self.eot).all())


@torch.no_grad()
def decode_seeded(model: Whisper, features: Tensor, options: whisper.DecodingOptions,
                  generators: list[torch.Generator]) -> list[whisper.DecodingResult]:
    """`whisper.decode` of encoder outputs (batch, audio ctx, d_model) at
    `options.temperature` > 0, window i sampling from `generators[i]` (`SeededSampler`)."""
    if options.temperature <= 0 or options.beam_size is not None or \
            (options.best_of or 1) != 1:
        raise ValueError("decode_seeded samples one sequence per window at a temperature > 0 "
                         f"(got temperature {options.temperature}, beam_size "
                         f"{options.beam_size}, best_of {options.best_of})")
    task = DecodingTask(model, options)
    task.decoder = SeededSampler(options.temperature, task.tokenizer.eot, generators)
    return task.run(features)


def encode(model: Whisper, mel: Tensor, options: whisper.DecodingOptions,
           bf16: bool = False) -> Tensor:
    """The encoder's output for windows (batch, n_mels, frames) -> (batch, audio ctx, d_model),
    computed as `whisper.decode` computes it from a mel (in fp16 when `options.fp16`), or, with
    `bf16`, under CPU bf16 autocast and cast back to fp32 for the fp32 decoder."""
    if bf16:
        # The encoder's large matmuls gain from bf16 (1.5x here); the token-by-token decoder
        # does not (2x slower under autocast: small matmuls, casts), so it stays fp32 and
        # takes the encoder's output cast back (whisper.decode takes features for a mel).
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.encoder(mel).float()
    return model.encoder(mel.half() if options.fp16 else mel)  # DecodingTask's own cast


@dataclass
class _Pending:
    """A window waiting for its decoding at the next temperature."""

    position: int  # in the list of windows being transcribed
    features: Tensor  # (audio ctx, d_model)
    generator: torch.Generator  # its sampling stream, continued from one temperature to the next


class BatchedFallback:
    """whisper.transcribe's temperature fallback for many windows at once: the windows that
    fail at one temperature wait for the next one's decoding, which runs on `batch_size` of
    them together, from the encoder output each came with (the encoder runs once per window).
    Window results equal `decode_with_fallback`'s: the same rule, each window's own seeded
    stream (`SeededSampler`). At most `batch_size` - 1 windows wait per temperature between
    `decode(flush=False)` calls, so the features held stay bounded."""

    def __init__(self, model: Whisper, options: whisper.DecodingOptions, batch_size: int) -> None:
        self.model, self.options, self.batch_size = model, options, batch_size
        self.temperatures = [t for t in FALLBACK_TEMPERATURES if t > 0]
        self.waiting: list[list[_Pending]] = [[] for _ in self.temperatures]

    def add(self, position: int, features: Tensor, seed: int) -> None:
        """A window (its features (audio ctx, d_model)) that failed at temperature 0."""
        generator = torch.Generator(device=features.device).manual_seed(seed)
        # A copy: a view would keep its whole batch's features alive while it waits.
        self.waiting[0].append(_Pending(position, features.clone(), generator))

    def decode(self, flush: bool) -> dict[int, whisper.DecodingResult]:
        """Decode every full batch of waiting windows, temperature by temperature, or (`flush`)
        every waiting window; the windows that are done, by position."""
        done: dict[int, whisper.DecodingResult] = {}
        for level, temperature in enumerate(self.temperatures):
            queue = self.waiting[level]
            while len(queue) >= self.batch_size or (flush and queue):
                group, queue[:] = queue[:self.batch_size], queue[self.batch_size:]
                features = torch.stack([w.features for w in group])  # (group, ctx, d_model)
                results = decode_seeded(self.model, features,
                                        replace(self.options, temperature=temperature),
                                        [w.generator for w in group])
                for window, result in zip(group, results, strict=True):
                    if needs_fallback(result) and level + 1 < len(self.temperatures):
                        self.waiting[level + 1].append(window)
                    else:  # passed, or the last temperature: whisper.transcribe keeps it
                        done[window.position] = result
        return done


@torch.no_grad()
def transcribe(model: Whisper, dataset: Dataset, indices: list[int], config: AsrConfig,
               device: torch.device, desc: str = "transcribe",
               stats: dict[str, int] | None = None, per_window: bool = False) -> list[str]:
    """Whisper's transcripts of `dataset[i]` (stored log-mel windows) for i in indices: greedy,
    or (`config.decoding` fallback) with whisper.transcribe's temperature fallback and silence
    rule. `stats`, when given, counts the windows decoded again (`fallbacks`) and those taken
    for silence (`silent`).

    The encoder runs once per window, on `config.batch_size` windows at a time; the windows
    that fail at a temperature are decoded again together (`BatchedFallback`). `per_window`:
    the earlier decoder, kept as the reference of benches and tests: each failing window is
    decoded alone at every temperature (0 again included) by `decode_with_fallback`, from its
    mel in fp32 (the encoder run again each time). Both give the same texts."""
    model.eval().to(device)
    options = whisper.DecodingOptions(
        task="transcribe", language=config.language if model.is_multilingual else "en",
        temperature=0.0, without_timestamps=True, fp16=device.type == "cuda")
    # auto stays fp32 on a CPU: bf16 decoding measured no faster there (bench/decode_speed.py)
    bf16 = device.type == "cpu" and config.precision == "bf16"
    counts = stats if stats is not None else {}
    counts.setdefault("fallbacks", 0)
    counts.setdefault("silent", 0)
    fallback = BatchedFallback(model, options, config.batch_size)
    # Per window, its text and whether it is taken for silence (a DecodingResult would keep
    # its batch's encoder output alive).
    outcomes: dict[int, tuple[str, bool]] = {}

    def keep(results: dict[int, whisper.DecodingResult]) -> None:
        for position, result in results.items():
            outcomes[position] = (result.text,
                                  config.decoding == "fallback" and is_silence(result))

    for start in tqdm(range(0, len(indices), config.batch_size), desc=desc):
        batch = indices[start:start + config.batch_size]
        windows = torch.stack([dataset[i][0] for i in batch]).to(device)
        mel = as_mel(windows, dataset)  # (batch, n_mels, 3000)
        features = encode(model, mel, options, bf16)  # (batch, audio ctx, d_model)
        first = whisper.decode(model, features, options)
        for j, clip in enumerate(batch):
            if config.decoding != "fallback" or not needs_fallback(first[j]):
                keep({start + j: first[j]})
                continue
            counts["fallbacks"] += 1
            if per_window:  # the bf16 path passed features before too
                window = features[j:j + 1] if bf16 else mel[j:j + 1]
                keep({start + j: decode_with_fallback(model, window, options,
                                                      fallback_seed(config.seed, clip))})
            else:
                fallback.add(start + j, features[j], fallback_seed(config.seed, clip))
        keep(fallback.decode(flush=False))
    keep(fallback.decode(flush=True))
    texts: list[str] = []
    for position in range(len(indices)):
        text, silent = outcomes[position]
        counts["silent"] += silent
        texts.append("" if silent else text)
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
