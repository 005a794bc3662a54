import pytest
import torch
import whisper

from bestrq.ia3 import (
    IA3Scale,
    add_ia3,
    count_ia3_parameters,
    ia3_state_dict,
    load_ia3_state_dict,
    merge_ia3,
)
from bestrq.whisper_model import load_whisper, random_whisper, save_whisper_checkpoint


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in ia3_state_dict(module).values():
            v.copy_(1.0 + 0.5 * torch.randn(v.shape, generator=g))


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
