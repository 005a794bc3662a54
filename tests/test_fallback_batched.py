"""The batched temperature fallback gives the texts of the window-by-window one, encoding once."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import whisper

from bestrq import asr
from bestrq.asr import AsrConfig, decode_seeded, fallback_seed, transcribe
from bestrq.whisper_model import TINY_TEST_DIMS, load_whisper, random_whisper
from tests.test_asr import Windows

CPU = torch.device("cpu")
# Room for 8 sampled tokens (the test dims' 8-token context leaves 4).
DIMS = replace(TINY_TEST_DIMS, n_text_ctx=16)


def noise_windows(n: int, seed: int = 1) -> Windows:
    gen = torch.Generator().manual_seed(seed)
    return Windows([torch.randn(80, 3000, generator=gen) for _ in range(n)], ["words"] * n)


class Settled:
    """Spy on decode_seeded: which windows each temperature decoded, and how many passed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[float, int, int]] = []  # (temperature, windows, passed)
        real = asr.decode_seeded

        def spy(model, features, options, generators):
            results = real(model, features, options, generators)
            self.calls.append((options.temperature, len(results),
                               sum(not asr.needs_fallback(r) for r in results)))
            return results

        monkeypatch.setattr(asr, "decode_seeded", spy)


def settle_by_tokens(result: whisper.DecodingResult) -> bool:
    """A stand-in for whisper's thresholds, which a random Whisper fails at every temperature:
    fail at temperature 0, and later whenever the sampled tokens' sum is not a multiple of 3,
    so that windows settle at different temperatures, as their own samples decide."""
    return result.temperature == 0 or sum(result.tokens) % 3 != 0


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batched_fallback_gives_the_per_window_texts_on_a_random_whisper(monkeypatch,
                                                                         batch_size):
    # Windows of different first-pass batches meet at the later temperatures; each must
    # still sample its own stream, continued from one temperature to the next.
    monkeypatch.setattr(asr, "needs_fallback", settle_by_tokens)
    model = random_whisper(DIMS)
    data = noise_windows(7)
    indices = list(range(7))
    spy = Settled(monkeypatch)
    config = AsrConfig(batch_size=batch_size, seed=4)
    batched_stats: dict[str, int] = {}
    batched = transcribe(model, data, indices, config, CPU, stats=batched_stats)
    assert spy.calls, "the batched fallback did not run"
    reference_stats: dict[str, int] = {}
    reference = transcribe(model, data, indices, config, CPU, stats=reference_stats,
                           per_window=True)
    assert batched == reference
    assert batched_stats == reference_stats and batched_stats["fallbacks"] == 7
    assert len(set(batched)) == 7  # every window its own sample
    # Every window decoded again at 0.2; some settle early, others go on; batches as large as
    # the waiting windows allow.
    temperatures = [t for t, _, _ in spy.calls]
    assert temperatures[0] == 0.2 and sum(n for t, n, _ in spy.calls if t == 0.2) == 7
    passed = sum(p for t, _, p in spy.calls if t < 1.0)
    assert 0 < passed < 7
    assert max(n for _, n, _ in spy.calls) == batch_size


def test_seeded_sampler_draws_each_window_from_its_own_stream():
    # The same windows in one batch: window i's text is what it samples alone after
    # torch.manual_seed(seed_i), whatever the other windows. Whisper's own batched sampling
    # (one generator for the batch) gives other texts, which the sampler exists to avoid.
    model = random_whisper(DIMS)
    features = model.encoder(torch.stack(noise_windows(3).mels))  # (3, 1500, 64)
    options = whisper.DecodingOptions(language="en", temperature=0.6, without_timestamps=True,
                                      fp16=False)
    seeds = [11, 12, 13]
    alone = []
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)
        alone.append(whisper.decode(model, features[i:i + 1], options)[0].text)
    together = decode_seeded(model, features, options,
                             [torch.Generator().manual_seed(s) for s in seeds])
    assert [r.text for r in together] == alone
    reordered = decode_seeded(model, features[[2, 0]], options,
                              [torch.Generator().manual_seed(s) for s in (13, 11)])
    assert [r.text for r in reordered] == [alone[2], alone[0]]
    torch.manual_seed(seeds[0])
    shared = [r.text for r in whisper.decode(model, features, options)]
    assert shared != alone
    with pytest.raises(ValueError, match="temperature > 0"):
        decode_seeded(model, features, replace(options, temperature=0.0),
                      [torch.Generator()] * 3)


def test_the_encoder_runs_once_per_window():
    # whisper's thresholds: a random Whisper's windows fail at every temperature.
    model = random_whisper(DIMS)
    encoded: list[int] = []
    model.encoder.register_forward_hook(lambda module, inputs, output:
                                        encoded.append(inputs[0].shape[0]))
    data = noise_windows(5)
    for precision in ("fp32", "bf16"):
        encoded.clear()
        stats: dict[str, int] = {}
        transcribe(model, data, list(range(5)), AsrConfig(batch_size=2, precision=precision),
                   CPU, stats=stats)
        assert stats["fallbacks"] == 5 and encoded == [2, 2, 1], precision
    # The per-window reference encodes a failing window again at every temperature.
    encoded.clear()
    transcribe(model, data, list(range(5)), AsrConfig(batch_size=2), CPU, per_window=True)
    assert sum(encoded) == 5 + 5 * len(asr.FALLBACK_TEMPERATURES)  # 0 included again


def test_batched_fallback_on_the_committed_looping_window(monkeypatch, tiny_en_path):
    # The window of the default corpus on which tiny.en's greedy decoding loops
    # (tests/data/loop-window.flac) in a batch of two beside a spoken window that reads well
    # at temperature 0. (Alone, in a batch of one, it is tests/test_asr.py's window whose text
    # equals whisper.transcribe's.)
    import soundfile as sf
    from whisper.audio import N_FRAMES, N_SAMPLES

    from tests.test_asr import spoken_windows

    here = Path(__file__).with_name("data")
    audio, rate = sf.read(here / "loop-window.flac", dtype="float32")
    assert rate == 16000
    mel = whisper.log_mel_spectrogram(torch.from_numpy(audio), padding=N_SAMPLES)
    mel = whisper.pad_or_trim(mel[:, :len(audio) // 160], N_FRAMES)  # (80, 3000)
    spoken = spoken_windows(1)
    data = Windows([spoken.mels[0], mel], [spoken.transcripts[0], ""])
    model = load_whisper(str(tiny_en_path))
    config = AsrConfig(batch_size=2, seed=3)
    spy = Settled(monkeypatch)
    stats: dict[str, int] = {}
    batched = transcribe(model, data, [0, 1], config, CPU, stats=stats)
    reference = transcribe(model, data, [0, 1], config, CPU, per_window=True)
    assert batched == reference
    assert stats == {"fallbacks": 1, "silent": 0}
    assert spy.calls and spy.calls[0][:2] == (0.2, 1)  # the looping window, from temperature 0.2
    assert fallback_seed(3, 1) != fallback_seed(3, 0)
