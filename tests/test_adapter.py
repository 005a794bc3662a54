import json

import pytest
import torch
import torchaudio
import whisper
from whisper.model import Whisper

from bestrq.adapter import (
    build_model,
    export_merged,
    load_vectors,
    merge_vectors,
    read_adapter,
    save_adapter,
    save_vectors,
)
from bestrq.adapters.ia3 import IA3Scale, add_ia3, ia3_state_dict
from bestrq.masking import MaskingConfig
from bestrq.model import BestRQModel
from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer
from bestrq.synth import EspeakSynthesizer
from bestrq.whisper_model import (
    TINY_TEST_DIMS,
    load_whisper,
    model_identity,
    random_whisper,
    save_whisper_checkpoint,
)


@pytest.fixture
def trained(tmp_path):
    """A random base checkpoint on disk and a BEST-RQ model on it with non-trivial weights."""
    base_path = tmp_path / "base.pt"
    save_whisper_checkpoint(random_whisper(TINY_TEST_DIMS), base_path, half=False)
    base = load_whisper(str(base_path))
    stats = (torch.randn(80), torch.rand(80) + 0.5)
    q = RandomProjectionQuantizer(QuantizerConfig(num_codebooks=2, codebook_size=32, seed=5),
                                  *stats)
    model = BestRQModel(base.encoder, q, MaskingConfig(mask_prob=0.02))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return base_path, base, model


def test_round_trip_is_exact(trained, tmp_path):
    base_path, base, model = trained
    path = tmp_path / "adapters" / "a.safetensors"
    info = save_adapter(path, model, model_identity(str(base_path), base), {"step": 7})
    tensors, read_info = read_adapter(path)
    assert read_info == info and read_info["step"] == 7
    assert json.loads(path.with_suffix(".json").read_text()) == info
    assert read_info["base"]["sha256"] and read_info["quantizer"]["num_codebooks"] == 2
    own = model.adapter_state_dict()
    assert set(tensors) == set(own)
    assert all(torch.equal(tensors[k], own[k].float()) for k in own)
    rebuilt = build_model(load_whisper(str(base_path)), read_info, tensors)
    mel = torch.randn(1, 80, 3000)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with torch.no_grad():
        a = model(mel, torch.tensor([2500]), generator=g1)
        b = rebuilt(mel, torch.tensor([2500]), generator=g2)
    assert torch.equal(a.loss, b.loss)


def test_the_file_keeps_its_format_names_and_records_how_the_losses_read_the_encoder(
        trained, tmp_path):
    base_path, base, model = trained
    model = BestRQModel(base.encoder, model.quantizer,
                        MaskingConfig(mask_prob=0.02, mask_span_ms=300.0),
                        distill_weight=2.0, distill_input="masked")
    path = tmp_path / "a.safetensors"
    info = save_adapter(path, model, model_identity(str(base_path), base))
    # The format's names (first written before the knobs were renamed), whatever the fields'.
    assert info["masking"] == {"mask_prob": 0.02, "span_ms": 300.0, "noise_std": 0.1,
                               "target_share": 1.0}
    assert info["quantizer"]["norm"] == "utterance" and "quantizer_norm" not in info["quantizer"]
    assert info["adapter"] == {"kind": "ia3"}
    assert info["layers"] == {"bestrq_layer": 1, "distill_layers": [1],
                              "distill_padding": False, "distill_input": "masked"}
    rebuilt = build_model(load_whisper(str(base_path)), read_adapter(path)[1])
    assert (rebuilt.masking, rebuilt.distill_input) == (model.masking, "masked")
    assert rebuilt.quantizer.config == model.quantizer.config
    # A file made before distill_input existed distilled on the clean input.
    del info["layers"]["distill_input"]
    assert build_model(load_whisper(str(base_path)), info).distill_input == "clean"


def test_adapter_file_is_small(trained, tmp_path):
    base_path, base, model = trained
    path = tmp_path / "a.safetensors"
    save_adapter(path, model, model_identity(str(base_path), base))
    ia3 = sum(v.numel() for v in ia3_state_dict(model.encoder).values())
    heads = model.heads.weight.numel() + model.heads.bias.numel()
    quant = sum(v.numel() for v in model.quantizer.state_dict().values())
    assert path.stat().st_size < 4 * (ia3 + heads + quant) + 16_384


