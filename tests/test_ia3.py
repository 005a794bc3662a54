from dataclasses import asdict

import pytest
import torch
import torchaudio
import whisper
from whisper.model import ModelDimensions, Whisper

from bestrq.adapters.ia3 import (
    IA3Scale,
    add_ia3,
    count_ia3_parameters,
    ia3_disabled,
    ia3_state_dict,
    load_ia3_state_dict,
    merge_ia3,
)
from bestrq.synth import EspeakSynthesizer
from bestrq.whisper_model import (
    TINY_TEST_DIMS,
    load_whisper,
    random_whisper,
    save_whisper_checkpoint,
)

# TINY_TEST_DIMS has one decoder layer; two show that every layer gets its vectors.
TWO_DECODER_LAYERS = ModelDimensions(**{**asdict(TINY_TEST_DIMS), "n_text_layer": 2})


def _perturb(module: torch.nn.Module, seed: int = 0, spread: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in ia3_state_dict(module).values():
            v.copy_(1.0 + spread * torch.randn(v.shape, generator=g))


def _speech_mel(text: str) -> torch.Tensor:
    """Whisper's log-mel input (1, 80, 3000) for an espeak clip of `text`."""
    audio, rate = EspeakSynthesizer().synthesize(text)  # (samples,) at espeak's own rate
    audio16k = torchaudio.functional.resample(torch.from_numpy(audio), rate,
                                              whisper.audio.SAMPLE_RATE)  # (samples',)
    return whisper.log_mel_spectrogram(whisper.pad_or_trim(audio16k))[None]  # (1, 80, 3000)


def _prompt(model: Whisper, text: str) -> torch.Tensor:
    """Decoder input (1, tokens): the start-of-transcript sequence, then `text`."""
    tokenizer = whisper.tokenizer.get_tokenizer(model.is_multilingual,
                                                num_languages=model.num_languages)
    tokens = list(tokenizer.sot_sequence_including_notimestamps) + tokenizer.encode(text)
    return torch.tensor([tokens])  # (1, tokens)


def test_parameter_count_is_6_d_layers(tiny_whisper):
    names = add_ia3(tiny_whisper.encoder)
    d, layers = 64, 2
    assert count_ia3_parameters(tiny_whisper.encoder) == 6 * d * layers
    assert len(names) == 3 * layers
    assert sorted(n.split(".", 2)[2] for n in names if n.startswith("blocks.0.")) == [
        "attn.key", "attn.value", "mlp.1"]
    assert all(torch.equal(v, torch.ones_like(v)) for v in ia3_state_dict(tiny_whisper.encoder)
               .values())


def test_only_ia3_is_trainable_and_no_biases(tiny_whisper):
    add_ia3(tiny_whisper.encoder)
    trainable = [n for n, p in tiny_whisper.encoder.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".scale") for n in trainable)
    assert not any("bias" in n for n in trainable)


def test_identity_at_init_random_model(tiny_whisper):
    mel = torch.randn(2, 80, 3000)
    with torch.no_grad():
        stock = tiny_whisper.encoder(mel)
        add_ia3(tiny_whisper.encoder)
        adapted = tiny_whisper.encoder(mel)
    assert (adapted - stock).abs().max().item() <= 1e-6


def test_identity_at_init_real_tiny_en(tiny_en_path):
    model = load_whisper(str(tiny_en_path))
    audio = torch.randn(16000 * 5) * 0.05
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio))[None]
    with torch.no_grad():
        stock = model.encoder(mel)
        add_ia3(model.encoder)
        adapted = model.encoder(mel)
    assert count_ia3_parameters(model.encoder) == 9216  # 6 * 384 * 4
    assert (adapted - stock).abs().max().item() <= 1e-6


