"""Adapter files: IA^3 vectors, BEST-RQ heads and quantizer state in one safetensors file.

The file's metadata holds a JSON description (configs, base model identity, training summary),
also written beside it as `<name>.json` for people and for DVC. From an adapter and its base
checkpoint, `build_model` rebuilds the exact BEST-RQ model and `export_merged` writes a stock
openai-whisper checkpoint with the IA^3 vectors folded into the weights (or, through
`bestrq.convert`, a Hugging Face or CTranslate2 folder).

The heads (d_model x num_codebooks x codebook_size) dwarf the IA^3 vectors (6 x d_model x
layers): 12.6 MB against 36 KB for tiny at 8192 codes. They are needed to continue or evaluate
BEST-RQ training, not to use the adapted encoder, so `parts=("ia3",)` writes a vectors-only file
in the same format, which `export_merged` accepts as well.

Fine-tuned adapters are vectors-only files written by `save_vectors` from a whole Whisper: they
hold `ia3.encoder.*` and also `ia3.decoder.*` (8 x d_model per decoder layer: self- and
cross-attention keys and values, FFN). `load_vectors`, `merge_vectors` and `export_merged` take
either kind; a file without decoder vectors leaves the decoder as it is in stock Whisper.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor
from whisper.model import Whisper

from bestrq import convert
from bestrq.atomic import atomic_path, atomic_write_text
from bestrq.export_target import check_target, record_file
from bestrq.ia3 import add_ia3, ia3_state_dict, load_ia3_state_dict, merge_ia3
from bestrq.masking import MaskingConfig
from bestrq.model import BestRQModel
from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer
from bestrq.whisper_model import load_whisper, model_identity, save_whisper_checkpoint

FORMAT = "bestrq-ia3-adapter/1"
PARTS = ("ia3", "heads", "quantizer")
# The Whisper modules whose IA^3 vectors a file may hold, as `ia3.<module>.<vector name>`.
IA3_MODULES = ("encoder", "decoder")


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
    if unknown or "ia3" not in parts:
        raise ValueError(f"adapter parts must include 'ia3' and be among {PARTS}, got {parts}")
    info = {"format": FORMAT, "parts": [p for p in PARTS if p in parts], "base": base,
            "quantizer": model.quantizer.config.to_dict(), "masking": model.masking.to_dict(),
            "layers": model.layers(), **(extra or {})}
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in
               model.adapter_state_dict().items() if k.split(".", 1)[0] in parts}
    _write(Path(path), tensors, info)
    return info


def save_vectors(path: str | Path, model: Whisper, base: dict[str, Any],
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the IA^3 vectors of a whole Whisper (`ia3.encoder.*`, `ia3.decoder.*`, for each of
    the two that has them) to `path` as a vectors-only adapter, and its description to
    `path.json`. base and extra as for `save_adapter`. Returns the description."""
    tensors = {f"ia3.{part}.{k}": v.detach().float().cpu().contiguous()
               for part in IA3_MODULES
               for k, v in ia3_state_dict(getattr(model, part)).items()}
    if not tensors:
        raise ValueError("the model has no IA^3 vectors in its encoder or decoder: nothing to "
                         "save (add_ia3 first)")
    info = {"format": FORMAT, "parts": ["ia3"], "base": base, **(extra or {})}
    _write(Path(path), tensors, info)
    return info


def read_adapter(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, description) of an adapter file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "bestrq" not in meta:
        raise ValueError(f"{path} is not a BEST-RQ adapter (no 'bestrq' metadata)")
    info = json.loads(meta["bestrq"])
    if info.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported adapter format {info.get('format')!r}")
    return load_file(str(path)), info


