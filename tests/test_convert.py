"""Export to Hugging Face and CTranslate2, and Hugging Face folders or hub names as bases.

The exports are checked on the real tiny.en with a non-trivial adapter merged (IA^3 vectors on
encoder and decoder drawn around one), against openai-whisper running the same merged model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio
import whisper
from typer.testing import CliRunner

from bestrq import convert, hf_folder
from bestrq.adapter import merge_vectors, read_adapter, save_vectors
from bestrq.adapters.ia3 import add_ia3, ia3_state_dict
from bestrq.synth import EspeakSynthesizer
from bestrq.whisper_model import (
    TINY_TEST_DIMS,
    ModelUnavailableError,
    checkpoint_path,
    expected_n_mels,
    load_whisper,
    model_identity,
    random_whisper,
    save_whisper_checkpoint,
    validate_model_spec,
)
from stages.export import app

# As conftest's tiny_en_path, for the module-scoped fixtures (a fixture cannot use a narrower one).
TINY_EN = Path(os.environ.get("BESTRQ_TINY_EN", Path(__file__).resolve().parents[2] / "shared"
                              / "models" / "tiny.en.pt"))
CLIPS = ("the quick brown fox jumps over the lazy dog", "she sells sea shells by the sea shore",
         "please call stella and ask her to bring these things")
SAMPLE_TEXTS = ("the quick brown fox", " Hello, world! It's 3.14 -- ok?", "  two  spaces\nand\ttab",
                "Ünïcödé café 東京 Привет 😀", "don't won't I'll we've", "1234567890")
SPECIAL_TOKENS = ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>",
                  "<|endoftext|>", "<|translate|>", "<|startofprev|>", "<|0.00|>", "<|30.00|>")


@pytest.fixture(scope="module")
def adapted(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny.en path, fine-tuned-style adapter on it): IA^3 vectors on encoder and decoder at
    1 + 0.1 * N(0, 1), seeded."""
    if not TINY_EN.is_file():
        pytest.skip(f"real tiny.en checkpoint not found at {TINY_EN} (set BESTRQ_TINY_EN)")
    spec = str(TINY_EN)
    model = load_whisper(spec)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in (model.encoder, model.decoder):
            add_ia3(module)
            for v in ia3_state_dict(module).values():
                v.copy_(1.0 + 0.1 * torch.randn(v.shape, generator=g))
    path = tmp_path_factory.mktemp("adapter") / "finetuned.safetensors"
    save_vectors(path, model, model_identity(spec, model))
    return TINY_EN, path


@pytest.fixture(scope="module")
def merged(adapted) -> whisper.model.Whisper:
    """The adapted tiny.en with its vectors merged, as openai-whisper computes it."""
    base, path = adapted
    return merge_vectors(load_whisper(str(base)), read_adapter(path)[0]).eval()


def _audio(text: str) -> torch.Tensor:
    """An espeak clip of `text` at 16 kHz, (samples,)."""
    audio, rate = EspeakSynthesizer().synthesize(text)  # (samples,) at espeak's rate
    return torchaudio.functional.resample(torch.from_numpy(audio), rate,
                                          whisper.audio.SAMPLE_RATE).float()


def _words(text: str) -> str:
    return " ".join(text.split())


def test_hf_export_logits_and_greedy_text_equal_openai_whispers(adapted, merged, tmp_path):
    transformers = pytest.importorskip("transformers")
    from bestrq.adapter import export_merged

    base, path = adapted
    out = export_merged(path, str(base), tmp_path / "hf", "hf")
    hf = transformers.WhisperForConditionalGeneration.from_pretrained(str(out)).eval()
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(_audio(CLIPS[0])))[None]  # (1, 80, 3000)
    tokenizer = whisper.tokenizer.get_tokenizer(False)
    prompt = list(tokenizer.sot_sequence_including_notimestamps) + tokenizer.encode(
        " The quick brown fox jumps over the lazy dog.")
    tokens = torch.tensor([prompt])  # (1, tokens)
    with torch.no_grad():
        want = merged(mel, tokens)  # (1, tokens, vocab)
        got = hf(input_features=mel, decoder_input_ids=tokens).logits
        stock = load_whisper(str(base))(mel, tokens)
    difference = (got - want).abs().max().item()
    print(f"max |logit difference| HF vs openai-whisper (merged): {difference:.3g}")
    assert difference <= 1e-4
    assert (stock - want).abs().max().item() > 1.0  # the adapter changes the model

    # generate() with the exported generation config decodes as whisper's greedy decoding.
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False,
                                      temperature=0)
    with torch.no_grad():
        expected = whisper.decode(merged, mel, options)[0]
        generated = hf.generate(input_features=mel)[0].tolist()
    generated = [t for t in generated if t < tokenizer.eot]  # v5 returns the new tokens only
    assert generated == expected.tokens


