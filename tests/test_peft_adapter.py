"""`bestrq-export --format peft`: adapters as PEFT folders, loaded by `PeftModel.from_pretrained`
onto the stock Hugging Face export (`--no-adapter`), checked on the real tiny.en against the
merged Hugging Face export, for IA^3 and LoRA adapters on encoder and decoder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import whisper
from typer.testing import CliRunner

from bestrq.adapter import export_merged, save_vectors
from bestrq.adapters import IA3, AdapterConfig, adapter_state_dict, add_adapter
from bestrq.peft_adapter import PEFT_CONFIG, PEFT_WEIGHTS, export_peft, peft_tensors
from bestrq.whisper_model import load_whisper, model_identity
from stages.export import app

TINY_EN = Path(os.environ.get("BESTRQ_TINY_EN", Path(__file__).resolve().parents[2] / "shared"
                              / "models" / "tiny.en.pt"))
LORA = AdapterConfig("lora", lora_rank=8, lora_alpha=16.0, lora_targets=("query", "value", "fc1"))


def test_peft_names_and_shapes_of_ia3_and_lora_tensors():
    d = 8
    ia3 = {"ia3.encoder.blocks.0.attn.key": torch.full((d,), 2.0),
           "ia3.encoder.blocks.1.mlp.1": torch.arange(4.0 * d),
           "ia3.decoder.blocks.0.cross_attn.value": torch.ones(d),
           "heads.weight": torch.zeros(3)}  # a BEST-RQ part: not an adapter tensor
    state, modules, ff = peft_tensors(ia3, IA3)
    pre = "base_model.model.model."
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        pre + "encoder.layers.0.self_attn.k_proj.ia3_l": (d, 1),  # scales the output
        pre + "encoder.layers.1.fc2.ia3_l": (1, 4 * d),  # scales fc2's input (the GELU output)
        pre + "decoder.layers.0.encoder_attn.v_proj.ia3_l": (d, 1)}
    assert torch.equal(state[pre + "encoder.layers.1.fc2.ia3_l"][0], torch.arange(4.0 * d))
    assert ff == ["model.encoder.layers.1.fc2"]
    assert modules == ["model.decoder.layers.0.encoder_attn.v_proj",
                       "model.encoder.layers.0.self_attn.k_proj", "model.encoder.layers.1.fc2"]
    lora = {"lora.encoder.blocks.0.attn.query.lora_A": torch.zeros(4, d),
            "lora.encoder.blocks.0.attn.query.lora_B": torch.zeros(d, 4),
            "lora.encoder.blocks.0.mlp.0.lora_A": torch.zeros(4, d)}
    state, modules, ff = peft_tensors(lora, LORA)
    assert sorted(state) == [pre + "encoder.layers.0.fc1.lora_A.weight",
                             pre + "encoder.layers.0.self_attn.q_proj.lora_A.weight",
                             pre + "encoder.layers.0.self_attn.q_proj.lora_B.weight"]
    assert (modules, ff) == (["model.encoder.layers.0.fc1",
                              "model.encoder.layers.0.self_attn.q_proj"], [])
    with pytest.raises(KeyError, match="no lora tensors"):
        peft_tensors(ia3, LORA)


def _adapter_file(folder: Path, adapter: AdapterConfig, encoder_only: bool = False) -> Path:
    """A fine-tuned-style adapter on tiny.en (encoder and decoder, or the encoder alone as
    BEST-RQ writes), every tensor drawn away from the identity, seeded."""
    model = load_whisper(str(TINY_EN))
    g = torch.Generator().manual_seed(1)
    parts = (model.encoder,) if encoder_only else (model.encoder, model.decoder)
    with torch.no_grad():
        for module in parts:
            add_adapter(module, adapter, seed=0)
            for v in adapter_state_dict(module).values():
                noise = torch.randn(v.shape, generator=g)
                v.copy_(1.0 + 0.1 * noise if adapter.kind == "ia3" else 0.05 * noise)
    path = folder / f"{adapter.kind}.safetensors"
    save_vectors(path, model, model_identity(str(TINY_EN), model), adapter=adapter)
    return path


@pytest.mark.parametrize("adapter", [IA3, LORA], ids=["ia3", "lora"])
def test_peft_model_on_the_stock_hf_export_equals_the_merged_hf_export(tmp_path, adapter):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    if not TINY_EN.is_file():
        pytest.skip(f"real tiny.en checkpoint not found at {TINY_EN} (set BESTRQ_TINY_EN)")
    path = _adapter_file(tmp_path, adapter)
    merged = export_merged(path, str(TINY_EN), tmp_path / "merged", "hf")
    runner = CliRunner()
    done = runner.invoke(app, [str(tmp_path / "base"), "--format", "hf", "--no-adapter",
                               "--base", str(TINY_EN)])
    assert done.exit_code == 0, done.output
    done = runner.invoke(app, [str(tmp_path / "peft"), "--format", "peft", "--adapter",
                               str(path), "--base", str(TINY_EN)])
    assert done.exit_code == 0, done.output
    assert {PEFT_CONFIG, PEFT_WEIGHTS} <= {p.name for p in (tmp_path / "peft").iterdir()}
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    assert config["peft_type"] == {"ia3": "IA3", "lora": "LORA"}[adapter.kind]

    load = transformers.WhisperForConditionalGeneration.from_pretrained
    want_model = load(str(merged)).eval()
    stock = load(str(tmp_path / "base")).eval()
    tuned = peft.PeftModel.from_pretrained(load(str(tmp_path / "base")),
                                           str(tmp_path / "peft")).eval()
    mel = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(2))  # (1, 80, 3000)
    tokenizer = whisper.tokenizer.get_tokenizer(False)
    tokens = torch.tensor([list(tokenizer.sot_sequence_including_notimestamps)
                           + tokenizer.encode(" The quick brown fox.")])  # (1, tokens)
    with torch.no_grad():
        want = want_model(input_features=mel, decoder_input_ids=tokens).logits
        got = tuned(input_features=mel, decoder_input_ids=tokens).logits
        base = stock(input_features=mel, decoder_input_ids=tokens).logits
    difference = (got - want).abs().max().item()
    print(f"max |logit difference| PEFT ({adapter.kind}) vs merged HF: {difference:.3g}")
    assert difference <= 1e-4
    assert (base - want).abs().max().item() > 0.5  # the adapter changes the model
    # The stock export is the base itself: its logits equal openai-whisper's stock tiny.en.
    with torch.no_grad():
        ours = load_whisper(str(TINY_EN)).eval()(mel, tokens)
    assert (base - ours).abs().max().item() <= 1e-4


def test_encoder_only_adapter_adapts_no_decoder_module(tmp_path):
    if not TINY_EN.is_file():
        pytest.skip(f"real tiny.en checkpoint not found at {TINY_EN} (set BESTRQ_TINY_EN)")
    path = _adapter_file(tmp_path, IA3, encoder_only=True)
    out = export_peft(path, tmp_path / "peft")
    config = json.loads((out / PEFT_CONFIG).read_text())
    modules = config["target_modules"]
    assert len(modules) == 4 * 3 and all(m.startswith("model.encoder.") for m in modules)
    assert sorted(config["feedforward_modules"]) == [f"model.encoder.layers.{i}.fc2"
                                                     for i in range(4)]
    assert config["base_model_name_or_path"] is None  # a checkpoint file, not a HF name


def test_export_refuses_bad_combinations_before_any_work(tmp_path):
    runner = CliRunner()
    done = runner.invoke(app, [str(tmp_path / "o"), "--format", "peft", "--no-adapter",
                               "--base", "tiny.en"])
    assert done.exit_code == 1 and "a peft export is the adapter" in done.output
    done = runner.invoke(app, [str(tmp_path / "o"), "--format", "hf", "--no-adapter"])
    assert done.exit_code == 1 and "--no-adapter needs --base" in done.output
    assert not (tmp_path / "o").exists()