def _section(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_into(model: BestRQModel, tensors: dict[str, Tensor]) -> None:
    """Copy an adapter's tensors into a model built with the same configuration."""
    missing = [p for p in PARTS if not any(k.startswith(f"{p}.") for k in tensors)]
    if missing:
        raise ValueError(f"the adapter has no {' or '.join(missing)} tensors: a vectors-only "
                         "file can be merged into Whisper (export_merged), but BEST-RQ "
                         "evaluation or training needs the full adapter")
    load_ia3_state_dict(model.encoder, _section(tensors, "ia3.encoder."))
    model.heads.load_state_dict(_section(tensors, "heads."))
    model.quantizer.load_state_dict(_section(tensors, "quantizer."))


def build_model(whisper_model: Whisper, info: dict[str, Any],
                tensors: dict[str, Tensor] | None = None) -> BestRQModel:
    """The BEST-RQ model an adapter describes, on `whisper_model`'s encoder."""
    quantizer = RandomProjectionQuantizer(QuantizerConfig.from_dict(info["quantizer"]))
    # Adapters made before the layers were a choice read the encoder's output.
    model = BestRQModel(whisper_model.encoder, quantizer, MaskingConfig.from_dict(info["masking"]),
                        **info.get("layers", {}))
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


def load_vectors(model: Whisper, tensors: dict[str, Tensor]) -> Whisper:
    """Put an adapter's IA^3 vectors into `model`, in place, and return it.

    IA^3 is added to both the encoder and the decoder, so the result can be trained further.
    The file must hold encoder vectors; its decoder vectors, where it has any (fine-tuned
    adapters; BEST-RQ ones have none), are loaded too, else the decoder's are set to one. Within
    each module the names must match the model's exactly. Other parts (heads, quantizer) are
    ignored.
    """
    sections = {part: _section(tensors, f"ia3.{part}.") for part in IA3_MODULES}
    if not sections["encoder"]:
        raise KeyError("the adapter has no IA^3 encoder vectors (ia3.encoder.*): not an adapter "
                       "for this model, or a damaged file")
    stray = sorted(k for k in tensors if k.startswith("ia3.")
                   and not any(k.startswith(f"ia3.{part}.") for part in IA3_MODULES))
    if stray:
        raise KeyError(f"the adapter has IA^3 vectors for no known module: {stray[:4]}")
    for part in IA3_MODULES:
        module = getattr(model, part)
        add_ia3(module)
        vectors = sections[part]
        if not vectors:
            # An adapter without decoder vectors describes the stock decoder, even where this
            # model's decoder already had other vectors.
            vectors = {k: torch.ones_like(v) for k, v in ia3_state_dict(module).items()}
        load_ia3_state_dict(module, vectors)
    return model


def merge_vectors(model: Whisper, tensors: dict[str, Tensor]) -> Whisper:
    """Fold an adapter's IA^3 vectors (encoder, and decoder where the file has them) into
    `model`'s weights, in place: the result is a plain Whisper (no extra modules) that computes
    what the adapted one does."""
    merge_ia3(load_vectors(model, tensors))
    return model


def export_merged(adapter_path: str | Path, base_model: str | None, out_path: str | Path,
                  fmt: str = "openai", quantization: str | None = None,
                  protected: Iterable[str | Path] = ()) -> Path:
    """Write the base Whisper with the adapter's IA^3 vectors folded in (the encoder's, and the
    decoder's where the file has them: fine-tuned adapters) to `out_path`.

    base_model: a Whisper name, checkpoint path or Hugging Face folder or hub name; None takes
    the one the adapter records. fmt: "openai" (a checkpoint file for `whisper.load_model`),
    "hf" (a Hugging Face folder) or "ct2" (a CTranslate2 folder for faster-whisper, weights in
    `quantization`); the last two need the `export` extra, checked before any work.

    `out_path` must not exist, be empty, or be an unchanged earlier export; never inside a
    `protected` folder (the pipeline's data/) nor over the adapter or base model
    (`export_target.check_target`, before any work: ExportTargetError otherwise).
    """
    convert.require_export_extra(fmt)
    convert.check_quantization(fmt, quantization)
    tensors, info = read_adapter(adapter_path)
    spec = base_model or info["base"]["model"]
    # Both the base given and the one the adapter records: a path among them is an input.
    check_target(out_path, fmt, [adapter_path, spec, info["base"].get("model", "")], protected)
    model = load_whisper(spec)
    check_base(model, info, adapter_path, spec)
    merge_vectors(model, tensors)
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