def test_ct2_export_transcribes_like_openai_whisper(adapted, merged, tmp_path):
    pytest.importorskip("ctranslate2")
    faster_whisper = pytest.importorskip("faster_whisper")
    from bestrq.adapter import export_merged

    base, path = adapted
    out = export_merged(path, str(base), tmp_path / "ct2", "ct2", "float32")
    assert {"model.bin", "tokenizer.json", "preprocessor_config.json"} <= {
        p.name for p in out.iterdir()}
    model = faster_whisper.WhisperModel(str(out), device="cpu", compute_type="float32",
                                        cpu_threads=2)
    for text in CLIPS:
        audio = _audio(text)
        # whisper.transcribe pads the log-mel as faster-whisper does (whisper.decode on
        # pad_or_trim(audio) pads the audio instead, which can change a word of tiny.en).
        want = whisper.transcribe(merged, audio.numpy(), temperature=0.0, fp16=False,
                                  without_timestamps=True, condition_on_previous_text=False,
                                  language="en")["text"]
        segments, _ = model.transcribe(audio.numpy().astype(np.float32), beam_size=1,
                                       temperature=0.0, without_timestamps=True,
                                       vad_filter=False, condition_on_previous_text=False)
        got = " ".join(s.text for s in segments)
        print(f"openai-whisper: {_words(want)!r}  faster-whisper: {_words(got)!r}")
        assert _words(got) == _words(want)
        assert len(want.split()) >= 4  # real transcripts, not empty output


def test_tiny_en_through_a_hf_folder_is_the_same_model(tmp_path):
    pytest.importorskip("transformers")
    if not TINY_EN.is_file():
        pytest.skip(f"real tiny.en checkpoint not found at {TINY_EN}")
    original = load_whisper(str(TINY_EN))
    folder = convert.save_hf_folder(original, tmp_path / "tiny.en-hf")
    validate_model_spec(str(folder))
    assert expected_n_mels(str(folder)) == 80 and checkpoint_path(str(folder)) == folder
    loaded = load_whisper(str(folder))
    a, b = original.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded.alignment_heads.to_dense(), original.alignment_heads.to_dense())
    mel = torch.randn(1, 80, 3000)
    with torch.no_grad():
        assert (loaded.encoder(mel) - original.encoder(mel)).abs().max().item() <= 1e-5
    identity = model_identity(str(folder), loaded)
    assert identity["sha256"] == hf_folder.hf_folder_digest(folder) and identity["model"] == str(
        folder)
    assert identity["sha256"] != model_identity(str(TINY_EN), original)["sha256"]


