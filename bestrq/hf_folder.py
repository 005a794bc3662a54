"""A Hugging Face Whisper folder as a base model: its config.json read within bounds, its weight
files (one safetensors file, shards named by an index, or PyTorch .bin) found inside the folder
only, and the weights loaded into an openai-whisper `Whisper` (`convert` maps the names).

Every check runs before a tensor is allocated, and every failure is one ValueError that names
the folder: a config nested or sized to exhaust the parser, dimensions no Whisper has (heads
that do not divide the width, billions of parameters), an index pointing outside the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor
from whisper.model import ModelDimensions, Whisper

from bestrq.convert import (
    HF_BIN_INDEX,
    HF_BIN_WEIGHTS,
    HF_CONFIG,
    HF_GENERATION,
    HF_WEIGHTS,
    HF_WEIGHTS_INDEX,
    digest_files,
    hf_to_openai_state_dict,
)

MAX_CONFIG_BYTES = 1 << 20  # config.json and the weight index: Whisper's are a few kB
# A little above large-v3's 1.55 B: a config past it would allocate tens of GB before failing.
MAX_PARAMETERS = 2_000_000_000
MAX_WIDTH = 8192  # d_model (Whisper's widest, large, is 1280)
MAX_COUNT = 1 << 20  # layers, heads, mel bins, positions and vocabulary entries


def _read_json(path: Path, folder: Path) -> Any:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ValueError(f"{size} bytes, more than the {MAX_CONFIG_BYTES} a Whisper's "
                             "needs")
        return json.loads(path.read_bytes())
    except RecursionError:
        raise ValueError(f"model: cannot read {path}: nested too deeply to be a Hugging Face "
                         f"config (folder {folder})") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"model: cannot read {path}: {err}") from None


def read_config(folder: Path) -> dict[str, Any]:
    """The Whisper config.json of `folder`; ValueError naming it when it is not one."""
    config_path = folder / HF_CONFIG
    if not config_path.exists():
        raise ValueError(f"model: folder {folder} has no {HF_CONFIG}: not a Hugging Face "
                         "model folder")
    config = _read_json(config_path, folder)
    if not isinstance(config, dict) or config.get("model_type") != "whisper":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise ValueError(f"model: {config_path} describes a {kind!r} model, not a Whisper")
    return config


def _count(config: dict[str, Any], key: str, high: int = MAX_COUNT) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ValueError(f"{key} must be a whole number from 1 to {high}, got {value!r}")
    return value


def parameter_count(dims: ModelDimensions) -> int:
    """The parameters of `Whisper(dims)`, counted from the dims alone (nothing allocated)."""
    def blocks(d: int, layers: int, cross: bool) -> int:
        attention = 4 * d * d + 3 * d  # query, key (no bias), value, out
        block = attention + 2 * d + (8 * d * d + 5 * d) + 2 * d  # + LNs, the 4x MLP
        if cross:
            block += attention + 2 * d
        return layers * block

    a, t = dims.n_audio_state, dims.n_text_state
    encoder = (dims.n_mels * a * 3 + a) + (a * a * 3 + a) + blocks(a, dims.n_audio_layer, False)
    decoder = dims.n_vocab * t + dims.n_text_ctx * t + blocks(t, dims.n_text_layer, True)
    return encoder + 2 * a + decoder + 2 * t


def dims_from_hf_config(config: dict[str, Any]) -> ModelDimensions:
    """openai-whisper's dimensions of a Hugging Face Whisper config.json; refuses variants
    openai-whisper cannot compute (other FFN width, activation or embedding scale) and sizes
    no Whisper has (MAX_WIDTH, MAX_PARAMETERS), before anything is allocated."""
    d = _count(config, "d_model", MAX_WIDTH)
    for side in ("encoder", "decoder"):
        if config.get(f"{side}_ffn_dim", 4 * d) != 4 * d:
            raise ValueError(f"{side}_ffn_dim {config[f'{side}_ffn_dim']} != 4 * d_model: not "
                             "an architecture openai-whisper has")
        heads = _count(config, f"{side}_attention_heads", d)
        if d % heads:
            raise ValueError(f"d_model {d} is not a multiple of {side}_attention_heads {heads}")
    if config.get("activation_function", "gelu") != "gelu" or config.get("scale_embedding"):
        raise ValueError("only gelu activations without embedding scaling are openai-whisper's")
    dims = ModelDimensions(
        n_mels=_count(config, "num_mel_bins"), n_audio_ctx=_count(config, "max_source_positions"),
        n_audio_state=d, n_audio_head=config["encoder_attention_heads"],
        n_audio_layer=_count(config, "encoder_layers"), n_vocab=_count(config, "vocab_size"),
        n_text_ctx=_count(config, "max_target_positions"), n_text_state=d,
        n_text_head=config["decoder_attention_heads"],
        n_text_layer=_count(config, "decoder_layers"))
    params = parameter_count(dims)
    if params > MAX_PARAMETERS:
        raise ValueError(f"a Whisper of these dims has {params / 1e9:.1f} B parameters, more "
                         f"than {MAX_PARAMETERS / 1e9:g} B (large-v3 has 1.55 B)")
    return dims


def hf_weight_files(folder: str | Path) -> list[Path]:
    """The weight files of a Hugging Face folder: safetensors (one file or shards) where there
    are any, else PyTorch .bin; raises ValueError naming the folder where there are none, or
    where an index names a file outside the folder."""
    folder = Path(folder)
    for single, index in ((HF_WEIGHTS, HF_WEIGHTS_INDEX), (HF_BIN_WEIGHTS, HF_BIN_INDEX)):
        if (folder / index).is_file():
            weight_map = _read_json(folder / index, folder)
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"model: {folder / index}: no weight_map of tensor names to "
                                 "file names")
            shards = sorted(set(weight_map.values()))
            outside = [s for s in shards if Path(s).is_absolute() or Path(s).name != s
                       or s in ("", ".", "..")]
            if outside:
                raise ValueError(f"model: {folder / index} names weight files outside the "
                                 f"folder ({outside[:3]}): only file names in {folder} are read")
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise ValueError(f"model: folder {folder} lacks weight shards {missing[:3]}")
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    raise ValueError(f"model: folder {folder} has no weights ({HF_WEIGHTS} or {HF_BIN_WEIGHTS})")


def check_hf_folder(folder: str | Path) -> ModelDimensions:
    """The dims of the Hugging Face Whisper in `folder`, read from config.json without loading
    weights; raises ValueError naming the folder when it is not one openai-whisper can run."""
    folder = Path(folder)
    config = read_config(folder)
    hf_weight_files(folder)
    try:
        return dims_from_hf_config(config)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"model: {folder / HF_CONFIG}: not an openai-whisper architecture "
                         f"({err})") from None


def hf_folder_digest(folder: str | Path) -> str:
    """sha256 over the folder's weight files (names and bytes), the identity of the weights."""
    return digest_files(hf_weight_files(folder))