def test_not_an_adapter_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a BEST-RQ adapter"):
        read_adapter(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        read_adapter(tmp_path / "missing.safetensors")


def test_export_merged_checkpoint_matches_adapted_encoder(trained, tmp_path):
    base_path, base, model = trained
    path = tmp_path / "a.safetensors"
    save_adapter(path, model, model_identity(str(base_path), base))
    merged_path = export_merged(path, str(base_path), tmp_path / "merged.pt")
    merged = whisper.load_model(str(merged_path), device="cpu")
    mel = torch.randn(2, 80, 3000)
    with torch.no_grad():
        expected = model.encoder(mel)
        got = merged.encoder(mel)
    assert (got - expected).abs().max().item() < 1e-4 * expected.abs().max().item()
    assert not torch.equal(got, load_whisper(str(base_path)).encoder(mel))


def test_adapter_for_other_architecture_is_refused(trained, tmp_path):
    base_path, base, model = trained
    path = tmp_path / "a.safetensors"
    save_adapter(path, model, model_identity(str(base_path), base))
    other = tmp_path / "other.pt"
    dims = TINY_TEST_DIMS.__class__(**{**TINY_TEST_DIMS.__dict__, "n_audio_layer": 3})
    save_whisper_checkpoint(random_whisper(dims), other)
    with pytest.raises(ValueError, match="dims"):
        export_merged(path, str(other), tmp_path / "m.pt")


def test_adapter_for_other_weights_of_the_same_architecture_is_refused(trained, tmp_path):
    # tiny and tiny.en share dimensions: only the checkpoint's checksum tells them apart.
    base_path, base, model = trained
    path = tmp_path / "a.safetensors"
    save_adapter(path, model, model_identity(str(base_path), base))
    other = tmp_path / "same-dims-other-weights.pt"
    save_whisper_checkpoint(random_whisper(TINY_TEST_DIMS, seed=1), other, half=False)
    with pytest.raises(ValueError, match="was trained on .*base.pt.* not on .*same-dims"):
        export_merged(path, str(other), tmp_path / "m.pt")


def test_vectors_only_file_is_tiny_and_merges_like_the_full_adapter(trained, tmp_path):
    base_path, base, model = trained
    identity = model_identity(str(base_path), base)
    full, vectors = tmp_path / "adapter.safetensors", tmp_path / "adapter-only.safetensors"
    save_adapter(full, model, identity)
    info = save_adapter(vectors, model, identity, parts=("adapter",))
    tensors, read_info = read_adapter(vectors)
    assert info["parts"] == read_info["parts"] == ["ia3"]
    ia3 = ia3_state_dict(model.encoder)
    assert set(tensors) == {f"ia3.encoder.{k}" for k in ia3}
    ia3_bytes = 4 * sum(v.numel() for v in ia3.values())
    assert vectors.stat().st_size < ia3_bytes + 16_384 < full.stat().st_size

    # Merging needs only the vectors; the base is the one the adapter records.
    merged_full = export_merged(full, str(base_path), tmp_path / "full.pt")
    merged_vectors = export_merged(vectors, None, tmp_path / "vectors.pt")
    a = torch.load(merged_full, weights_only=True)["model_state_dict"]
    b = torch.load(merged_vectors, weights_only=True)["model_state_dict"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    # BEST-RQ evaluation needs the heads: a clear error, not a KeyError deep in load_state_dict.
    with pytest.raises(ValueError, match="no heads or quantizer tensors"):
        build_model(load_whisper(str(base_path)), read_info, tensors)
    with pytest.raises(ValueError, match="must include .adapter."):
        save_adapter(tmp_path / "x.safetensors", model, identity, parts=("heads",))


def test_export_command_writes_a_checkpoint_whisper_loads(trained, tmp_path):
    from typer.testing import CliRunner

    from stages.export import app

    base_path, base, model = trained
    path = tmp_path / "adapter-only.safetensors"
    save_adapter(path, model, model_identity(str(base_path), base), parts=("adapter",))
    out = tmp_path / "merged.pt"
    result = CliRunner().invoke(app, [str(out), "--adapter", str(path)])
    assert result.exit_code == 0, result.output
    assert "export: wrote" in result.output
    mel = torch.randn(1, 80, 3000)
    with torch.no_grad():
        expected = model.encoder(mel)
        got = whisper.load_model(str(out), device="cpu").encoder(mel)
    assert (got - expected).abs().max().item() < 1e-4 * expected.abs().max().item()
    missing = CliRunner().invoke(app, [str(out), "--adapter", str(tmp_path / "nope.safetensors")])
    assert missing.exit_code == 1 and "nope.safetensors" in missing.output


def _finetune_style(model: Whisper, seed: int = 0, spread: float = 0.3) -> Whisper:
    """`model` with IA^3 in encoder and decoder, set to non-trivial values, as after fine-tuning."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (model.encoder, model.decoder):
            add_ia3(module)
            for v in ia3_state_dict(module).values():
                v.copy_(1.0 + spread * torch.randn(v.shape, generator=g))
    return model


@pytest.fixture
def finetuned(tmp_path):
    """A random base checkpoint on disk and a Whisper on it with encoder and decoder vectors."""
    base_path = tmp_path / "base.pt"
    save_whisper_checkpoint(random_whisper(TINY_TEST_DIMS), base_path, half=False)
    return base_path, _finetune_style(load_whisper(str(base_path)))


def _all_vectors(model: Whisper) -> dict[str, torch.Tensor]:
    return {f"ia3.{part}.{k}": v for part in ("encoder", "decoder")
            for k, v in ia3_state_dict(getattr(model, part)).items()}


def test_save_vectors_round_trip_holds_encoder_and_decoder_vectors(finetuned, tmp_path):
    base_path, model = finetuned
    path = tmp_path / "adapters" / "finetuned.safetensors"
    identity = model_identity(str(base_path), model)
    info = save_vectors(path, model, identity, {"step": 3})
    tensors, read_info = read_adapter(path)
    assert read_info == info == {"format": "bestrq-ia3-adapter/1", "parts": ["ia3"],
                                 "base": identity, "adapter": {"kind": "ia3"}, "step": 3}
    assert json.loads(path.with_suffix(".json").read_text()) == info
    assert not path.with_suffix(".safetensors.tmp").exists()
    own = _all_vectors(model)
    assert set(tensors) == set(own)
    assert sum(k.startswith("ia3.decoder.") for k in tensors) == 5  # one decoder layer
    assert sum(v.numel() for v in tensors.values()) == 6 * 64 * 2 + 8 * 64 * 1
    assert all(tensors[k].dtype == torch.float32 and torch.equal(tensors[k], own[k].detach())
               for k in own)

    # Loading the file into a fresh base rebuilds the same model, bit for bit.
    rebuilt = load_vectors(load_whisper(str(base_path)), tensors)
    assert all(torch.equal(v, own[k]) for k, v in _all_vectors(rebuilt).items())
    assert all(v.requires_grad for v in _all_vectors(rebuilt).values())  # trainable further
    mel, tokens = torch.randn(1, 80, 3000), torch.randint(0, 51864, (1, 5))
    with torch.no_grad():
        assert torch.equal(rebuilt(mel, tokens), model(mel, tokens))


def test_save_vectors_writes_the_modules_that_have_vectors(finetuned, tmp_path):
    base_path, _ = finetuned
    model = load_whisper(str(base_path))
    identity = model_identity(str(base_path), model)
    with pytest.raises(ValueError, match="has no adapter in its encoder or decoder"):
        save_vectors(tmp_path / "none.safetensors", model, identity)
    assert not (tmp_path / "none.safetensors").exists()
    add_ia3(model.encoder)
    save_vectors(tmp_path / "enc.safetensors", model, identity)
    tensors, _ = read_adapter(tmp_path / "enc.safetensors")
    assert set(tensors) == {f"ia3.encoder.{k}" for k in ia3_state_dict(model.encoder)}


@pytest.mark.parametrize("parts", [("adapter",), ("adapter", "heads", "quantizer")])
def test_load_vectors_of_a_bestrq_adapter_leaves_the_decoder_at_one(trained, finetuned,
                                                                    tmp_path, parts):
    base_path, base, bestrq = trained
    path = tmp_path / "bestrq.safetensors"
    save_adapter(path, bestrq, model_identity(str(base_path), base), parts=parts)
    tensors, _ = read_adapter(path)
    assert not any(k.startswith("ia3.decoder.") for k in tensors)
    # A model whose decoder already has other vectors: the file describes a stock decoder.
    _, model = finetuned
    assert load_vectors(model, tensors) is model
    encoder = ia3_state_dict(model.encoder)
    assert all(torch.equal(v, bestrq_v) for (k, v), bestrq_v in
               zip(encoder.items(), ia3_state_dict(bestrq.encoder).values(), strict=True))
    decoder = ia3_state_dict(model.decoder)
    assert sum(v.numel() for v in decoder.values()) == 8 * 64 * 1
    assert all(torch.equal(v, torch.ones_like(v)) for v in decoder.values())

    # Merged, the decoder is the stock one, bit for bit; the encoder is not.
    stock = load_whisper(str(base_path))
    merge_vectors(model, tensors)
    assert not any(isinstance(m, IA3Scale) for m in model.modules())
    merged, original = model.state_dict(), stock.state_dict()
    assert all(torch.equal(merged[k], original[k]) for k in original if k.startswith("decoder."))
    assert not torch.equal(merged["encoder.blocks.0.attn.key.weight"],
                           original["encoder.blocks.0.attn.key.weight"])


def test_load_vectors_refuses_files_that_do_not_match(finetuned, tmp_path):
    base_path, model = finetuned
    vectors = {k: v.detach().clone() for k, v in _all_vectors(model).items()}
    decoder_only = {k: v for k, v in vectors.items() if k.startswith("ia3.decoder.")}
    with pytest.raises(KeyError, match="no ia3 encoder tensors"):
        load_vectors(load_whisper(str(base_path)), decoder_only)
    partial = {k: v for k, v in vectors.items() if k != "ia3.decoder.blocks.0.mlp.1"}
    with pytest.raises(KeyError, match="missing \\['blocks.0.mlp.1'\\]"):
        load_vectors(load_whisper(str(base_path)), partial)
    stray = {**vectors, "ia3.head.scale": torch.ones(3)}
    with pytest.raises(KeyError, match="ia3.head.scale"):
        load_vectors(load_whisper(str(base_path)), stray)


def test_export_merged_folds_decoder_vectors(finetuned, tmp_path):
    base_path, model = finetuned
    path = tmp_path / "finetuned.safetensors"
    save_vectors(path, model, model_identity(str(base_path), model))
    merged = whisper.load_model(str(export_merged(path, None, tmp_path / "m.pt")), device="cpu")
    stock = load_whisper(str(base_path))
    mel, tokens = torch.randn(2, 80, 3000), torch.randint(0, 51864, (2, 6))
    with torch.no_grad():
        expected = model(mel, tokens)  # (2, 6, vocab)
        got = merged(mel, tokens)
        # Same encoder output, so the decoder alone shows that its vectors were merged.
        audio = model.encoder(mel)  # (2, 1500, d)
        decoder_delta = (merged.decoder(tokens, audio) - stock.decoder(tokens, audio)).abs()
    assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    assert decoder_delta.max().item() > 1e-2 * expected.abs().max().item()


def test_export_help_says_decoder_vectors_are_merged():
    from typer.testing import CliRunner

    from stages.export import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "decoder" in result.output and "fine-tuned" in result.output


# Two short clips: greedy decoding of tiny.en on a CPU costs seconds per clip.
CLIPS = ("the quick brown fox jumps over the lazy dog", "she sells sea shells by the sea shore")


def _speech_mels(texts: tuple[str, ...]) -> torch.Tensor:
    """Whisper's log-mel inputs (clips, 80, 3000) of espeak clips of `texts`."""
    synth, mels = EspeakSynthesizer(), []
    for text in texts:
        audio, rate = synth.synthesize(text)  # (samples,) at espeak's own rate
        audio16k = torchaudio.functional.resample(torch.from_numpy(audio), rate,
                                                  whisper.audio.SAMPLE_RATE)  # (samples',)
        mels.append(whisper.log_mel_spectrogram(whisper.pad_or_trim(audio16k)))  # (80, 3000)
    return torch.stack(mels)


def test_export_of_a_finetuned_adapter_on_real_tiny_en_transcribes_like_the_adapter(
        tiny_en_path, tmp_path):
    spec = str(tiny_en_path)
    adapted = _finetune_style(load_whisper(spec), seed=0, spread=0.05)
    path = tmp_path / "finetuned.safetensors"
    save_vectors(path, adapted, model_identity(spec, adapted), {"stage": "finetune"})
    out = export_merged(path, spec, tmp_path / "tiny.en-finetuned.pt")
    merged = whisper.load_model(str(out), device="cpu")
    assert not any(isinstance(m, IA3Scale) for m in merged.modules())

    mels = _speech_mels(CLIPS)  # (2, 80, 3000)
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False,
                                      temperature=0)
    with torch.no_grad():
        want = [r.text for r in whisper.decode(adapted, mels, options)]
        got = [r.text for r in whisper.decode(merged, mels, options)]
    assert got == want
    assert all(len(text.split()) >= 4 for text in want)  # real transcripts, not empty output

    tokenizer = whisper.tokenizer.get_tokenizer(False)
    prompt = list(tokenizer.sot_sequence_including_notimestamps) + tokenizer.encode(" " + want[0])
    tokens = torch.tensor([prompt] * len(CLIPS))  # (2, tokens)
    with torch.no_grad():
        expected = adapted(mels, tokens)  # (2, tokens, vocab)
        logits = merged(mels, tokens)
    assert (logits - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    stock = load_whisper(spec).state_dict()
    assert not torch.equal(merged.state_dict()["decoder.blocks.3.cross_attn.value.weight"],
                           stock["decoder.blocks.3.cross_attn.value.weight"])