def test_export_command_writes_a_folder_transformers_loads_offline(adapted, tmp_path,
                                                                   monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, path = adapted
    out = tmp_path / "tiny.en-adapted"
    result = CliRunner().invoke(app, [str(out), "--adapter", str(path), "--format", "hf"])
    assert result.exit_code == 0, result.output
    assert "export: wrote" in result.output and "hf" in result.output
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    model = transformers.WhisperForConditionalGeneration.from_pretrained(str(out))
    processor = transformers.WhisperProcessor.from_pretrained(str(out))
    assert model.config.vocab_size == 51864 and processor.feature_extractor.feature_size == 80
    assert not model.generation_config.is_multilingual
    assert model.generation_config.no_timestamps_token_id == 50362
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    _assert_same_ids(tokenizer, whisper.tokenizer.get_tokenizer(False))

    # A second export replaces the first; a folder of something else is never replaced.
    again = CliRunner().invoke(app, [str(out), "--adapter", str(path), "--format", "hf"])
    assert again.exit_code == 0, again.output
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    refused = CliRunner().invoke(app, [str(other), "--adapter", str(path), "--format", "hf"])
    assert refused.exit_code == 1 and "mine exists" in refused.output
    assert (other / "notes.txt").read_text() == "keep"
    bad = CliRunner().invoke(app, [str(tmp_path / "x"), "--adapter", str(path), "--format",
                                   "hf", "--quantization", "int8"])
    assert bad.exit_code == 1 and "ct2 format only" in bad.output


def _assert_same_ids(hf_tokenizer, tokenizer: whisper.tokenizer.Tokenizer) -> None:
    for text in SAMPLE_TEXTS:
        assert hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text), text
    for token in SPECIAL_TOKENS:
        assert hf_tokenizer.convert_tokens_to_ids(token) == \
            tokenizer.encoding.encode_single_token(token), token
    # Timestamps begin after the last special token, as transformers' tokenizer assumes.
    assert hf_tokenizer.all_special_ids[-1] + 1 == tokenizer.timestamp_begin
    ids = list(tokenizer.sot_sequence_including_notimestamps) + tokenizer.encode(" hi") + [
        tokenizer.eot]
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == " hi"


def test_multilingual_export_tokenizer_and_generate_follow_whisper(tmp_path):
    transformers = pytest.importorskip("transformers")
    dims = replace(TINY_TEST_DIMS, n_vocab=51865, n_text_ctx=16)  # multilingual, 99 languages
    model = random_whisper(dims, seed=1).eval()
    folder = convert.save_hf_folder(model, tmp_path / "multi")
    tokenizer = whisper.tokenizer.get_tokenizer(True, num_languages=model.num_languages)
    _assert_same_ids(transformers.AutoTokenizer.from_pretrained(str(folder)), tokenizer)
    hf = transformers.WhisperForConditionalGeneration.from_pretrained(str(folder)).eval()
    mel = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(2))
    # A random model's tokens, so equal tokens mean equal prompts and suppressed tokens.
    for language in ("fr", None):  # None: both detect the language, then transcribe
        options = whisper.DecodingOptions(language=language, without_timestamps=True,
                                          sample_len=3, fp16=False)
        with torch.no_grad():
            want = whisper.decode(model, mel, options)[0].tokens
            kwargs = {"language": language} if language else {}
            got = hf.generate(input_features=mel, max_new_tokens=3, **kwargs)[0].tolist()
        assert got == want


def test_missing_export_extra_is_named_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # `import ctranslate2` fails
    out = tmp_path / "ct2"
    # The adapter does not exist: the extra is checked before it is read.
    result = CliRunner().invoke(app, [str(out), "--adapter", str(tmp_path / "none.safetensors"),
                                      "--format", "ct2"])
    assert result.exit_code == 1
    assert "ctranslate2" in result.output
    assert "pip install 'whisper-bestrq[export]'" in result.output
    assert not out.exists()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(convert.MissingExtraError, match=re.escape("whisper-bestrq[export]")):
        convert.require_export_extra("hf")
    convert.require_export_extra("openai")  # needs nothing beyond the core


def test_quantization_is_ctranslate2s_and_checked():
    convert.check_quantization("ct2", "int8")
    convert.check_quantization("hf", None)
    with pytest.raises(ValueError, match="must be one of float32, float16"):
        convert.check_quantization("ct2", "int4")
    with pytest.raises(ValueError, match="ct2 format only"):
        convert.check_quantization("openai", "float16")
    with pytest.raises(ValueError, match="format must be one of openai, hf, ct2"):
        convert.require_export_extra("onnx")


def _hf_folder(tmp_path: Path) -> Path:
    """A small random Whisper written as a Hugging Face folder."""
    pytest.importorskip("transformers")
    return convert.save_hf_folder(random_whisper(TINY_TEST_DIMS, seed=4), tmp_path / "small-hf")


