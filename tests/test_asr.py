"""ASR evaluation: WER counting, Whisper decoding of stored windows, stock vs adapted."""

from pathlib import Path

import numpy as np
import pytest
import torch
import whisper
from torch.utils.data import Dataset
from whisper.normalizers import EnglishTextNormalizer

from bestrq.adapters.ia3 import add_ia3, ia3_state_dict
from bestrq.asr import (
    AsrConfig,
    clip_errors,
    paired_bootstrap,
    transcribe,
    transcribed_clips,
    wer_comparison,
    word_errors,
)
from bestrq.audio import resample
from bestrq.evaluate import EvaluateConfig, compare_asr
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


def test_clip_errors_are_per_clip_jiwer_counts_that_sum_to_the_corpus_counts():
    norm = EnglishTextNormalizer()
    refs = ["The cat sat on the mat.", "Hello, World!", "a b c d", "e f"]
    hyps = ["the cat sat on mat", "hello there world", "a x c d z", "f"]
    edits, words = clip_errors(refs, hyps, norm)
    # one deletion; one insertion; a substitution and an insertion; one deletion
    assert edits.tolist() == [1, 1, 2, 1] and words.tolist() == [6, 2, 4, 2]
    corpus = word_errors(refs, hyps, norm)
    assert edits.sum() == corpus["substitutions"] + corpus["deletions"] + corpus["insertions"]
    assert words.sum() == corpus["reference_words"]
    assert edits.sum() / words.sum() == corpus["wer"]


