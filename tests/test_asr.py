"""ASR evaluation: WER counting, Whisper decoding of stored windows, stock vs adapted."""

import pytest
import torch
import whisper
from torch.utils.data import Dataset
from whisper.normalizers import EnglishTextNormalizer

from bestrq.asr import AsrConfig, transcribe, transcribed_clips, word_errors
from bestrq.audio import resample
from bestrq.evaluate import EvaluateConfig, compare_asr
from bestrq.ia3 import add_ia3, ia3_state_dict
from bestrq.synth import EspeakSynthesizer, generate_sentences
from bestrq.whisper_model import (
    TINY_TEST_DIMS,
    load_whisper,
    random_whisper,
    save_whisper_checkpoint,
)


class Windows(Dataset):
    """Stored-feature stand-in: (mel (80, 3000), frames) items and their transcripts."""

    def __init__(self, mels: list[torch.Tensor], transcripts: list[str | None]) -> None:
        self.mels, self.transcripts = mels, transcripts

    def __len__(self) -> int:
        return len(self.mels)

    def __getitem__(self, i: int):
        return self.mels[i], torch.tensor(3000)


def spoken_windows(n: int) -> Windows:
    """n espeak sentences as Whisper log-mel windows, with their texts."""
    synth = EspeakSynthesizer()
    texts = generate_sentences(n, seed=7)
    mels = []
    for text in texts:
        audio, rate = synth.synthesize(text, "en-us", rate=150)
        wave = torch.from_numpy(resample(audio, rate, 16000))
        mels.append(whisper.log_mel_spectrogram(whisper.pad_or_trim(wave)))  # (80, 3000)
    return Windows(mels, texts)


def identity_vectors() -> dict[str, torch.Tensor]:
    encoder = random_whisper(TINY_TEST_DIMS).encoder
    add_ia3(encoder)
    return {f"ia3.encoder.{k}": v.detach().clone() for k, v in ia3_state_dict(encoder).items()}


def test_word_errors_count_over_the_corpus_after_normalising():
    norm = EnglishTextNormalizer()
    got = word_errors(["The cat sat on the mat.", "Hello, World!"],
                      ["the cat sat on mat", "hello world"], norm)
    assert got == {"wer": 1 / 8, "substitutions": 0.0, "deletions": 1.0, "insertions": 0.0,
                   "reference_words": 8.0}
    # Errors over all reference words, not a mean of per-clip rates (which would be 0.5).
    got = word_errors(["a b c d", "e"], ["a b c d", "x y"], str)
    assert got["wer"] == pytest.approx(2 / 5)
    assert (got["substitutions"], got["insertions"]) == (1.0, 1.0)


def test_only_transcribed_clips_are_decoded():
    data = Windows([torch.zeros(80, 3000)] * 4, ["a", None, "  ", "b"])
    assert transcribed_clips(data, AsrConfig()) == [0, 3]
    assert transcribed_clips(data, AsrConfig(max_clips=1)) == [0]
    with pytest.raises(ValueError, match="evaluate.language"):
        EvaluateConfig(language="klingon").validate()


def test_identity_adapter_gives_stock_transcripts(tmp_path):
    # A random Whisper decodes garbage, but the same garbage with IA^3 vectors at one.
    path = tmp_path / "random.pt"
    save_whisper_checkpoint(random_whisper(TINY_TEST_DIMS), path, half=False)
    g = torch.Generator().manual_seed(0)
    data = Windows([torch.randn(80, 3000, generator=g) * 0.5 for _ in range(3)],
                   ["red green", "blue", "cat dog fish"])
    got = compare_asr(str(path), identity_vectors(), data, AsrConfig(batch_size=2),
                      torch.device("cpu"))
    assert got["asr_clips"] == 3 and got["stock/reference_words"] == 6
    assert got["adapted/wer"] == got["stock/wer"] and got["delta/wer"] == 0.0
    assert got["stock/wer"] > 0.5  # a random decoder does not read speech


def test_real_tiny_en_reads_synthetic_speech_and_a_broken_adapter_hurts(tiny_en_path):
    data = spoken_windows(4)
    model = load_whisper(str(tiny_en_path))
    hyps = transcribe(model, data, [0, 1, 2, 3], AsrConfig(batch_size=4), torch.device("cpu"))
    stock = word_errors(data.transcripts, hyps, EnglishTextNormalizer())
    assert stock["wer"] < 0.35 and stock["reference_words"] > 20

    # Vectors that silence every value projection leave the decoder nothing to read.
    encoder = load_whisper(str(tiny_en_path)).encoder
    add_ia3(encoder)
    vectors = {f"ia3.encoder.{k}": (torch.zeros_like(v) if k.endswith("attn.value") else v)
               for k, v in ia3_state_dict(encoder).items()}
    got = compare_asr(str(tiny_en_path), vectors, data, AsrConfig(batch_size=4),
                      torch.device("cpu"))
    assert got["stock/wer"] == pytest.approx(stock["wer"])
    assert got["adapted/wer"] > got["stock/wer"] + 0.4
