"""openai-whisper <-> Hugging Face Whisper, and CTranslate2 (faster-whisper) folders.

openai-whisper's `Whisper` is the one model this project computes with. This room translates it:
- to a Hugging Face `WhisperForConditionalGeneration` folder (config.json, model.safetensors,
  generation_config.json, tokenizer and feature-extractor files), built offline: the tokenizer
  from whisper's own tiktoken assets, the generation settings from whisper's tokenizer;
- from such a folder back to a `Whisper` (a Hugging Face base model), with safetensors and json
  alone, so reading needs none of the optional packages;
- to a CTranslate2 folder that faster-whisper loads, by ctranslate2's own converter on the
  Hugging Face folder.

transformers and ctranslate2 are optional (the `export` extra) and imported inside the functions
that need them; `require_export_extra` says which is missing before any work.

The weight names follow transformers' former `convert_openai_to_hf.py`. Both sides have the same
tensors: whisper's key projection has no bias and neither has HF's `k_proj`; HF's `proj_out` is
tied to the token embedding (whisper's logits use that embedding too), so it is not stored.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import whisper
from safetensors.torch import save_file
from torch import Tensor
from whisper.model import AudioEncoder, ModelDimensions, TextDecoder, Whisper
from whisper.tokenizer import Tokenizer, get_tokenizer

from bestrq.atomic import apply_file_mode
from bestrq.export_target import check_target, record_folder

EXPORT_EXTRA = "pip install 'whisper-bestrq[export]'"
FORMATS = ("openai", "hf", "ct2", "peft")
# What ctranslate2's converter takes as `quantization` (None: keep the weights' float32).
CT2_QUANTIZATIONS = ("float32", "float16", "bfloat16", "int8", "int8_float32", "int8_float16",
                     "int8_bfloat16", "int16")
# The packages each format needs beyond the core dependencies.
_FORMAT_NEEDS: dict[str, tuple[str, ...]] = {
    "openai": (), "hf": ("transformers",), "ct2": ("transformers", "ctranslate2"),
    "peft": ("peft",)}

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_BIN_WEIGHTS = "pytorch_model.bin"
HF_BIN_INDEX = "pytorch_model.bin.index.json"
HF_GENERATION = "generation_config.json"
# Files faster-whisper reads beside CTranslate2's model.bin.
CT2_COPIED = ("tokenizer.json", "preprocessor_config.json")

# Inside a residual block: openai module name -> Hugging Face module name.
_BLOCK_NAMES = {
    "attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj",
    "attn.value": "self_attn.v_proj", "attn.out": "self_attn.out_proj",
    "attn_ln": "self_attn_layer_norm",
    "cross_attn.query": "encoder_attn.q_proj", "cross_attn.key": "encoder_attn.k_proj",
    "cross_attn.value": "encoder_attn.v_proj", "cross_attn.out": "encoder_attn.out_proj",
    "cross_attn_ln": "encoder_attn_layer_norm",
    "mlp.0": "fc1", "mlp.2": "fc2", "mlp_ln": "final_layer_norm",
}
# Outside the blocks: whole openai key prefix -> Hugging Face one (after `model.`).
_TOP_NAMES = {
    "encoder.conv1": "encoder.conv1", "encoder.conv2": "encoder.conv2",
    "encoder.positional_embedding": "encoder.embed_positions.weight",
    "encoder.ln_post": "encoder.layer_norm",
    "decoder.token_embedding": "decoder.embed_tokens",
    "decoder.positional_embedding": "decoder.embed_positions.weight",
    "decoder.ln": "decoder.layer_norm",
}
_BLOCK_KEY = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.(.+)\.(weight|bias)$")


class MissingExtraError(RuntimeError):
    """An optional package of the `export` extra is not installed."""


def require_export_extra(fmt: str) -> None:
    """Fail before any work when `fmt` needs a package of the `export` extra that is missing."""
    if fmt not in _FORMAT_NEEDS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    missing = []
    for module in _FORMAT_NEEDS[fmt]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingExtraError(f"format {fmt!r} needs {' and '.join(missing)}, which "
                                f"{'is' if len(missing) == 1 else 'are'} not installed: "
                                f"{EXPORT_EXTRA}")


def check_quantization(fmt: str, quantization: str | None) -> None:
    """`quantization` is CTranslate2's: refuse it for other formats and refuse unknown values."""
    if quantization is None:
        return
    if fmt != "ct2":
        raise ValueError(f"quantization applies to the ct2 format only, not to {fmt!r}")
    if quantization not in CT2_QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(CT2_QUANTIZATIONS)}, "
                         f"got {quantization!r}")