def varied_clips(n: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """References of 5..15 words; hypothesis a gets 1..len words wrong per clip (a WER that
    varies widely between clips), b gets exactly one word fewer wrong on every clip."""
    rng = np.random.default_rng(seed)
    refs, a, b = [], [], []
    for _ in range(n):
        words = [f"w{j}" for j in range(rng.integers(5, 16))]
        wrong = int(rng.integers(1, len(words) + 1))
        refs.append(" ".join(words))
        a.append(" ".join(["zz"] * wrong + words[wrong:]))
        b.append(" ".join(["zz"] * (wrong - 1) + words[wrong - 1:]))
    return refs, a, b


def test_identical_systems_have_a_zero_delta_with_a_zero_interval():
    refs, a, _ = varied_clips(20, seed=0)
    got = wer_comparison(refs, {"stock": a, "adapted": list(a)}, str, "stock", "adapted")
    assert (got["delta/wer"], got["delta/wer_low"], got["delta/wer_high"]) == (0.0, 0.0, 0.0)
    assert got["delta/wer_relative"] == 0.0
    assert got["stock/wer"] == got["adapted/wer"] == word_errors(refs, a, str)["wer"]
    assert got["stock/wer_low"] < got["stock/wer"] < got["stock/wer_high"]
    assert (got["stock/wer_low"], got["stock/wer_high"]) == (got["adapted/wer_low"],
                                                            got["adapted/wer_high"])


def test_a_system_better_on_every_clip_has_an_interval_below_zero_only_when_paired():
    refs, a, b = varied_clips(30, seed=1)
    got = wer_comparison(refs, {"stock": a, "adapted": b}, str, "stock", "adapted")
    words = sum(len(r.split()) for r in refs)
    assert got["delta/wer"] == pytest.approx(-30 / words)  # one word fewer wrong per clip
    assert got["delta/wer_relative"] == pytest.approx(got["delta/wer"] / got["stock/wer"])
    assert got["delta/wer_low"] <= got["delta/wer"] <= got["delta/wer_high"] < 0.0
    for name in ("stock", "adapted"):
        assert got[f"{name}/wer_low"] <= got[f"{name}/wer"] <= got[f"{name}/wer_high"]
        assert got[f"{name}/reference_words"] == words
    # Resampling each system on its own clips would let clip difficulty swamp the difference.
    (ea, w), (eb, _) = clip_errors(refs, a, str), clip_errors(refs, b, str)
    unpaired = paired_bootstrap(eb, w, seed=1)[:, 0] - paired_bootstrap(ea, w, seed=2)[:, 0]
    low, high = np.percentile(unpaired, [2.5, 97.5])
    assert low < 0.0 < high


def test_bootstrap_is_deterministic_for_a_seed():
    refs, a, b = varied_clips(30, seed=2)
    hyps = {"stock": a, "adapted": b}
    first = wer_comparison(refs, hyps, str, "stock", "adapted", samples=500, seed=3)
    assert wer_comparison(refs, hyps, str, "stock", "adapted", samples=500, seed=3) == first
    other = wer_comparison(refs, hyps, str, "stock", "adapted", samples=500, seed=4)
    assert other["delta/wer"] == first["delta/wer"]  # the point estimate uses every clip
    assert other["stock/wer_low"] != first["stock/wer_low"]
    assert other["stock/wer_low"] == pytest.approx(first["stock/wer_low"], abs=0.02)
    assert other["stock/wer_high"] == pytest.approx(first["stock/wer_high"], abs=0.02)


def test_paired_bootstrap_interval_covers_the_true_wer_and_difference():
    # Clips of varying difficulty d ~ Beta(2, 8) (mean 0.2); system b makes 3/4 of a's error
    # rate on each clip, so the true corpus WERs are 0.2 and 0.15 and the difference -0.05.
    rng = np.random.default_rng(0)
    reps, covered_wer, covered_delta, paired_width, unpaired_width = 200, 0, 0, 0.0, 0.0
    for rep in range(reps):
        words = rng.integers(5, 40, size=60)
        difficulty = rng.beta(2, 8, size=60)
        a, b = rng.binomial(words, difficulty), rng.binomial(words, 0.75 * difficulty)
        wer = paired_bootstrap(np.stack([a, b]), words, samples=300, seed=rep)  # (300, 2)
        low, high = np.percentile(wer[:, 1] - wer[:, 0], [2.5, 97.5])
        covered_delta += low <= -0.05 <= high
        paired_width += high - low
        low, high = np.percentile(wer[:, 0], [2.5, 97.5])
        covered_wer += low <= 0.2 <= high
        alone = paired_bootstrap(b, words, samples=300, seed=reps + rep)[:, 0] - wer[:, 0]
        low, high = np.percentile(alone, [2.5, 97.5])
        unpaired_width += high - low
    # 95% nominal; the binomial standard error of 200 replications is 0.015.
    assert 0.90 <= covered_wer / reps <= 0.99
    assert 0.90 <= covered_delta / reps <= 0.99
    assert paired_width < 0.7 * unpaired_width  # pairing removes the shared clip difficulty


def test_bootstrap_wer_is_the_corpus_rate_of_the_resampled_clips():
    # One clip: every resample is that clip repeated, so its WER is the clip's own rate.
    wer = paired_bootstrap(np.array([[3], [1]]), np.array([4]), samples=100)
    assert wer.shape == (100, 2) and np.all(wer == [0.75, 0.25])
    # Two clips: resample WERs take only the values (2k + 0 * (n - k)) / (10k + 5(n - k))
    # for k draws of the first clip among n = 2.
    wer = paired_bootstrap(np.array([2, 0]), np.array([10, 5]), samples=200, seed=1)[:, 0]
    assert set(np.round(wer, 12)) == {0.0, round(2 / 15, 12), 0.2}
    with pytest.raises(ValueError, match="same, non-zero number of clips"):
        paired_bootstrap(np.array([[1, 2]]), np.array([3]))


def test_only_transcribed_clips_are_decoded():
    data = Windows([torch.zeros(80, 3000)] * 4, ["a", None, "  ", "b"])
    assert transcribed_clips(data, AsrConfig()) == [0, 3]
    assert transcribed_clips(data, AsrConfig(max_clips=1)) == [0]
    # A reference the normaliser leaves without words has nothing to score (it would count
    # as 0 words, and a corpus of such clips as WER 1.0).
    data = Windows([torch.zeros(80, 3000)] * 5, ["a", "(laughs)", "?!", "[noise]", "b"])
    assert transcribed_clips(data, AsrConfig()) == [0, 1, 2, 3, 4]
    assert transcribed_clips(data, AsrConfig(), EnglishTextNormalizer()) == [0, 4]
    assert transcribed_clips(data, AsrConfig(max_clips=1), EnglishTextNormalizer()) == [0]
    with pytest.raises(ValueError, match="evaluate.language"):
        EvaluateConfig(language="klingon").validate()
    with pytest.raises(ValueError, match="evaluate.bootstrap_samples"):
        EvaluateConfig(bootstrap_samples=99).validate()
    assert EvaluateConfig(seed=7).asr_config().seed == 7  # the masks' seed drives the bootstrap


def test_identity_adapter_gives_stock_transcripts(tmp_path):
    # A random Whisper decodes garbage, but the same garbage with IA^3 vectors at one.
    path = tmp_path / "random.pt"
    save_whisper_checkpoint(random_whisper(TINY_TEST_DIMS), path, half=False)
    g = torch.Generator().manual_seed(0)
    data = Windows([torch.randn(80, 3000, generator=g) * 0.5 for _ in range(4)],
                   ["red green", "blue", "?!", "cat dog fish"])  # "?!": no words to score
    config = AsrConfig(batch_size=2, decoding="greedy", bootstrap_unit="window")
    got = compare_asr(str(path), identity_vectors(), data, config,
                      torch.device("cpu"))
    assert got["asr_clips"] == 3 and got["stock/reference_words"] == 6
    assert got["adapted/wer"] == got["stock/wer"] and got["delta/wer"] == 0.0
    assert got["delta/wer_low"] == got["delta/wer_high"] == got["delta/wer_relative"] == 0.0
    assert got["stock/wer_low"] <= got["stock/wer"] <= got["stock/wer_high"]
    assert got["stock/wer"] > 0.5  # a random decoder does not read speech


def test_real_tiny_en_reads_synthetic_speech_and_a_broken_adapter_hurts(tiny_en_path):
    data = spoken_windows(4)
    model = load_whisper(str(tiny_en_path))
    greedy = AsrConfig(batch_size=4, decoding="greedy", bootstrap_unit="window")
    hyps = transcribe(model, data, [0, 1, 2, 3], greedy, torch.device("cpu"))
    stock = word_errors(data.transcripts, hyps, EnglishTextNormalizer())
    assert stock["wer"] < 0.35 and stock["reference_words"] > 20

    # Vectors that silence every value projection leave the decoder nothing to read.
    encoder = load_whisper(str(tiny_en_path)).encoder
    add_ia3(encoder)
    vectors = {f"ia3.encoder.{k}": (torch.zeros_like(v) if k.endswith("attn.value") else v)
               for k, v in ia3_state_dict(encoder).items()}
    got = compare_asr(str(tiny_en_path), vectors, data, greedy,
                      torch.device("cpu"))
    assert got["stock/wer"] == pytest.approx(stock["wer"])
    assert got["adapted/wer"] > got["stock/wer"] + 0.4
    assert got["delta/wer_low"] > 0.3  # worse on every clip: the whole interval is above 0
    assert got["delta/wer_relative"] == pytest.approx(got["delta/wer"] / got["stock/wer"])


def test_bf16_decoding_reads_like_fp32_and_auto_decodes_in_fp32_on_cpu(tiny_en_path, monkeypatch):
    data = spoken_windows(6)
    model = load_whisper(str(tiny_en_path))
    cpu = torch.device("cpu")
    normalize = EnglishTextNormalizer()
    wers, texts = {}, {}
    for precision in ("fp32", "bf16"):
        texts[precision] = transcribe(model, data, list(range(6)),
                                      AsrConfig(batch_size=3, precision=precision,
                                                decoding="greedy"), cpu)
        wers[precision] = word_errors(data.transcripts, texts[precision], normalize)["wer"]
    assert wers["fp32"] < 0.35 and wers["bf16"] <= wers["fp32"] + 0.05, (wers, texts)
    # On a CPU, auto decodes in fp32 even with bf16 hardware (measured no faster); bf16 runs
    # the encoder under autocast. Either way the decoder gets fp32 features (the encoder runs
    # once, before whisper.decode) outside autocast.
    autocast = []
    model.encoder.register_forward_hook(
        lambda module, inputs, output: autocast.append(torch.is_autocast_enabled("cpu")))
    real = whisper.decode

    def spy(model, features, options):
        assert tuple(features.shape[-2:]) == (model.dims.n_audio_ctx, model.dims.n_audio_state)
        assert not torch.is_autocast_enabled("cpu") and features.dtype == torch.float32
        return real(model, features, options)

    monkeypatch.setattr(whisper, "decode", spy)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert transcribe(model, data, [0], AsrConfig(precision="auto", decoding="greedy"), cpu) \
        == texts["fp32"][:1]
    assert transcribe(model, data, [0], AsrConfig(precision="bf16", decoding="greedy"), cpu) \
        == texts["bf16"][:1]
    assert autocast == [False, True]


def test_speaker_bootstrap_covers_the_population_wer_where_window_resampling_does_not():
    # Clustered data as an eval split is: 8 speakers drawn from a population whose error rates
    # differ by speaker, 5 windows of 60 words each. The population WER is 0.2.
    rng = np.random.default_rng(0)
    speakers, windows, words_per = 8, 5, 60
    groups = np.repeat(np.arange(speakers), windows)  # (clips,)
    words = np.full(speakers * windows, words_per)
    covered = {"speaker": 0, "window": 0}
    reps = 300
    for rep in range(reps):
        rates = rng.beta(2.0, 8.0, size=speakers)  # mean 0.2, wide spread between speakers
        edits = rng.binomial(words_per, rates[groups])[None]  # (1 system, clips)
        for unit, g in (("speaker", groups), ("window", None)):
            wer = paired_bootstrap(edits, words, samples=300, seed=rep, groups=g)[:, 0]
            low, high = np.percentile(wer, [2.5, 97.5])
            covered[unit] += low <= 0.2 <= high
    coverage = {unit: n / reps for unit, n in covered.items()}
    assert coverage["speaker"] >= 0.85, coverage
    assert coverage["window"] <= 0.70 and coverage["speaker"] > coverage["window"] + 0.2, \
        coverage


def test_identical_systems_have_a_zero_interval_under_both_units():
    refs = ["the cat sat", "a dog ran far", "birds fly", "fish swim deep"]
    hyps = ["the cat sat down", "a dog ran", "words fly", "fish swim deep"]
    for groups in (None, ["a", "a", "b", "b"]):
        got = wer_comparison(refs, {"x": hyps, "y": list(hyps)}, EnglishTextNormalizer(),
                             baseline="x", other="y", samples=200, seed=1, groups=groups)
        assert got["delta/wer"] == got["delta/wer_low"] == got["delta/wer_high"] == 0.0
    with pytest.raises(ValueError, match="one speaker per clip"):
        paired_bootstrap(np.ones((1, 4)), np.ones(4), groups=["a", "b"])


def test_speaker_resamples_draw_whole_speakers_with_their_windows():
    # Speaker a: every word wrong in both windows; b: none. A resample is a's share of the
    # draw, so its WER is k/2 (k speakers a among 2 draws) when both have equal words.
    edits = np.array([[10, 10, 0, 0]])
    words = np.array([10, 10, 10, 10])
    wer = paired_bootstrap(edits, words, samples=2000, seed=0, groups=["a", "a", "b", "b"])
    assert set(np.round(wer[:, 0], 6)) == {0.0, 0.5, 1.0}
    assert abs(float((wer[:, 0] == 0.5).mean()) - 0.5) < 0.05
    by_window = paired_bootstrap(edits, words, samples=2000, seed=0)
    assert len(set(np.round(by_window[:, 0], 6))) == 5  # 0, 1/4, ..., 1: windows independent


def _result(text: str, compression: float, logprob: float, no_speech: float = 0.01):
    return whisper.DecodingResult(audio_features=torch.zeros(1), language="en", text=text,
                                  avg_logprob=logprob, no_speech_prob=no_speech,
                                  compression_ratio=compression, temperature=0.0)


def test_fallback_decodes_a_looping_window_again_at_higher_temperatures(monkeypatch):
    # A crafted decoder: window 0 loops at temperatures 0 and 0.2, reads well at 0.4; window 1
    # reads well at once; window 2 is silence (no speech, a low log-prob): no text. The
    # batched fallback samples through asr.decode_seeded, the per-window one whisper.decode.
    from bestrq import asr

    calls = []

    def decode(model, mel, options):
        calls.append((mel.shape[0], options.temperature))
        if mel.shape[0] == 3:  # the batched first pass at temperature 0
            return [_result("la la la la", 5.0, -0.2), _result("fine", 1.2, -0.3),
                    _result("um", 1.0, -1.5, no_speech=0.9)]
        if options.temperature < 0.4:
            return [_result("la la la la", 4.0, -0.2)]
        return [_result("the real words", 1.3, -0.4)]

    monkeypatch.setattr(whisper, "decode", decode)
    monkeypatch.setattr(asr, "decode_seeded",
                        lambda model, features, options, generators: decode(model, features,
                                                                            options))
    model = random_whisper(TINY_TEST_DIMS)
    data = Windows([torch.zeros(80, 3000)] * 3, ["the real words", "fine", ""])
    for per_window, decoded in ((False, [(3, 0.0), (1, 0.2), (1, 0.4)]),
                                (True, [(3, 0.0), (1, 0.0), (1, 0.2), (1, 0.4)])):
        calls.clear()
        stats: dict[str, int] = {}
        got = transcribe(model, data, [0, 1, 2], AsrConfig(batch_size=3), torch.device("cpu"),
                         stats=stats, per_window=per_window)
        assert got == ["the real words", "fine", ""]
        assert calls == decoded
        assert stats == {"fallbacks": 1, "silent": 1}
    calls.clear()
    greedy = transcribe(model, data, [0, 1, 2], AsrConfig(batch_size=3, decoding="greedy"),
                        torch.device("cpu"))
    assert greedy == ["la la la la", "fine", "um"] and calls == [(3, 0.0)]


def test_fallback_equals_whisper_transcribe_on_a_window_where_greedy_loops(tiny_en_path):
    # A window of the default corpus on which tiny.en's greedy decoding loops (gzip ratio 7.9).
    import soundfile as sf
    from whisper.audio import N_FRAMES, N_SAMPLES

    from bestrq.asr import COMPRESSION_RATIO_THRESHOLD, fallback_seed

    here = Path(__file__).with_name("data")
    audio, rate = sf.read(here / "loop-window.flac", dtype="float32")
    reference = (here / "loop-window.txt").read_text().strip()
    assert rate == 16000
    model = load_whisper(str(tiny_en_path))
    # The window as whisper.transcribe cuts it: the mel of the audio, padded to 30 s.
    mel = whisper.log_mel_spectrogram(torch.from_numpy(audio), padding=N_SAMPLES)
    mel = whisper.pad_or_trim(mel[:, :len(audio) // 160], N_FRAMES)  # (80, 3000)
    data = Windows([mel], [reference])
    cpu = torch.device("cpu")
    options = whisper.DecodingOptions(language="en", temperature=0.0, without_timestamps=True,
                                      fp16=False)
    assert whisper.decode(model, mel[None], options)[0].compression_ratio > \
        COMPRESSION_RATIO_THRESHOLD
    stats: dict[str, int] = {}
    fallback = transcribe(model, data, [0], AsrConfig(seed=3), cpu, stats=stats)[0]
    greedy = transcribe(model, data, [0], AsrConfig(decoding="greedy"), cpu)[0]
    assert stats["fallbacks"] == 1
    torch.manual_seed(fallback_seed(3, 0))
    users = whisper.transcribe(model, audio, language="en", condition_on_previous_text=False,
                               without_timestamps=True, fp16=False, verbose=None)["text"]
    assert fallback == users.strip()
    normalize = EnglishTextNormalizer()
    errors = {name: word_errors([reference], [text], normalize)
              for name, text in (("fallback", fallback), ("greedy", greedy))}
    assert errors["greedy"]["insertions"] > errors["fallback"]["insertions"] + 20
    assert errors["fallback"]["wer"] < errors["greedy"]["wer"]


def test_seeds_are_pooled_over_the_same_speaker_resamples():
    # Two fine-tune seeds: each seed's figures equal a one-seed comparison on its own (the
    # resamples do not depend on how many systems share them); the pooled difference is their
    # mean, its interval that of the per-resample mean of the two differences.
    refs, a, b = varied_clips(24, seed=3)
    _, c, d = varied_clips(24, seed=3)
    d = [x if i % 3 else a[i] for i, x in enumerate(d)]  # seed 1 helps on fewer clips
    groups = [f"spk{i % 6}" for i in range(24)]
    runs = {"stock@0": a, "adapted@0": b, "stock@1": c, "adapted@1": d}
    got = wer_comparison(refs, runs, str, "stock", "adapted", samples=400, seed=5, groups=groups,
                         repeats=["0", "1"])
    singles = [wer_comparison(refs, {"stock": s, "adapted": t}, str, "stock", "adapted",
                              samples=400, seed=5, groups=groups) for s, t in ((a, b), (c, d))]
    for r, single in enumerate(singles):
        for key in ("delta/wer", "delta/wer_low", "delta/wer_high", "stock/wer",
                    "adapted/wer_low", "adapted/insertions"):
            assert got[f"seed_{r}/{key}"] == pytest.approx(single[key]), key
    assert singles[0]["delta/wer"] != pytest.approx(singles[1]["delta/wer"])
    assert got["delta/wer"] == pytest.approx((singles[0]["delta/wer"] +
                                              singles[1]["delta/wer"]) / 2)
    assert got["stock/wer"] == pytest.approx((singles[0]["stock/wer"] +
                                              singles[1]["stock/wer"]) / 2)
    # The pooled interval: from the same resamples, the mean of both seeds' differences.
    edits = np.stack([clip_errors(refs, runs[k], str)[0] for k in runs])
    words = clip_errors(refs, a, str)[1]
    wer = paired_bootstrap(edits, words, 400, 5, groups)
    low, high = np.percentile(((wer[:, 1] - wer[:, 0]) + (wer[:, 3] - wer[:, 2])) / 2,
                              [2.5, 97.5])
    assert (got["delta/wer_low"], got["delta/wer_high"]) == pytest.approx((low, high))
    assert got["seeds"] == 2.0
    with pytest.raises(ValueError, match="stock@2"):
        wer_comparison(refs, runs, str, "stock", "adapted", repeats=["0", "2"])
