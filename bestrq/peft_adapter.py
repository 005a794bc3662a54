"""Adapters as Hugging Face PEFT folders: `adapter_config.json` and `adapter_model.safetensors`,
which `peft.PeftModel.from_pretrained` loads onto the Hugging Face export of the stock base
(`bestrq-export BASE --format hf --no-adapter`).

IA^3 maps to PEFT's IA3 exactly: our key and value vectors rescale k_proj's and v_proj's
outputs (bias included) as PEFT's does for a non-feed-forward module, and our FFN vector
rescales the GELU output, which is fc2's input: PEFT's IA3 with fc2 as a feed-forward module.
LoRA maps to PEFT's LoRA (the layers we train are PEFT's already): A and B under Hugging Face
module names, the same rank and alpha. The modules adapted are named one by one, from the
file's tensors, so a BEST-RQ adapter (encoder only) leaves the decoder stock there too.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from bestrq import convert
from bestrq.adapter import adapter_config, check_base, read_adapter
from bestrq.adapters import IA3, AdapterConfig
from bestrq.export_target import check_target
from bestrq.whisper_model import load_whisper, spec_kind

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what PeftModel puts before the base model's module names
FFN_ACTIVATION, FFN_OUT = "mlp.1", "mlp.2"  # openai-whisper: GELU, then fc2


def hf_module(openai_module: str) -> str:
    """The Hugging Face name of an openai-whisper Linear (e.g. encoder.blocks.0.attn.key ->
    model.encoder.layers.0.self_attn.k_proj)."""
    return convert.hf_key(openai_module + ".weight").removesuffix(".weight")


def peft_tensors(tensors: dict[str, Tensor], adapter: AdapterConfig = IA3
                 ) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """An adapter file's tensors under PEFT's names and shapes, the Hugging Face modules they
    adapt, and (IA^3) those of them that PEFT must treat as feed-forward (input scaled).
    Tensors of other parts (BEST-RQ heads, quantizer) are left out."""
    kind = adapter.kind
    out: dict[str, Tensor] = {}
    modules: set[str] = set()
    feedforward: set[str] = set()
    for key, value in tensors.items():
        if not key.startswith(kind + "."):
            continue
        name = key[len(kind) + 1:]  # e.g. encoder.blocks.0.attn.key(.lora_A)
        value = value.detach().float().contiguous()
        if kind == "ia3":
            if name.endswith("." + FFN_ACTIVATION):
                module = hf_module(name.removesuffix(FFN_ACTIVATION) + FFN_OUT)
                feedforward.add(module)
                value = value[None, :]  # (1, in_features): scales fc2's input
            else:
                module = hf_module(name)
                value = value[:, None]  # (out_features, 1): scales the output
            out[f"{PREFIX}{module}.ia3_l"] = value.contiguous()
        else:
            linear, factor = name.rsplit(".", 1)  # factor: lora_A (r, in) or lora_B (out, r)
            module = hf_module(linear)
            out[f"{PREFIX}{module}.{factor}.weight"] = value
        modules.add(module)
    if not out:
        raise KeyError(f"the adapter has no {kind} tensors: nothing to write as a PEFT adapter")
    return out, sorted(modules), sorted(feedforward)


def peft_config(adapter: AdapterConfig, modules: list[str], feedforward: list[str],
                base: str | None = None):  # -> peft.PeftConfig
    """PEFT's own config object for the adapter (saved with its `save_pretrained`)."""
    from peft import IA3Config, LoraConfig

    if adapter.kind == "ia3":
        return IA3Config(target_modules=modules, feedforward_modules=feedforward,
                         base_model_name_or_path=base)
    return LoraConfig(r=adapter.lora_rank, lora_alpha=adapter.lora_alpha, lora_dropout=0.0,
                      bias="none", target_modules=modules, base_model_name_or_path=base)


def save_peft_folder(tensors: dict[str, Tensor], adapter: AdapterConfig, out: str | Path,
                     base: str | None = None) -> Path:
    """Write the folder `out` (empty, new, or an unchanged earlier peft export) with the
    adapter's PEFT config and weights; `base` is recorded as base_model_name_or_path (a Hugging
    Face folder or hub name; None where the base is not one)."""
    state, modules, feedforward = peft_tensors(tensors, adapter)
    with convert.fresh_folder(Path(out), "peft") as tmp:
        peft_config(adapter, modules, feedforward, base).save_pretrained(str(tmp))
        save_file(state, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
    return Path(out)


def export_peft(adapter_path: str | Path, out: str | Path, base_model: str | None = None,
                protected: Iterable[str | Path] = ()) -> Path:
    """Write an adapter file (BEST-RQ, adapter-only or fine-tuned) as the PEFT folder `out`.

    base_model: checked against the base the adapter records, as `export_merged` does (None:
    the recorded one, unchecked); where it is a Hugging Face folder or hub name it becomes the
    config's base_model_name_or_path. `out` as for `export_merged` (check_target)."""
    tensors, info = read_adapter(adapter_path)
    spec = base_model or info["base"]["model"]
    check_target(out, "peft", [adapter_path, spec], protected)
    if base_model:
        check_base(load_whisper(base_model), info, adapter_path, base_model)
    hf_base = spec if spec_kind(spec) in ("folder", "hub") else None
    return save_peft_folder(tensors, adapter_config(info), out, hf_base)