def test_unreadable_hf_folders_are_refused_naming_them(tmp_path):
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty-folder has no config.json"):
        validate_model_spec(str(empty))
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*garbled/config.json"):
        load_whisper(str(garbled))
    (garbled / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="garbled/config.json describes a 'bert' model"):
        validate_model_spec(str(garbled))
    (garbled / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(ValueError, match="garbled has no weights"):
        validate_model_spec(str(garbled))
    assert expected_n_mels(str(garbled)) is None

    folder = _hf_folder(tmp_path)
    (folder / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="cannot read the weights in .*small-hf"):
        load_whisper(str(folder))


def test_hf_folder_with_missing_tensors_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _hf_folder(tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.decoder.layer_norm.weight"]
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="small-hf: .*lack 1 tensors.*decoder.layer_norm"):
        load_whisper(str(folder))


def test_hub_name_loads_from_the_cache_and_fails_fast_without_network(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    folder = _hf_folder(tmp_path)
    model = random_whisper(TINY_TEST_DIMS, seed=4)
    calls = []

    def cached(repo_id, *, local_files_only=False, **kwargs):
        calls.append((repo_id, local_files_only))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached)
    validate_model_spec("openai/whisper-tiny.en")
    assert expected_n_mels("openai/whisper-tiny.en") == 80
    loaded = load_whisper("openai/whisper-tiny.en")
    a, b = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert calls and all(local for _, local in calls)  # cached: no network asked
    assert model_identity("openai/whisper-tiny.en", loaded)["sha256"] == \
        hf_folder.hf_folder_digest(folder)

    def offline(repo_id, *, local_files_only=False, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert checkpoint_path("openai/whisper-tiny.en") is None
    assert expected_n_mels("openai/whisper-tiny.en") is None
    with pytest.raises(ModelUnavailableError, match="'openai/whisper-tiny.en' is not cached.*"
                                                    "local Hugging Face folder"):
        load_whisper("openai/whisper-tiny.en")
    # A path to a missing checkpoint is not taken for a hub name.
    with pytest.raises(ValueError, match="neither a Whisper model name"):
        validate_model_spec("data/missing.pt")


def test_weight_names_round_trip_and_tie():
    model = random_whisper(TINY_TEST_DIMS)
    state = model.state_dict()
    hf = convert.openai_to_hf_state_dict(state)
    assert "model.encoder.layers.1.self_attn.k_proj.weight" in hf
    assert "model.encoder.layers.1.self_attn.k_proj.bias" not in hf  # neither side has one
    assert "model.decoder.layers.0.encoder_attn.v_proj.bias" in hf
    assert "proj_out.weight" not in hf  # tied to the token embedding
    back = convert.hf_to_openai_state_dict(
        {**hf, "proj_out.weight": hf["model.decoder.embed_tokens.weight"]}, model.dims)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    untied = {**hf, "proj_out.weight": torch.zeros_like(hf["model.decoder.embed_tokens.weight"])}
    with pytest.raises(ValueError, match="not tied"):
        convert.hf_to_openai_state_dict(untied, model.dims)


def test_an_adapter_remembers_a_hf_folder_base(tmp_path):
    folder = _hf_folder(tmp_path)
    base = load_whisper(str(folder))
    add_ia3(base.encoder)
    path = tmp_path / "adapter-only.safetensors"
    info = save_vectors(path, base, model_identity(str(folder), base))
    assert info["base"]["model"] == str(folder) and len(info["base"]["sha256"]) == 64
    from bestrq.adapter import export_merged

    out = export_merged(path, None, tmp_path / "merged.pt")  # the base the adapter records
    assert whisper.load_model(str(out), device="cpu").dims == base.dims
    other = tmp_path / "other.pt"
    save_whisper_checkpoint(random_whisper(TINY_TEST_DIMS, seed=4), other, half=False)
    with pytest.raises(ValueError, match="was trained on .*small-hf"):
        export_merged(path, str(other), tmp_path / "m.pt")  # same weights, other file


# --- a Hugging Face base folder is checked within bounds, before anything is allocated -----


def _config_variant(tmp_path: Path, name: str, **changes: object) -> Path:
    """A copy of the small HF folder whose config.json has `changes` applied."""
    source = tmp_path / "small-hf"
    if not source.is_dir():
        _hf_folder(tmp_path)
    folder = tmp_path / name
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"encoder_attention_heads": 0},
     "encoder_attention_heads must be a whole number from 1 to 64, got 0"),
    ({"decoder_attention_heads": 5}, "d_model 64 is not a multiple of decoder_attention_heads 5"),
    ({"d_model": 98304}, "d_model must be a whole number from 1 to 8192, got 98304"),
    ({"d_model": 4096, "encoder_ffn_dim": 16384, "decoder_ffn_dim": 16384,
      "encoder_layers": 64, "decoder_layers": 64},
     "a Whisper of these dims has 30.3 B parameters, more than 2 B (large-v3 has 1.55 B)"),
    ({"encoder_layers": True}, "encoder_layers must be a whole number from 1 to 1048576, got True"),
    ({"vocab_size": "51864"}, "vocab_size must be a whole number from 1 to 1048576, got '51864'"),
])
def test_hf_config_values_outside_whispers_are_refused_naming_the_file(
        tmp_path: Path, changes: dict, message: str) -> None:
    folder = _config_variant(tmp_path, "variant", **changes)
    with pytest.raises(ValueError) as err:
        validate_model_spec(str(folder))
    assert str(err.value) == (f"model: {folder / 'config.json'}: not an openai-whisper "
                              f"architecture ({message})")


