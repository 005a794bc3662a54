"""Adapter files: the encoder's adapter (IA^3 vectors or LoRA matrices), BEST-RQ heads and
quantizer state in one safetensors file.

The file's metadata holds a JSON description (configs, base model identity, training summary),
also written beside it as `<name>.json` for people and for DVC. From an adapter and its base
checkpoint, `build_model` rebuilds the exact BEST-RQ model and `export_merged` writes a stock
openai-whisper checkpoint with the adapter folded into the weights (or, through
`bestrq.convert`, a Hugging Face or CTranslate2 folder).

Adapter tensors are named `<kind>.<module>.<name>` (`ia3.encoder.blocks.0.attn.key`,
`lora.decoder.blocks.0.attn.query.lora_A`) and the description's `adapter` entry says which kind
and, for LoRA, its rank, alpha and targets (absent in files made before LoRA: IA^3).

The heads (d_model x num_codebooks x codebook_size) dwarf the adapter (IA^3: 6 x d_model x
layers): 12.6 MB against 36 KB for tiny at 8192 codes. They are needed to continue or evaluate
BEST-RQ training, not to use the adapted encoder, so `parts=("adapter",)` writes an
adapter-only file in the same format, which `export_merged` accepts as well.

Fine-tuned adapters are adapter-only files written by `save_vectors` from a whole Whisper: they
hold `<kind>.encoder.*` and also `<kind>.decoder.*` (IA^3: 8 x d_model per decoder layer).
`load_vectors`, `merge_vectors` and `export_merged` take either; a file without decoder tensors
leaves the decoder as it is in stock Whisper.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor
from whisper.model import Whisper

from bestrq import convert
from bestrq.adapters import (
    IA3,
    KINDS,
    AdapterConfig,
    adapter_kind,
    adapter_state_dict,
    add_adapter,
    identity_state_dict,
    load_adapter_state_dict,
    merge_adapter,
)
from bestrq.adapters.lora import target_pattern
from bestrq.atomic import atomic_path, atomic_write_text
from bestrq.export_target import check_target, record_file
from bestrq.masking import MaskingConfig
from bestrq.model import BestRQModel
from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer
from bestrq.whisper_model import load_whisper, model_identity, save_whisper_checkpoint

FORMAT = "bestrq-ia3-adapter/1"
PARTS = ("adapter", "heads", "quantizer")  # "adapter": its tensors are named by its kind
# The Whisper modules whose adapter a file may hold, as `<kind>.<module>.<tensor name>`.
ADAPTED_MODULES = ("encoder", "decoder")


def adapter_config(info: dict[str, Any]) -> AdapterConfig:
    """The adapter an adapter file's description records (IA^3 for files made before LoRA)."""
    return AdapterConfig.from_dict(info.get("adapter"))


def _kinds(tensors: dict[str, Tensor]) -> set[str]:
    return {k.split(".", 1)[0] for k in tensors} & set(KINDS)


def _check_kind(tensors: dict[str, Tensor], expected: AdapterConfig) -> None:
    """A file of one adapter kind given where the other is expected: refused, naming both."""
    other = sorted(_kinds(tensors) - {expected.kind})
    if other:
        raise ValueError(f"the adapter file holds a {other[0]} adapter ({other[0]}.* tensors) "
                         f"where a {expected.kind} adapter is expected")


def _check_lora_shape(tensors: dict[str, Tensor], adapter: AdapterConfig) -> None:
    """LoRA tensors whose rank or adapted modules differ from `adapter`'s, which the file's
    description would misstate: refused, naming both."""
    ranks = sorted({int(v.shape[0]) for k, v in tensors.items() if k.endswith(".lora_A")})
    if ranks != [adapter.lora_rank]:
        raise ValueError(f"the model's LoRA has rank {ranks}, not the lora_rank "
                         f"{adapter.lora_rank} to be saved")
    pattern = re.compile(target_pattern(adapter.lora_targets))
    modules = {k.split(".", 2)[2].rsplit(".", 1)[0] for k in tensors}  # e.g. blocks.0.attn.query
    stray = sorted(m for m in modules if not pattern.fullmatch(m))
    if stray:
        raise ValueError(f"the model's LoRA adapts {stray[0]}, which lora_targets "
                         f"{list(adapter.lora_targets)} does not name")


