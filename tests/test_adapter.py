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
    full, vectors = tmp_path / "adapter.safetensors", tmp_path / "ia3.safetensors"
    save_adapter(full, model, identity)
    info = save_adapter(vectors, model, identity, parts=("ia3",))
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
    with pytest.raises(ValueError, match="must include 'ia3'"):
        save_adapter(tmp_path / "x.safetensors", model, identity, parts=("heads",))


def test_export_command_writes_a_checkpoint_whisper_loads(trained, tmp_path):
    from typer.testing import CliRunner

    from stages.export import app

    base_path, base, model = trained
    path = tmp_path / "ia3.safetensors"
    save_adapter(path, model, model_identity(str(base_path), base), parts=("ia3",))
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
