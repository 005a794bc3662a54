"""Tests for bestrq.finetune: Whisper's teacher-forced objective on IA^3 vectors, through the
training engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import whisper
from torch.utils.data import Dataset
from whisper.normalizers import EnglishTextNormalizer

from bestrq.adapters.ia3 import count_ia3_parameters
from bestrq.asr import word_errors
from bestrq.audio import resample
from bestrq.features import log_mel_batch, num_valid_frames
from bestrq.finetune import (
    FINETUNE,
    IGNORE,
    FinetuneConfig,
    FinetuneModel,
    LabelledClips,
    pad_batch,
    select_labelled,
    token_targets,
    tokenizer_for,
)
from bestrq.synth import EspeakSynthesizer
from bestrq.train import TrainConfig, train
from bestrq.whisper_model import TINY_TEST_DIMS, random_whisper

# Fast, varied espeak voices that tiny.en gets partly wrong: room for fine-tuning to help.
LINES = [("the gardener quietly painted forty two wooden boxes near the harbour.", "en-029+m7",
          200, 60),
         ("yes, the tired captain visited the old castle on monday.", "en-gb-scotland+f4", 195, 70),
         ("where did the clever nurse find the broken lamp?", "en-us-nyc+m5", 190, 35),
         ("lucy carried eighty seven blankets across the bridge at dawn.", "en+f1", 200, 65)]


class Clips(Dataset):
    """A feature split in memory: (mel, valid frames) items, transcripts and frame counts."""

    def __init__(self, mel: torch.Tensor, num_frames: list[int], transcripts: list[str | None]):
        self.mel, self.transcripts = mel, transcripts
        self.num_frames = np.array(num_frames, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.transcripts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mel[i], torch.tensor(self.num_frames[i])


@pytest.fixture(scope="module")
def espeak_clips() -> Clips:
    synth = EspeakSynthesizer()
    audio = []
    for text, voice, rate, pitch in LINES:
        samples, sr = synth.synthesize(text, voice=voice, rate=rate, pitch=pitch)
        audio.append(torch.from_numpy(resample(samples, sr, whisper.audio.SAMPLE_RATE)))
    mel = log_mel_batch(torch.stack([whisper.pad_or_trim(a) for a in audio]), 80)
    return Clips(mel, [num_valid_frames(len(a)) for a in audio], [t for t, *_ in LINES])


def test_token_targets_english_only_and_multilingual():
    en = tokenizer_for(random_whisper(TINY_TEST_DIMS), "en")  # n_vocab 51864: English-only
    inputs, targets = token_targets(en, "hello world.", 448)
    text = en.encode(" hello world.")
    assert inputs.tolist() == [en.sot, en.no_timestamps, *text]
    assert targets.tolist() == [IGNORE, *text, en.eot]

    multi = whisper.tokenizer.get_tokenizer(multilingual=True, language="de", task="transcribe")
    inputs, targets = token_targets(multi, "hallo welt.", 448)
    text = multi.encode(" hallo welt.")
    lang = multi.to_language_token("de")
    assert inputs.tolist() == [multi.sot, lang, multi.transcribe, multi.no_timestamps, *text]
    assert targets.tolist() == [IGNORE] * 3 + [*text, multi.eot]

    # Longer than the decoder's context: cut, the end-of-text not trained.
    inputs, targets = token_targets(en, "one two three four five six seven eight nine.", 6)
    assert inputs.shape == targets.shape == (6,)
    assert targets[-1] != en.eot


def test_teacher_forced_loss_matches_a_hand_built_reference(tiny_en_path, espeak_clips):
    mel = espeak_clips.mel[:1]  # (1, 80, 3000)
    text = espeak_clips.transcripts[0]
    stock = whisper.load_model(str(tiny_en_path)).float().eval()
    tok = whisper.tokenizer.get_tokenizer(multilingual=False)
    prompt = [tok.sot, tok.no_timestamps]
    sequence = prompt + tok.encode(" " + text) + [tok.eot]
    with torch.no_grad():
        logits = stock.logits(torch.tensor([sequence[:-1]]), stock.embed_audio(mel))[0]
        logp = torch.log_softmax(logits.float(), dim=-1)  # (length, vocab)
        # Scored: the text tokens and end-of-text, each predicted from everything before it.
        picked = [-logp[i, sequence[i + 1]] for i in range(len(prompt) - 1, len(sequence) - 1)]
        reference = float(torch.stack(picked).mean())

    model = FinetuneModel(stock)
    inputs, targets = token_targets(tokenizer_for(stock, "en"), text, 448)
    with torch.no_grad():
        out = model(mel, torch.tensor([3000]), inputs[None], targets[None])
    assert out.count == len(sequence) - len(prompt)
    assert float(out.loss) == pytest.approx(reference, rel=1e-5)
    assert 0.0 < reference < 5.0  # tiny.en reads espeak: far below log(vocab) = 10.9
    assert 0.0 <= out.metrics["accuracy"] <= 1.0


def test_padding_changes_nothing(tiny_whisper):
    model = FinetuneModel(tiny_whisper)
    tok = tokenizer_for(tiny_whisper, "en")
    mel = torch.randn(2, 80, 3000) * 0.3
    items = [(mel[i], torch.tensor(3000), *token_targets(tok, text, 8))
             for i, text in enumerate(["a cat.", "the old farmer sold three red apples."])]
    assert items[0][2].shape[0] < items[1][2].shape[0]  # really padded
    with torch.no_grad():
        batch = model(*pad_batch(items))
        alone = [model(*pad_batch([item])) for item in items]
    expected = sum(float(o.loss) * o.count for o in alone) / sum(o.count for o in alone)
    assert batch.count == sum(o.count for o in alone)
    assert float(batch.loss) == pytest.approx(expected, rel=1e-5)


def test_only_ia3_vectors_train_in_encoder_and_decoder(tiny_whisper):
    model = FinetuneModel(tiny_whisper)
    names = set(model.trainable_parameters())
    assert names and all(n.endswith(".scale") for n in names)
    d, layers = TINY_TEST_DIMS.n_text_state, TINY_TEST_DIMS.n_text_layer
    assert count_ia3_parameters(model.whisper.decoder) == 8 * d * layers
    assert count_ia3_parameters(model.whisper.encoder) == 6 * TINY_TEST_DIMS.n_audio_state * 2
    assert sum(p.numel() for p in model.trainable_parameters().values()) == \
        count_ia3_parameters(model.whisper)


def test_select_labelled_limits_and_determinism():
    transcripts = ["a", None, "b", "", "c", "d", "  ", "e"]
    frames = np.array([6000, 3000, 3000, 3000, 1500, 3000, 3000, 1500])  # 100 frames a second
    every = select_labelled(transcripts, frames, 0, 0.0, seed=0)
    assert every == [0, 2, 4, 5, 7]  # transcribed clips only
    three = select_labelled(transcripts, frames, 3, 0.0, seed=0)
    assert len(three) == 3 and set(three) <= set(every)
    assert three == select_labelled(transcripts, frames, 3, 0.0, seed=0)
    draws = {tuple(select_labelled(transcripts, frames, 3, 0.0, seed=s)) for s in range(20)}
    assert len(draws) > 1  # the seed picks which clips
    # A 1-minute budget: at most 6000 frames of audio, whichever clips are drawn.
    for s in range(20):
        chosen = select_labelled(transcripts, frames, 0, 1.0, seed=s)
        assert chosen and int(frames[chosen].sum()) <= 6000


def test_config_names_the_parameter():
    with pytest.raises(ValueError, match="finetune.max_clips"):
        FinetuneConfig(max_clips=-1).validate(TrainConfig())
    with pytest.raises(ValueError, match="finetune.learning_rate"):
        FinetuneConfig(learning_rate=0.0).validate(TrainConfig())
    merged = FinetuneConfig(max_steps=7, batch_size=3).train_config(TrainConfig(seed=5))
    assert (merged.max_steps, merged.batch_size, merged.seed) == (7, 3, 5)


def test_a_few_steps_lower_loss_and_wer(tiny_en_path, espeak_clips, tmp_path: Path):
    stock = whisper.load_model(str(tiny_en_path)).float()
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False,
                                      temperature=0.0)
    normalize = EnglishTextNormalizer()

    def wer() -> float:
        hypotheses = [r.text for r in whisper.decode(stock, espeak_clips.mel, options)]
        return word_errors(espeak_clips.transcripts, hypotheses, normalize)["wer"]

    model = FinetuneModel(stock)
    data = LabelledClips(espeak_clips, [0, 1, 2, 3], tokenizer_for(stock, "en"), 448)
    assert data.truncated == 0 and data.minutes == pytest.approx(
        espeak_clips.num_frames.sum() / 6000)
    before = wer()
    logged: dict[int, dict[str, float]] = {}
    config = TrainConfig(batch_size=4, max_steps=4, learning_rate=1e-2, lr_schedule="constant",
                         warmup_steps=0, num_workers=0, checkpoint_every=2)
    result = train(model, data, config, tmp_path / "ckpt",
                   log=lambda step, m: logged.__setitem__(step, m), objective=FINETUNE)
    assert result.step == 4
    assert logged[4]["loss"] < 0.7 * logged[1]["loss"]
    assert logged[4]["accuracy"] > logged[1]["accuracy"]
    after = wer()
    assert before > 0.2 and after < 0.5 * before
    assert not math.isnan(after)


def test_stage_without_transcripts_skips_with_a_clear_message(tmp_path: Path, monkeypatch,
                                                              capsys):
    from test_features import write_segments

    from bestrq.features import FeatureConfig, compute_features
    from bestrq.params import load_params
    from stages.finetune import run_finetune
    from stages.finetune_common import run_start

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    segments = tmp_path / "segments"
    write_segments(segments, {"train": [2.0, 3.0], "test": [2.0], "dev": [2.0]})
    for split in ("train", "test", "dev"):  # unlabelled audio only, the project's main use
        manifest = segments / f"{split}.jsonl"
        rows = [{**json.loads(line), "transcript": None}
                for line in manifest.read_text().splitlines()]
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    compute_features(segments, tmp_path / "features", 80, FeatureConfig(device="cpu"))
    monkeypatch.chdir(tmp_path)  # dvclive/ is written relative to the project root
    # Both fine-tune stages: from the adapter, and from stock Whisper (stock_finetune).
    run_finetune(params, features_dir=tmp_path / "features", adapter_dir=tmp_path / "none",
                 out_dir=tmp_path / "finetune" / "adapted", checkpoint_root=tmp_path / "ckpt")
    run_start(params, "stock_finetune", "stock", tmp_path / "features",
              tmp_path / "finetune" / "stock", tmp_path / "ckpt")
    for stage, start in (("finetune", "adapted"), ("stock_finetune", "stock")):
        skipped = tmp_path / "finetune" / start / "skipped.json"
        reason = json.loads(skipped.read_text())["reason"]
        assert "no transcribed clips" in reason and "train" in reason
        metrics = json.loads((tmp_path / "dvclive" / stage / "metrics.json").read_text())
        # The reason rides in the summary, so that the report can say why its figures are
        # absent; the declared plots folder and table exist, empty, so that `dvc repro` goes on.
        assert metrics == {"labelled_clips": 0.0, "skipped": reason}
        assert list((tmp_path / "dvclive" / stage / "plots" / "metrics").iterdir()) == []
        assert json.loads((tmp_path / "dvclive" / stage / "windows.json").read_text()) == []
    err = capsys.readouterr().err
    assert "finetune: skipped: no transcribed clips" in err
    assert "stock_finetune: skipped: no transcribed clips" in err
    assert not (tmp_path / "ckpt").exists()


def test_skipped_json_is_written_as_a_new_file_never_through_a_link(tmp_path: Path,
                                                                   monkeypatch):
    # DVC's link cache: the skipped.json of an earlier run is the cache's object (a hard link).
    # Writing through it would change the cache; a new file is put in its place.
    from stages.finetune_common import skip

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "finetune" / "stock"
    out.mkdir(parents=True)
    cached = tmp_path / "cache-object"
    cached.write_text('{"reason": "an earlier run"}\n')
    (out / "skipped.json").hardlink_to(cached)
    skip("stock_finetune", "nothing to train on", {"labelled_clips": 0.0}, out)
    assert json.loads((out / "skipped.json").read_text()) == {"reason": "nothing to train on"}
    assert cached.read_text() == '{"reason": "an earlier run"}\n'