def test_parameter_count_is_whispers_own():
    from whisper.model import ModelDimensions

    for dims in (TINY_TEST_DIMS, ModelDimensions(80, 1500, 384, 6, 4, 51864, 448, 384, 6, 4)):
        model = random_whisper(dims)
        assert hf_folder.parameter_count(dims) == sum(p.numel() for p in model.parameters())


def test_a_config_nested_or_sized_to_exhaust_the_parser_is_one_error(tmp_path: Path) -> None:
    folder = _config_variant(tmp_path, "nested")
    depth = 50_000
    (folder / "config.json").write_text('{"a": ' * depth + "1" + "}" * depth)
    with pytest.raises(ValueError, match=f"model: cannot read {re.escape(str(folder))}/config"
                                         r"\.json: nested too deeply"):
        validate_model_spec(str(folder))
    assert expected_n_mels(str(folder)) is None
    (folder / "config.json").write_text(" " * (2 << 20) + "{}")
    with pytest.raises(ValueError, match=r"config\.json: 2097154 bytes, more than the 1048576"):
        validate_model_spec(str(folder))


@pytest.mark.parametrize("shard", ["/etc/passwd", "../model.safetensors", "sub/x.safetensors"])
def test_a_weight_index_naming_files_outside_the_folder_is_refused(tmp_path: Path,
                                                                   shard: str) -> None:
    folder = _config_variant(tmp_path, "sharded")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.encoder.conv1.weight": shard}}))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json names weight files "
                                         r"outside the folder"):
        validate_model_spec(str(folder))


def test_weights_that_do_not_fit_the_config_are_one_error_naming_the_folder(
        tmp_path: Path) -> None:
    folder = _config_variant(tmp_path, "misfit", num_mel_bins=81)  # the weights have 80
    with pytest.raises(ValueError, match=r"misfit: 1 weights do not have the shapes of "
                                         r"config\.json's dims, e.g. encoder\.conv1\.weight "
                                         r"\(64, 80, 3\) \(config\.json gives \(64, 81, 3\)\)"):
        load_whisper(str(folder))


class _Code:
    """Anything a weights-only load refuses: unpickling it would run this module's code."""


def test_a_checkpoint_that_is_not_weights_alone_fails_the_params_check(tmp_path: Path) -> None:
    model = random_whisper(TINY_TEST_DIMS)
    pickled = tmp_path / "pickled.pt"
    torch.save({"dims": TINY_TEST_DIMS.__dict__, "model_state_dict": model.state_dict(),
                "extra": _Code()}, pickled)
    with pytest.raises(ValueError, match=f"model: {re.escape(str(pickled))} is not a checkpoint "
                                         r"torch can load as weights alone \(UnpicklingError"):
        validate_model_spec(str(pickled))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pt is not a checkpoint torch can load"):
        validate_model_spec(str(garbage))
    other = tmp_path / "other.pt"
    torch.save({"state_dict": model.state_dict()}, other)
    with pytest.raises(ValueError, match=r"other\.pt is not an openai-whisper checkpoint"):
        validate_model_spec(str(other))
    good = tmp_path / "good.pt"
    save_whisper_checkpoint(model, good, half=False)
    validate_model_spec(str(good))