def _write(path: Path, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
    """Write the safetensors file atomically (a crash never leaves a truncated adapter where DVC
    or a later stage would take it for a good one) and its JSON description beside it."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"bestrq": json.dumps(info)})
    atomic_write_text(path.with_suffix(".json"), json.dumps(info, indent=2) + "\n")


def save_adapter(path: str | Path, model: BestRQModel, base: dict[str, Any],
                 extra: dict[str, Any] | None = None,
                 parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    """Write `model`'s adapter to `path` (.safetensors) and its description to `path.json`.

    base: the base model's identity (`whisper_model.model_identity`); extra: anything worth
    keeping with the file (training parameters, step, metrics); parts: which of PARTS to store.
    """
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or "adapter" not in parts:
        raise ValueError(f"adapter parts must include 'adapter' and be among {PARTS}, got "
                         f"{parts}")
    kind = model.adapter.kind
    stored = [kind if p == "adapter" else p for p in PARTS if p in parts]
    info = {"format": FORMAT, "parts": stored, "base": base,
            "adapter": model.adapter.to_dict(), "quantizer": model.quantizer.config.to_dict(),
            "masking": model.masking.to_dict(), "layers": model.layers(), **(extra or {})}
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in
               model.adapter_state_dict().items() if k.split(".", 1)[0] in stored}
    _write(Path(path), tensors, info)
    return info


def save_vectors(path: str | Path, model: Whisper, base: dict[str, Any],
                 extra: dict[str, Any] | None = None, adapter: AdapterConfig = IA3
                 ) -> dict[str, Any]:
    """Write the `adapter` of a whole Whisper (`<kind>.encoder.*`, `<kind>.decoder.*`, for each
    of the two that has it) to `path` as an adapter-only file, and its description to
    `path.json`. base and extra as for `save_adapter`. Returns the description."""
    held = {adapter_kind(getattr(model, part)) for part in ADAPTED_MODULES} - {None}
    if held - {adapter.kind}:
        raise ValueError(f"the model holds a {sorted(held)[0]} adapter, not the {adapter.kind} "
                         "adapter to be saved")
    tensors = {f"{adapter.kind}.{part}.{k}": v.detach().float().cpu().contiguous()
               for part in ADAPTED_MODULES
               for k, v in adapter_state_dict(getattr(model, part)).items()}
    if not tensors:
        raise ValueError("the model has no adapter in its encoder or decoder: nothing to "
                         "save (add_adapter first)")
    if adapter.kind == "lora":
        _check_lora_shape(tensors, adapter)
    info = {"format": FORMAT, "parts": [adapter.kind], "base": base,
            "adapter": adapter.to_dict(), **(extra or {})}
    _write(Path(path), tensors, info)
    return info


def read_adapter(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, description) of an adapter file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "bestrq" not in meta:
            raise ValueError(f"{path} is not a BEST-RQ adapter (no 'bestrq' metadata)")
        info = json.loads(meta["bestrq"])
        if not isinstance(info, dict):
            raise ValueError(f"{path}: its 'bestrq' metadata is not a description")
        if info.get("format") != FORMAT:
            raise ValueError(f"{path}: unsupported adapter format {info.get('format')!r}")
        tensors = load_file(str(path))
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        # safetensors' own errors name no file: a text file, a truncated or damaged one.
        raise ValueError(f"adapter file {path} is not a readable safetensors adapter: "
                         f"{err}") from err
    return tensors, info


def _section(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_into(model: BestRQModel, tensors: dict[str, Tensor]) -> None:
    """Copy an adapter's tensors into a model built with the same configuration."""
    kind = model.adapter.kind
    _check_kind(tensors, model.adapter)
    missing = [p for p in (kind, *PARTS[1:]) if not any(k.startswith(f"{p}.") for k in tensors)]
    if missing:
        raise ValueError(f"the adapter has no {' or '.join(missing)} tensors: an adapter-only "
                         "file can be merged into Whisper (export_merged), but BEST-RQ "
                         "evaluation or training needs the full adapter")
    load_adapter_state_dict(model.encoder, _section(tensors, f"{kind}.encoder."))
    model.heads.load_state_dict(_section(tensors, "heads."))
    model.quantizer.load_state_dict(_section(tensors, "quantizer."))


def build_model(whisper_model: Whisper, info: dict[str, Any],
                tensors: dict[str, Tensor] | None = None) -> BestRQModel:
    """The BEST-RQ model an adapter describes, on `whisper_model`'s encoder."""
    quantizer = RandomProjectionQuantizer(QuantizerConfig.from_dict(info["quantizer"]))
    # Adapters made before the layers were a choice read the encoder's output.
    model = BestRQModel(whisper_model.encoder, quantizer, MaskingConfig.from_dict(info["masking"]),
                        adapter=adapter_config(info), **info.get("layers", {}))
    if tensors is not None:
        load_into(model, tensors)
    return model


def check_base(whisper_model: Whisper, info: dict[str, Any], path: str | Path,
               spec: str | None = None) -> None:
    """Refuse an adapter made for another base model: other dimensions, or (when `spec`, the
    name or path `whisper_model` was loaded from, is given and both checkpoints are files) other
    weights. tiny and tiny.en share dimensions, so only the checksum tells them apart."""
    dims = asdict(whisper_model.dims)
    expected = info["base"]["dims"]
    if dims != expected:
        raise ValueError(f"adapter {path} was trained on a Whisper with dims {expected}, "
                         f"not {dims}")
    trained_on = info["base"].get("sha256")
    if spec is None or trained_on is None:
        return
    digest = model_identity(spec, whisper_model)["sha256"]
    if digest is not None and digest != trained_on:
        raise ValueError(f"adapter {path} was trained on {info['base']['model']!r} "
                         f"(sha256 {trained_on[:12]}...), not on {spec!r} "
                         f"(sha256 {digest[:12]}...)")


def load_vectors(model: Whisper, tensors: dict[str, Tensor], adapter: AdapterConfig = IA3,
                 seed: int = 0) -> Whisper:
    """Put an adapter file's tensors (of kind `adapter`, as its description records) into
    `model`, in place, and return it.

    The adapter is added to both the encoder and the decoder (LoRA's A drawn from `seed`), so
    the result can be trained further. The file must hold encoder tensors; its decoder tensors,
    where it has any (fine-tuned adapters; BEST-RQ ones have none), are loaded too, else the
    decoder's adapter is set to compute the stock decoder (IA^3 at one, LoRA's B at zero).
    Within each module the names must match the model's exactly. Other parts (heads,
    quantizer) are ignored. A file of the other kind is refused, naming both.
    """
    _check_kind(tensors, adapter)
    kind = adapter.kind
    sections = {part: _section(tensors, f"{kind}.{part}.") for part in ADAPTED_MODULES}
    if not sections["encoder"]:
        raise KeyError(f"the adapter has no {kind} encoder tensors ({kind}.encoder.*): not an "
                       "adapter for this model, or a damaged file")
    stray = sorted(k for k in tensors if k.startswith(f"{kind}.")
                   and not any(k.startswith(f"{kind}.{part}.") for part in ADAPTED_MODULES))
    if stray:
        raise KeyError(f"the adapter has {kind} tensors for no known module: {stray[:4]}")
    for part in ADAPTED_MODULES:
        module = getattr(model, part)
        add_adapter(module, adapter, seed)
        # An adapter without decoder tensors describes the stock decoder, even where this
        # model's decoder already had another adapter.
        load_adapter_state_dict(module, sections[part] or identity_state_dict(module))
    return model


def merge_vectors(model: Whisper, tensors: dict[str, Tensor],
                  adapter: AdapterConfig = IA3) -> Whisper:
    """Fold an adapter file's tensors (encoder, and decoder where the file has them) into
    `model`'s weights, in place: the result is a plain Whisper (no extra modules) that computes
    what the adapted one does."""
    merge_adapter(load_vectors(model, tensors, adapter))
    return model


def export_merged(adapter_path: str | Path | None, base_model: str | None,
                  out_path: str | Path, fmt: str = "openai", quantization: str | None = None,
                  protected: Iterable[str | Path] = ()) -> Path:
    """Write the base Whisper with the adapter folded in (the encoder's, and the
    decoder's where the file has them: fine-tuned adapters) to `out_path`.

    adapter_path: None writes the stock base alone (e.g. the Hugging Face model a PEFT
    adapter is loaded onto). base_model: a Whisper name, checkpoint path or Hugging Face folder
    or hub name; None takes the one the adapter records. fmt: "openai" (a checkpoint file for
    `whisper.load_model`), "hf" (a Hugging Face folder) or "ct2" (a CTranslate2 folder for
    faster-whisper, weights in `quantization`); the last two need the `export` extra, checked
    before any work.

    `out_path` must not exist, be empty, or be an unchanged earlier export; never inside a
    `protected` folder (the pipeline's data/) nor over the adapter or base model
    (`export_target.check_target`, before any work: ExportTargetError otherwise).
    """
    convert.require_export_extra(fmt)
    convert.check_quantization(fmt, quantization)
    if adapter_path is None:
        if not base_model:
            raise ValueError("export without an adapter needs the base model (--base)")
        check_target(out_path, fmt, [base_model], protected)
        model = load_whisper(base_model)
    else:
        tensors, info = read_adapter(adapter_path)
        spec = base_model or info["base"]["model"]
        # Both the base given and the one the adapter records: a path among them is an input.
        check_target(out_path, fmt, [adapter_path, spec, info["base"].get("model", "")],
                     protected)
        model = load_whisper(spec)
        check_base(model, info, adapter_path, spec)
        merge_vectors(model, tensors, adapter_config(info))
    with torch.no_grad():
        if fmt == "hf":
            return convert.save_hf_folder(model, out_path)
        if fmt == "ct2":
            return convert.save_ct2_folder(model, out_path, quantization)
        # Written beside the target and renamed: an interrupted export leaves the old file.
        with atomic_path(Path(out_path)) as partial:
            save_whisper_checkpoint(model, partial, half=False)
        record_file(Path(out_path), fmt)
    return Path(out_path)