# ------------------------------------------------------------------------------ weight names
def hf_key(openai_key: str) -> str:
    """The Hugging Face `WhisperForConditionalGeneration` name of an openai-whisper tensor."""
    block = _BLOCK_KEY.match(openai_key)
    if block:
        part, layer, module, kind = block.groups()
        if module not in _BLOCK_NAMES:
            raise KeyError(f"no Hugging Face name for openai-whisper tensor {openai_key!r}")
        return f"model.{part}.layers.{layer}.{_BLOCK_NAMES[module]}.{kind}"
    for prefix, name in _TOP_NAMES.items():
        if openai_key == prefix:  # a bare tensor: the positional embeddings
            return f"model.{name}"
        if openai_key.startswith(prefix + ".") and openai_key.count(".") == prefix.count(".") + 1:
            return f"model.{name}{openai_key[len(prefix):]}"
    raise KeyError(f"no Hugging Face name for openai-whisper tensor {openai_key!r}")


def openai_to_hf_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An openai-whisper state dict under Hugging Face names (proj_out left out: it is tied to
    model.decoder.embed_tokens.weight)."""
    return {hf_key(k): v for k, v in state.items()}


def hf_to_openai_state_dict(hf_state: dict[str, Tensor], dims: ModelDimensions
                            ) -> dict[str, Tensor]:
    """A Hugging Face Whisper state dict under openai-whisper names, for a `Whisper(dims)`.

    The names are those the openai model of these dims has, mapped forward: every tensor must be
    there, and nothing but a `proj_out.weight` equal to the token embedding may be left over.
    """
    d = dims
    with torch.device("meta"):  # the names alone: no memory for the weights
        # Whisper itself cannot be built on meta (its alignment heads are a sparse tensor).
        names = [f"encoder.{k}" for k in AudioEncoder(
            d.n_mels, d.n_audio_ctx, d.n_audio_state, d.n_audio_head, d.n_audio_layer
        ).state_dict()] + [f"decoder.{k}" for k in TextDecoder(
            d.n_vocab, d.n_text_ctx, d.n_text_state, d.n_text_head, d.n_text_layer
        ).state_dict()]
    wanted = {hf_key(k): k for k in names}
    missing = sorted(set(wanted) - set(hf_state))
    if missing:
        raise KeyError(f"the Hugging Face weights lack {len(missing)} tensors of a Whisper "
                       f"with these dims, e.g. {missing[:3]}")
    extra = sorted(set(hf_state) - set(wanted) - {"proj_out.weight"})
    if extra:
        raise KeyError(f"the Hugging Face weights have tensors openai-whisper has no place for, "
                       f"e.g. {extra[:3]}")
    proj = hf_state.get("proj_out.weight")
    embed = hf_state["model.decoder.embed_tokens.weight"]  # (vocab, d)
    if proj is not None and not torch.equal(proj, embed):
        raise ValueError("the Hugging Face model's proj_out is not tied to its token embedding: "
                         "openai-whisper computes its logits with the embedding")
    return {wanted[k]: v for k, v in hf_state.items() if k in wanted}


# ------------------------------------------------------------------------------ configs
def whisper_tokenizer(model: Whisper) -> Tokenizer:
    """whisper's own tokenizer for `model` (English-only or multilingual, its language count)."""
    return get_tokenizer(model.is_multilingual, num_languages=model.num_languages)


def suppressed_tokens(tokenizer: Tokenizer) -> list[int]:
    """The tokens whisper's decoding suppresses by default (`suppress_tokens="-1"`): symbols
    that are not speech, and the special tokens that may not be sampled."""
    specials = [tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev,
                tokenizer.sot_lm, tokenizer.no_speech]
    return sorted(set(tokenizer.non_speech_tokens) | {t for t in specials if t is not None})