def test_sdpa_path_still_used(tiny_whisper, monkeypatch):
    add_ia3(tiny_whisper.encoder)
    calls = []
    real = whisper.model.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(whisper.model, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        tiny_whisper.encoder(torch.randn(1, 80, 3000))
    assert len(calls) == 2  # one per encoder layer


def test_base_bitwise_unchanged_after_optimiser_step(tiny_whisper):
    enc = tiny_whisper.encoder
    add_ia3(enc)
    frozen = {n: p.clone() for n, p in enc.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=0.1,
                            weight_decay=0.1)
    for _ in range(2):
        enc(torch.randn(1, 80, 3000)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    after = dict(enc.named_parameters())
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)
    assert any(not torch.equal(v, torch.ones_like(v)) for v in ia3_state_dict(enc).values())


def test_state_dict_round_trip_and_mismatch(tiny_whisper):
    add_ia3(tiny_whisper.encoder)
    _perturb(tiny_whisper.encoder)
    saved = {k: v.detach().clone() for k, v in ia3_state_dict(tiny_whisper.encoder).items()}
    other = random_whisper(tiny_whisper.dims, seed=1)
    add_ia3(other.encoder)
    load_ia3_state_dict(other.encoder, saved)
    assert all(torch.equal(saved[k], v) for k, v in ia3_state_dict(other.encoder).items())
    try:
        load_ia3_state_dict(other.encoder, {"blocks.0.attn.key": saved["blocks.0.attn.key"]})
    except KeyError as err:
        assert "missing" in str(err)
    else:
        raise AssertionError("a partial state dict must be refused")


def test_merge_equals_adapted_and_loads_as_stock_checkpoint(tiny_whisper, tmp_path):
    add_ia3(tiny_whisper.encoder)
    _perturb(tiny_whisper.encoder)
    mel = torch.randn(2, 80, 3000)
    with torch.no_grad():
        adapted = tiny_whisper.encoder(mel)
        merge_ia3(tiny_whisper)
        assert not any(isinstance(m, IA3Scale) for m in tiny_whisper.modules())
        merged = tiny_whisper.encoder(mel)
    assert (merged - adapted).abs().max().item() < 1e-4 * adapted.abs().max().item()
    path = tmp_path / "merged.pt"
    save_whisper_checkpoint(tiny_whisper, path, half=False)
    reloaded = whisper.load_model(str(path), device="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded.encoder(mel), merged)


def test_decoder_blocks_get_self_and_cross_attention_vectors(tiny_whisper):
    names = add_ia3(tiny_whisper.decoder)
    assert {"blocks.0.attn.key", "blocks.0.cross_attn.value", "blocks.0.mlp.1"} <= set(names)
    assert count_ia3_parameters(tiny_whisper.decoder) == (2 + 2 + 4) * 64


# The published audio-encoder shapes (n_mels, d_model, heads, layers) of every openai-whisper
# size; large-v3 and turbo take 128 mel bins.
WHISPER_ENCODERS = {
    "tiny": (80, 384, 6, 4), "base": (80, 512, 8, 6), "small": (80, 768, 12, 12),
    "medium": (80, 1024, 16, 24), "large-v2": (80, 1280, 20, 32),
    "large-v3": (128, 1280, 20, 32), "turbo": (128, 1280, 20, 32),
}


@pytest.mark.parametrize("name", list(WHISPER_ENCODERS))
def test_every_whisper_size_gets_6_d_layers_vectors_and_keeps_its_shapes(name):
    from whisper.model import AudioEncoder

    n_mels, d, heads, layers = WHISPER_ENCODERS[name]
    with torch.device("meta"):  # shapes only: large-v3's encoder would take 2.5 GB
        encoder = AudioEncoder(n_mels, 1500, d, heads, layers)
        add_ia3(encoder)
        out = encoder(torch.empty(2, n_mels, 3000))
    assert count_ia3_parameters(encoder) == 6 * d * layers  # 9,216 for tiny
    assert out.shape == (2, 1500, d)
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    assert trainable == 6 * d * layers


def test_decoder_gets_8_d_vectors_per_layer_at_one_and_only_they_train():
    model = random_whisper(TWO_DECODER_LAYERS)
    names = add_ia3(model.decoder)
    d, layers = 64, 2
    assert count_ia3_parameters(model.decoder) == 8 * d * layers
    assert len(names) == 5 * layers
    vectors = ia3_state_dict(model.decoder)
    assert {n.split(".", 2)[2]: v.numel() for n, v in vectors.items()
            if n.startswith("blocks.1.")} == {
        "attn.key": d, "attn.value": d, "cross_attn.key": d, "cross_attn.value": d,
        "mlp.1": 4 * d}
    assert all(torch.equal(v, torch.ones_like(v)) for v in vectors.values())
    trainable = {n for n, p in model.decoder.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.scale" for n in names}
    # The encoder is a separate module: adapting the decoder leaves it stock.
    assert count_ia3_parameters(model.encoder) == 0


def test_real_tiny_en_with_ia3_in_encoder_and_decoder_is_the_stock_model_at_init(tiny_en_path):
    model = load_whisper(str(tiny_en_path))
    mel = _speech_mel("the quick brown fox jumps over the lazy dog")  # (1, 80, 3000)
    tokens = _prompt(model, " The quick brown fox jumps over the lazy dog.")  # (1, tokens)
    with torch.no_grad():
        stock = model(mel, tokens)  # (1, tokens, vocab)
        add_ia3(model.encoder)
        add_ia3(model.decoder)
        adapted = model(mel, tokens)
    dims = model.dims
    assert count_ia3_parameters(model.decoder) == 8 * dims.n_text_state * dims.n_text_layer
    assert count_ia3_parameters(model.decoder) == 12_288  # 8 * 384 * 4
    assert count_ia3_parameters(model.encoder) == 9_216
    assert stock.shape == (1, tokens.shape[1], dims.n_vocab)
    assert (adapted - stock).abs().max().item() <= 1e-6


def _assert_merge_folds_encoder_and_decoder(model: Whisper, mel: torch.Tensor,
                                            tokens: torch.Tensor) -> None:
    stock_names = set(model.state_dict())
    with torch.no_grad():
        stock = model(mel, tokens)  # (batch, tokens, vocab)
        add_ia3(model.encoder)
        add_ia3(model.decoder)
        _perturb(model.encoder, seed=1, spread=0.1)
        _perturb(model.decoder, seed=2, spread=0.1)
        adapted = model(mel, tokens)
        merge_ia3(model)
        merged = model(mel, tokens)
    assert not any(isinstance(m, IA3Scale) for m in model.modules())
    assert set(model.state_dict()) == stock_names  # loads as a stock checkpoint
    scale = adapted.abs().max().item()
    assert (merged - adapted).abs().max().item() <= 1e-4 * scale
    assert (adapted - stock).abs().max().item() > 1e-2 * scale  # the vectors do something


def test_merge_folds_decoder_vectors_random_model():
    model = random_whisper(TWO_DECODER_LAYERS)
    tokens = torch.randint(0, model.dims.n_vocab, (2, 6))  # (batch, tokens)
    _assert_merge_folds_encoder_and_decoder(model, torch.randn(2, 80, 3000), tokens)


def test_merge_folds_decoder_vectors_real_tiny_en(tiny_en_path):
    model = load_whisper(str(tiny_en_path))
    _assert_merge_folds_encoder_and_decoder(
        model, _speech_mel("she sells sea shells by the sea shore"),
        _prompt(model, " She sells sea shells by the sea shore."))


def test_kv_cache_decoding_with_decoder_vectors_equals_a_full_forward():
    # whisper.decode caches keys and values through hooks on `attn.key` / `attn.value`: those are
    # the IA^3 wrappers, so the cache must hold rescaled projections, not stock ones.
    model = random_whisper(TWO_DECODER_LAYERS)
    add_ia3(model.decoder)
    _perturb(model.decoder, seed=3)
    tokens = torch.randint(0, model.dims.n_vocab, (1, 6))  # (batch, tokens)
    with torch.no_grad():
        audio = model.encoder(torch.randn(1, 80, 3000))  # (1, 1500, d)
        full = model.decoder(tokens, audio)  # (1, 6, vocab)
        cache, hooks = model.install_kv_cache_hooks()
        steps = [model.decoder(tokens[:, :3], audio, kv_cache=cache)]
        steps += [model.decoder(tokens[:, i:i + 1], audio, kv_cache=cache) for i in range(3, 6)]
        for hook in hooks:
            hook.remove()
    assert len(cache) == 4 * 2 and all(isinstance(m, IA3Scale) for m in cache)
    cached = torch.cat(steps, dim=1)  # (1, 6, vocab)
    assert (cached - full).abs().max().item() <= 1e-4 * full.abs().max().item()


def test_adding_ia3_again_keeps_the_vectors_and_their_training():
    model = random_whisper(TWO_DECODER_LAYERS)
    first = add_ia3(model.decoder)
    _perturb(model.decoder)
    before = {k: v.detach().clone() for k, v in ia3_state_dict(model.decoder).items()}
    assert add_ia3(model.decoder) == first
    after = ia3_state_dict(model.decoder)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(v.requires_grad for v in after.values())
    trainable = sum(p.numel() for p in model.decoder.parameters() if p.requires_grad)
    assert trainable == 8 * 64 * 2


def test_vectors_are_made_on_the_device_of_the_weights_they_scale():
    from whisper.model import AudioEncoder

    with torch.device("meta"):
        encoder = AudioEncoder(80, 1500, 64, 2, 2)
    add_ia3(encoder)  # outside the device context: the vectors follow the weights
    assert {v.device.type for v in ia3_state_dict(encoder).values()} == {"meta"}


def test_ia3_disabled_computes_the_stock_model_and_restores(tiny_whisper):
    mel = torch.randn(1, 80, 3000) * 0.3
    with torch.no_grad():
        stock = tiny_whisper.encoder(mel)
        add_ia3(tiny_whisper.encoder)
        for v in ia3_state_dict(tiny_whisper.encoder).values():
            v.mul_(1.5)
        adapted = tiny_whisper.encoder(mel)
        with ia3_disabled(tiny_whisper.encoder):
            inside = tiny_whisper.encoder(mel)
        after = tiny_whisper.encoder(mel)
    assert torch.equal(inside, stock)
    assert torch.equal(after, adapted)
    assert not torch.allclose(adapted, stock, atol=1e-3)
