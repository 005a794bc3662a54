"""LoRA behind the adapter interface: identity at init, kv-cache decoding, exact merge, the
adapter-only file and its exports, and the refusals (bad values, the other kind's file)."""

from dataclasses import replace

import pytest
import torch
import whisper
from safetensors.torch import load_file

from bestrq.adapter import (
    adapter_config,
    export_merged,
    load_vectors,
    merge_vectors,
    read_adapter,
    save_vectors,
)
from bestrq.adapters import (
    AdapterConfig,
    adapter_disabled,
    adapter_kind,
    add_adapter,
    count_adapter_parameters,
    identity_state_dict,
    merge_adapter,
)
from bestrq.finetune import FinetuneModel
from bestrq.params import from_dict, validate
from bestrq.whisper_model import TINY_TEST_DIMS, load_whisper, model_identity, random_whisper

LORA = AdapterConfig("lora", lora_rank=4, lora_alpha=8.0, lora_targets=("query", "value", "fc1"))


def _perturb_b(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """LoRA's B starts at zero (identity); a trained adapter has B away from it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(std * torch.randn(p.shape, generator=g))


def _inputs(model: whisper.model.Whisper) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mel = torch.randn(2, model.dims.n_mels, 2 * model.dims.n_audio_ctx, generator=g)
    tokens = torch.tensor([[50257, 50362, 440, 1049], [50257, 50362, 314, 716]])
    return mel, tokens  # (2, n_mels, frames), (2, 4)


@pytest.fixture
def tiny_en(tiny_en_path):
    return tiny_en_path


def test_lora_starts_as_stock_tiny_en_and_trains_only_its_matrices(tiny_en):
    model = load_whisper(str(tiny_en)).eval()
    mel, tokens = _inputs(model)
    with torch.no_grad():
        stock = model(mel, tokens)  # (2, 4, vocab)
    config = AdapterConfig("lora")  # the PEFT Whisper recipe: r=32, alpha=64 on query, value
    add_adapter(model.encoder, config)
    add_adapter(model.decoder, config)
    with torch.no_grad():
        adapted = model(mel, tokens)
    assert (adapted - stock).abs().max().item() <= 1e-6
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # r (in + out) per adapted Linear: encoder 4 blocks x (query, value); decoder 4 x 4
    # (self- and cross-attention query and value); d = 384.
    assert count_adapter_parameters(model.encoder) == 4 * 2 * 32 * (384 + 384)
    assert count_adapter_parameters(model.decoder) == 4 * 4 * 32 * (384 + 384)


def test_lora_init_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    draws = []
    for seed in (3, 3, 4):
        model = random_whisper(TINY_TEST_DIMS)
        torch.manual_seed(123)
        add_adapter(model.encoder, LORA, seed=seed)
        assert torch.equal(torch.rand(1), expected_next)  # the global stream is untouched
        draws.append(model.encoder.blocks[0].attn.query.lora_A["default"].weight.detach())
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def test_lora_kv_cache_decoding_equals_uncached_and_merge_is_exact(tiny_en):
    model = load_whisper(str(tiny_en)).eval()
    add_adapter(model.encoder, LORA, seed=0)
    add_adapter(model.decoder, LORA, seed=0)
    _perturb_b(model)
    mel, tokens = _inputs(model)
    with torch.no_grad():
        adapted = model(mel, tokens)  # (2, 4, vocab)
        # Whisper's kv-cache hooks sit on attn.key/value; with LoRA on value they cache the
        # adapted projections: the last position's logits, cached, equal the uncached ones.
        audio = model.encoder(mel)
        cache, hooks = model.install_kv_cache_hooks()
        model.decoder(tokens[:, :-1], audio, kv_cache=cache)
        last = model.decoder(tokens[:, -1:], audio, kv_cache=cache)  # (2, 1, vocab)
        for hook in hooks:
            hook.remove()
        with adapter_disabled(model):
            stock = model(mel, tokens)
    assert (last[:, 0] - adapted[:, -1]).abs().max().item() < 1e-4
    assert (adapted - stock).abs().max().item() > 1e-2  # the perturbed adapter does something
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    merge_adapter(model)
    assert adapter_kind(model) is None
    assert type(model.encoder.blocks[0].attn.query) is whisper.model.Linear
    with torch.no_grad():
        merged = model(mel, tokens)
    assert (merged - adapted).abs().max().item() < 1e-4


def test_lora_file_round_trips_merges_and_exports(tiny_en, tmp_path):
    model = load_whisper(str(tiny_en)).eval()
    FinetuneModel(model, LORA, seed=0)
    _perturb_b(model)
    mel, tokens = _inputs(model)
    with torch.no_grad():
        adapted = model(mel, tokens)
    path = tmp_path / "lora.safetensors"
    info = save_vectors(path, model, model_identity(str(tiny_en), model), {"step": 1}, LORA)
    tensors, read_info = read_adapter(path)
    assert adapter_config(read_info) == LORA
    assert {k.split(".", 2)[1] for k in tensors} == {"encoder", "decoder"}
    assert all(k.startswith("lora.") for k in tensors)
    # rank 4 on query, value and fc1: the file is a few hundred KB beside tiny.en's 151 MB.
    numbers = sum(v.numel() for v in load_file(str(path)).values())
    assert numbers == count_adapter_parameters(model)
    assert path.stat().st_size < 4 * numbers + 64 * 1024
    assert info["adapter"] == LORA.to_dict()
    merged = merge_vectors(load_whisper(str(tiny_en)).eval(), tensors, LORA)
    with torch.no_grad():
        assert (merged(mel, tokens) - adapted).abs().max().item() < 1e-4
    out = export_merged(path, None, tmp_path / "merged.pt")
    exported = whisper.load_model(str(out), device="cpu").eval()
    with torch.no_grad():
        assert (exported(mel, tokens) - adapted).abs().max().item() < 1e-4


def test_lora_exports_to_hf_and_ct2(tiny_en, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("ctranslate2")
    model = load_whisper(str(tiny_en)).eval()
    FinetuneModel(model, LORA, seed=0)
    _perturb_b(model)
    path = tmp_path / "lora.safetensors"
    save_vectors(path, model, model_identity(str(tiny_en), model), None, LORA)
    hf = export_merged(path, None, tmp_path / "hf", "hf")
    ct2 = export_merged(path, None, tmp_path / "ct2", "ct2", "float32")
    assert (hf / "config.json").is_file() and (ct2 / "model.bin").is_file()
    from transformers import WhisperForConditionalGeneration
    mel, tokens = _inputs(model)
    hf_model = WhisperForConditionalGeneration.from_pretrained(hf).eval()
    with torch.no_grad():
        ours = model(mel, tokens)
        theirs = hf_model(input_features=mel, decoder_input_ids=tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-3


def test_a_file_of_one_kind_is_refused_where_the_other_is_expected(tmp_path):
    model = random_whisper(TINY_TEST_DIMS)
    FinetuneModel(model)  # IA^3
    path = tmp_path / "ia3.safetensors"
    save_vectors(path, model, model_identity("random", model))
    tensors, _ = read_adapter(path)
    with pytest.raises(ValueError, match="holds a ia3 adapter .* where a lora adapter"):
        load_vectors(random_whisper(TINY_TEST_DIMS), tensors, LORA)
    with pytest.raises(ValueError, match="already holds a ia3 adapter; a lora adapter"):
        add_adapter(model.encoder, LORA)
    with pytest.raises(ValueError, match="holds a ia3 adapter, not the lora adapter"):
        save_vectors(tmp_path / "x.safetensors", model, model_identity("random", model), None,
                     LORA)


def test_a_lora_adapter_without_decoder_tensors_leaves_the_decoder_stock():
    model = random_whisper(TINY_TEST_DIMS).eval()
    add_adapter(model.encoder, LORA)
    _perturb_b(model.encoder)
    tensors = {f"lora.encoder.{k}": v.detach().clone()
               for k, v in identity_state_dict(model.encoder).items()}
    other = random_whisper(TINY_TEST_DIMS).eval()
    add_adapter(other.decoder, LORA, seed=5)
    _perturb_b(other.decoder)  # a decoder adapter that the file must reset
    load_vectors(other, tensors, LORA)
    mel, tokens = _inputs(other)
    with torch.no_grad():
        loaded = other(mel, tokens)
        with adapter_disabled(other):
            stock = other(mel, tokens)
    assert (loaded - stock).abs().max().item() < 1e-6  # identity tensors: the stock model


@pytest.mark.parametrize(("key", "value", "message"), [
    ("lora_rank", 0, "lora_rank: must be an integer in \\[1, 4096\\]"),
    ("lora_targets", ["query", "keys"], "lora_targets: must be a non-empty list of distinct "
                                        "names among query, key, value, out, fc1, fc2"),
    ("lora_targets", [], "lora_targets: must be a non-empty list"),
    ("adapter", "prefix", "adapter: must be one of ia3, lora"),
    ("lora_alpha", 0.0, "lora_alpha: must be a number in \\(0"),
])
def test_bad_lora_values_are_refused_naming_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        from_dict({key: value})


def test_a_target_named_twice_is_refused_before_any_work():
    with pytest.raises(ValueError, match="lora_targets: names a target twice"):
        validate(from_dict({"adapter": "lora", "lora_targets": ["query", "query"]}), "pretrain")


def test_bestrq_with_lora_trains_its_matrices_and_distils_against_the_stock_encoder(tiny_whisper):
    from bestrq.masking import MaskingConfig
    from bestrq.model import BestRQModel
    from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer

    quantizer = RandomProjectionQuantizer(QuantizerConfig(codebook_size=64))
    model = BestRQModel(tiny_whisper.encoder, quantizer, MaskingConfig(mask_prob=0.05),
                        distill_weight=1.0, adapter=LORA)
    names = set(model.trainable_parameters())
    assert names == {n for n in names if ".lora_" in n} | {"heads.weight", "heads.bias"}
    state = model.adapter_state_dict()
    # query, value, fc1 in each of the 2 test blocks, A and B each.
    assert sum(k.startswith("lora.encoder.") for k in state) == 3 * 2 * 2
    g = torch.Generator().manual_seed(0)
    mel, valid = torch.randn(2, 80, 3000, generator=g) * 0.5, torch.tensor([3000, 1800])
    out = model(mel, valid, generator=torch.Generator().manual_seed(1))
    assert out.metrics["distill_loss"] == 0.0  # B = 0: the adapted encoder is the stock one
    out.loss.backward()
    b = model.encoder.blocks[0].attn.query.lora_B["default"].weight
    a = model.encoder.blocks[0].attn.query.lora_A["default"].weight
    assert b.grad is not None and b.grad.abs().sum() > 0  # BEST-RQ's gradient reaches B
    assert a.grad is not None and a.grad.abs().sum() == 0  # and A only once B is not zero
    _perturb_b(model.encoder)
    distill, _ = model.distillation(mel, valid)
    assert float(distill.detach()) > 0  # the stock target is computed with LoRA switched off
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)


def test_save_vectors_refuses_a_lora_shape_the_description_would_misstate(tiny_whisper, tmp_path):
    from bestrq.adapter import read_adapter, save_vectors

    made = AdapterConfig("lora", lora_rank=4, lora_alpha=8.0, lora_targets=("query", "fc1"))
    add_adapter(tiny_whisper.encoder, made)
    with pytest.raises(ValueError, match=r"rank \[4\], not the lora_rank 32"):
        save_vectors(tmp_path / "a.safetensors", tiny_whisper, {}, adapter=replace(
            made, lora_rank=32))
    with pytest.raises(ValueError, match=r"adapts blocks\.0\.attn\.query.*\['value', 'fc1'\]"):
        save_vectors(tmp_path / "a.safetensors", tiny_whisper, {}, adapter=replace(
            made, lora_targets=("value", "fc1")))
    assert not (tmp_path / "a.safetensors").exists()
    save_vectors(tmp_path / "a.safetensors", tiny_whisper, {}, adapter=made)
    assert read_adapter(tmp_path / "a.safetensors")[1]["adapter"]["lora_rank"] == 4