def alignment_heads(model: Whisper) -> list[list[int]]:
    """[layer, head] of the cross-attention heads `model` uses for word timing."""
    mask = model.alignment_heads.to_dense()  # (decoder layers, heads), bool
    return [[int(layer), int(head)] for layer, head in mask.nonzero().tolist()]


def hf_config(model: Whisper, tokenizer: Tokenizer) -> dict[str, Any]:
    """The Hugging Face config.json of `model`."""
    dims = model.dims
    if dims.n_audio_state != dims.n_text_state:
        raise ValueError("Hugging Face Whisper has one d_model for encoder and decoder; this "
                         f"model has {dims.n_audio_state} and {dims.n_text_state}")
    return {
        "architectures": ["WhisperForConditionalGeneration"],
        "vocab_size": dims.n_vocab, "num_mel_bins": dims.n_mels, "d_model": dims.n_audio_state,
        "encoder_layers": dims.n_audio_layer, "encoder_attention_heads": dims.n_audio_head,
        "decoder_layers": dims.n_text_layer, "decoder_attention_heads": dims.n_text_head,
        "encoder_ffn_dim": 4 * dims.n_audio_state, "decoder_ffn_dim": 4 * dims.n_text_state,
        "max_source_positions": dims.n_audio_ctx, "max_target_positions": dims.n_text_ctx,
        "activation_function": "gelu", "scale_embedding": False, "tie_word_embeddings": True,
        "pad_token_id": tokenizer.eot, "bos_token_id": tokenizer.eot,
        "eos_token_id": tokenizer.eot, "decoder_start_token_id": tokenizer.sot,
        "begin_suppress_tokens": [*tokenizer.encode(" "), tokenizer.eot],
        "suppress_tokens": suppressed_tokens(tokenizer), "dtype": "float32",
        "use_cache": True,
    }


def generation_config(model: Whisper, tokenizer: Tokenizer) -> dict[str, Any]:
    """generation_config.json: what `generate` needs to decode as whisper does.

    English-only models get no `lang_to_id` (its presence makes `generate` detect a language);
    multilingual ones get the language and task tokens, so `generate(language=, task=)` works
    and a missing language is detected, then transcribed, as whisper does.
    """
    config = {
        "decoder_start_token_id": tokenizer.sot, "bos_token_id": tokenizer.sot,
        "eos_token_id": tokenizer.eot, "pad_token_id": tokenizer.eot,
        "max_length": model.dims.n_text_ctx,
        "no_timestamps_token_id": tokenizer.no_timestamps,
        "prev_sot_token_id": tokenizer.sot_prev,
        "max_initial_timestamp_index": 50,  # whisper's max_initial_timestamp, 1 s in 20 ms steps
        "begin_suppress_tokens": [*tokenizer.encode(" "), tokenizer.eot],
        "suppress_tokens": suppressed_tokens(tokenizer),
        "alignment_heads": alignment_heads(model),
        "is_multilingual": model.is_multilingual, "return_timestamps": False,
    }
    if model.is_multilingual:
        config["lang_to_id"] = {f"<|{code}|>": tokenizer.to_language_token(code)
                                for code in tokenizer.all_language_codes}
        config["task_to_id"] = {"transcribe": tokenizer.transcribe,
                                "translate": tokenizer.translate}
        # whisper's default task; without it a detected language is followed by no task token
        config["task"] = "transcribe"
    return config


