import json

import pytest
import torch
import whisper

from bestrq.adapter import build_model, export_merged, read_adapter, save_adapter
from bestrq.ia3 import ia3_state_dict
from bestrq.masking import MaskingConfig
from bestrq.model import BestRQModel
from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer
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