def _load_weights(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_hf_folder(folder: str | Path) -> Whisper:
    """An fp32 openai-whisper `Whisper` with the weights of the Hugging Face Whisper in
    `folder` (its alignment heads too, where generation_config.json has them)."""
    folder = Path(folder)
    dims = check_hf_folder(folder)
    hf_state: dict[str, Tensor] = {}
    try:
        for path in hf_weight_files(folder):
            hf_state.update(_load_weights(path))
    except Exception as err:  # truncated or foreign files; safetensors' error is its own class
        raise ValueError(f"model: cannot read the weights in {folder}: {err}") from None
    try:
        state = hf_to_openai_state_dict(hf_state, dims)
    except (KeyError, ValueError) as err:
        raise ValueError(f"model: {folder}: {err}") from None
    model = Whisper(dims)
    expected = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (config.json gives {tuple(expected[k].shape)})"
             for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"model: {folder}: {len(wrong)} weights do not have the shapes of "
                         f"{HF_CONFIG}'s dims, e.g. {wrong[0]}")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    generation = folder / HF_GENERATION
    if generation.is_file():
        heads = _read_json(generation, folder)
        heads = heads.get("alignment_heads") if isinstance(heads, dict) else None
        if heads:
            mask = torch.zeros(dims.n_text_layer, dims.n_text_head, dtype=torch.bool)
            try:
                for layer, head in heads:
                    mask[layer, head] = True
            except (TypeError, ValueError, IndexError) as err:
                raise ValueError(f"model: {generation}: alignment_heads are not [layer, head] "
                                 f"pairs of this model ({err})") from None
            # as whisper's set_alignment_heads stores them: sparse, not in the state dict
            model.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)
    return model