# ------------------------------------------------------------------------------ tokenizer
@lru_cache(maxsize=4)
def _hf_tokenizer(multilingual: bool, num_languages: int) -> Any:
    """A transformers `WhisperTokenizer` (the fast one) with whisper's ids, built offline from
    whisper's tiktoken asset. Cached: extracting the BPE merges takes seconds.

    `convert_tiktoken_to_fast` would first re-dump the ranks through tiktoken, which needs
    `blobfile`; the asset already is a tiktoken file, so its converter reads it directly.
    Timestamp tokens are added as ordinary (not special) tokens, as in the tokenizers OpenAI
    published: the tokenizer finds where timestamps begin after the last special token.
    """
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    encoding = get_tokenizer(multilingual, num_languages=num_languages).encoding
    asset = Path(whisper.__file__).parent / "assets" / encoding.name  # gpt2/multilingual.tiktoken
    specials = [t for t in encoding._special_tokens if not _is_timestamp(t)]
    timestamps = [t for t in encoding._special_tokens if _is_timestamp(t)]
    backend = TikTokenConverter(vocab_file=str(asset), pattern=encoding._pat_str,
                                extra_special_tokens=specials).converted()
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in timestamps])
    eot = "<|endoftext|>"
    return WhisperTokenizer(tokenizer_object=backend, unk_token=eot, bos_token=eot,
                            eos_token=eot, pad_token=eot, extra_special_tokens=specials,
                            model_max_length=1024)


def _is_timestamp(token: str) -> bool:
    return re.fullmatch(r"<\|\d+\.\d\d\|>", token) is not None


def hf_tokenizer(model: Whisper) -> Any:
    """The transformers tokenizer of `model`, ids equal to whisper's (see `_hf_tokenizer`)."""
    return _hf_tokenizer(model.is_multilingual, model.num_languages)


# ------------------------------------------------------------------------------ writing
def digest_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@contextmanager
def fresh_folder(out: Path, fmt: str) -> Iterator[Path]:
    """A temporary folder beside `out` that replaces it when the block succeeds, its files
    given the umask's mode and marked as an export of `fmt` (the files it holds listed).

    An existing `out` is replaced only when it is empty or an unchanged earlier export
    (`export_target.check_target`): an export never deletes a folder of something else.
    """
    out = check_target(out, fmt)
    # Beside `out`, so that the rename is atomic; a leftover of a crashed export is replaced.
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        # Files some writers make through a temporary of their own (safetensors) have 0600.
        for root, _, files in os.walk(tmp):
            for name in files:
                if not os.path.islink(os.path.join(root, name)):
                    apply_file_mode(Path(root, name))
        record_folder(tmp, fmt)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_hf_files(model: Whisper, folder: Path) -> None:
    """Write `model` as a Hugging Face Whisper into an existing `folder`."""
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor

    tokenizer = whisper_tokenizer(model)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    # metadata format=pt: what transformers' own save_pretrained writes and from_pretrained reads
    save_file(openai_to_hf_state_dict(state), str(folder / HF_WEIGHTS), metadata={"format": "pt"})
    # Through transformers' own classes, so the files carry what its loaders expect.
    WhisperConfig(**hf_config(model, tokenizer)).save_pretrained(str(folder))
    GenerationConfig(**generation_config(model, tokenizer)).save_pretrained(str(folder))
    hf_tokenizer(model).save_pretrained(str(folder))
    WhisperFeatureExtractor(feature_size=model.dims.n_mels).save_pretrained(str(folder))


def save_hf_folder(model: Whisper, out: str | Path) -> Path:
    """Write `model` to the folder `out` as a Hugging Face `WhisperForConditionalGeneration`
    with its tokenizer, feature extractor and generation config; `from_pretrained` and
    `pipeline("automatic-speech-recognition", out)` load it offline."""
    require_export_extra("hf")
    with fresh_folder(Path(out), "hf") as tmp:
        write_hf_files(model, tmp)
    return Path(out)


def save_ct2_folder(model: Whisper, out: str | Path, quantization: str | None = None) -> Path:
    """Write `model` to the folder `out` in CTranslate2's format, with tokenizer.json and
    preprocessor_config.json beside model.bin, as `faster_whisper.WhisperModel(out)` expects.

    quantization: CTranslate2's weight type (CT2_QUANTIZATIONS); None keeps float32.
    """
    require_export_extra("ct2")
    check_quantization("ct2", quantization)
    from ctranslate2.converters import TransformersConverter

    with tempfile.TemporaryDirectory() as hf_dir, fresh_folder(Path(out), "ct2") as tmp:
        write_hf_files(model, Path(hf_dir))
        converter = TransformersConverter(hf_dir, copy_files=list(CT2_COPIED))
        converter.convert(str(tmp), quantization=quantization, force=True)
    return Path(out)
