"""ASR on held-out transcribed clips: word error rate of stock vs adapted Whisper.

BEST-RQ trains the encoder's IA^3 vectors without labels, while Whisper's decoder stays as it
was; whether the adapted encoder still suits that decoder is what the WER tells. Decoding is
whisper's own (`whisper.decode`, greedy at temperature 0, no timestamps) on the stored log-mel
windows, text is normalised with whisper's normaliser (English for `.en` and English-language
models, basic otherwise), and errors are counted with jiwer over the whole set (errors / reference
words, not a mean of per-clip rates).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jiwer
import torch
import whisper
from torch.utils.data import Dataset
from tqdm import tqdm
from whisper.model import Whisper
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer


@dataclass
class AsrConfig:
    """Which clips are transcribed and how."""

    max_clips: int = 0  # 0: every eval clip with a transcript
    batch_size: int = 8
    language: str = "en"  # the eval audio's language (ignored by English-only models)

    def validate(self) -> None:
        if self.max_clips < 0:
            raise ValueError(f"evaluate.asr_max_clips must be >= 0, got {self.max_clips}")
        if self.batch_size < 1:
            raise ValueError(f"evaluate.asr_batch_size must be >= 1, got {self.batch_size}")
        if self.language not in whisper.tokenizer.LANGUAGES:
            raise ValueError(f"evaluate.language: {self.language!r} is not a Whisper language "
                             f"code (en, de, fr, ...)")


def normalizer_for(model: Whisper, language: str) -> Callable[[str], str]:
    """Whisper's English normaliser for English, its basic one for other languages."""
    if not model.is_multilingual or language == "en":
        return EnglishTextNormalizer()
    return BasicTextNormalizer()


def transcribed_clips(dataset: Dataset, config: AsrConfig) -> list[int]:
    """Indices of the clips with a non-empty transcript, at most `config.max_clips` of them."""
    transcripts = getattr(dataset, "transcripts", None)
    if transcripts is None:
        return []
    chosen = [i for i, t in enumerate(transcripts) if t and t.strip()]
    return chosen[:config.max_clips] if config.max_clips else chosen


@torch.no_grad()
def transcribe(model: Whisper, dataset: Dataset, indices: list[int], config: AsrConfig,
               device: torch.device, desc: str = "transcribe") -> list[str]:
    """Whisper's greedy transcripts of `dataset[i]` (stored log-mel windows) for i in indices."""
    model.eval().to(device)
    options = whisper.DecodingOptions(
        task="transcribe", language=config.language if model.is_multilingual else "en",
        temperature=0.0, without_timestamps=True, fp16=device.type == "cuda")
    texts: list[str] = []
    for start in tqdm(range(0, len(indices), config.batch_size), desc=desc):
        batch = indices[start:start + config.batch_size]
        mel = torch.stack([dataset[i][0] for i in batch]).to(device)  # (batch, n_mels, 3000)
        texts.extend(r.text for r in whisper.decode(model, mel, options))
    return texts


def word_errors(references: list[str], hypotheses: list[str],
                normalize: Callable[[str], str]) -> dict[str, float]:
    """Corpus WER and its parts after normalising both sides."""
    refs = [normalize(r) for r in references]
    hyps = [normalize(h) for h in hypotheses]
    out = jiwer.process_words(refs, hyps)
    words = out.hits + out.substitutions + out.deletions
    return {"wer": float(out.wer), "substitutions": float(out.substitutions),
            "deletions": float(out.deletions), "insertions": float(out.insertions),
            "reference_words": float(words)}
