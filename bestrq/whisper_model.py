"""Loading and writing openai-whisper checkpoints, by model name or by path.

`model` may name four things: a Whisper model name (downloaded by whisper), an openai-whisper
checkpoint file, a Hugging Face Whisper folder (config.json and weights), or a Hugging Face hub
name such as `openai/whisper-tiny.en` (downloaded by huggingface_hub where there is network).
The last two are converted to an openai-whisper `Whisper` in memory (`bestrq.convert`), so every
stage computes with the same model class whatever the base came as.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import urllib.error
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
import whisper
from whisper.model import ModelDimensions, Whisper

from bestrq import convert, hf_folder


class ModelUnavailableError(RuntimeError):
    """A Whisper model name or Hugging Face hub name that is neither cached nor downloadable
    here."""


def _download_root() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.getenv("XDG_CACHE_HOME", default), "whisper")


# owner/name on the Hugging Face hub; a path to a missing checkpoint file (data/x.pt) is not one.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
# Only what an openai-whisper model is built from: not the Flax, TF or ONNX copies hub repos hold.
_HUB_PATTERNS = ["*.json", "*.safetensors"]
_HUB_BIN_PATTERNS = ["*.json", "pytorch_model*.bin"]

SpecKind = Literal["checkpoint", "name", "folder", "hub"]


def spec_kind(spec: str) -> SpecKind | None:
    """What `spec` names: a checkpoint file, a whisper model name, a local folder (a Hugging
    Face model, to be checked), a Hugging Face hub name; None for none of them. An existing path
    wins over a name."""
    path = Path(spec)
    if path.is_file():
        return "checkpoint"
    if spec in whisper.available_models():
        return "name"
    if path.is_dir():
        return "folder"
    if _HUB_ID.match(spec) and not spec.endswith(_CHECKPOINT_SUFFIXES):
        return "hub"
    return None


def validate_model_spec(spec: str) -> None:
    """Fail before any work when `spec` is none of a whisper model name, an existing checkpoint
    file, a readable Hugging Face Whisper folder, or a hub name (owner/name). Needs no network:
    a hub name is checked when it is loaded."""
    kind = spec_kind(spec)
    if kind == "folder":
        hf_folder.check_hf_folder(spec)  # ValueError naming the folder
    if kind == "checkpoint":
        _check_checkpoint(spec)
    if kind is not None:
        return
    raise ValueError(f"model: {spec!r} is neither a Whisper model name "
                     f"({', '.join(whisper.available_models())}), an existing checkpoint file, "
                     f"a Hugging Face Whisper folder nor a hub name (owner/name)")


def _load_checkpoint(path: str) -> Any:
    """`torch.load` of a checkpoint as the weights it holds, never code (weights_only),
    memory-mapped where the file's format allows."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # the legacy format


def _check_checkpoint(path: str) -> None:
    """ValueError naming `path` unless it loads as weights (no pickled code) with openai-whisper's
    "dims" and "model_state_dict"."""
    try:
        checkpoint = _load_checkpoint(path)
    except Exception as err:  # UnpicklingError for code, RuntimeError for a foreign file...
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"model: {path} is not a checkpoint torch can load as weights alone "
                         f"({type(err).__name__}: {first})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("dims"), dict) \
            or not isinstance(checkpoint.get("model_state_dict"), dict):
        raise ValueError(f"model: {path} is not an openai-whisper checkpoint (a dict with "
                         "'dims' and 'model_state_dict')")


# Whisper's names whose models take 128 mel bins; every other name takes 80.
_128_MEL_NAMES = frozenset({"large-v3", "large-v3-turbo", "turbo"})


def expected_n_mels(spec: str) -> int | None:
    """The mel bins `spec`'s model takes, known without loading its weights (a name, a
    checkpoint whose dims a memory-mapped load reads, a Hugging Face folder's or cached hub
    model's config.json); None when that cannot be told cheaply."""
    kind = spec_kind(spec)
    if kind == "checkpoint":
        try:
            return int(_load_checkpoint(spec)["dims"]["n_mels"])
        except Exception:  # an old-format or foreign file: load_whisper will say what is wrong
            return None
    if kind == "name":
        return 128 if spec in _128_MEL_NAMES else 80
    folder = Path(spec) if kind == "folder" else _hub_cached(spec) if kind == "hub" else None
    if folder is None:
        return None
    try:
        return int(hf_folder.read_config(folder)["num_mel_bins"])
    except (ValueError, KeyError, TypeError):  # load_whisper will say what is wrong
        return None


# Encoder blocks and width (ModelDimensions' n_audio_layer, n_audio_state) of Whisper's names,
# ".en" stripped: what the params check needs of a model before its weights are downloaded.
_ENCODER_SHAPES = {"tiny": (4, 384), "base": (6, 512), "small": (12, 768), "medium": (24, 1024),
                   **dict.fromkeys(("large-v1", "large-v2", "large-v3", "large",
                                    "large-v3-turbo", "turbo"), (32, 1280))}


def encoder_shape(spec: str) -> tuple[int, int] | None:
    """(blocks, width) of `spec`'s encoder, known without loading its weights (a name, a
    checkpoint's dims read by a memory-mapped load, a Hugging Face folder's or cached hub
    model's config.json); None when that cannot be told cheaply."""
    kind = spec_kind(spec)
    if kind == "name":
        return _ENCODER_SHAPES.get(spec.removesuffix(".en"))  # a name whisper adds later: None
    try:
        if kind == "checkpoint":
            dims = _load_checkpoint(spec)["dims"]
            return int(dims["n_audio_layer"]), int(dims["n_audio_state"])
        folder = Path(spec) if kind == "folder" else _hub_cached(spec) if kind == "hub" else None
        if folder is None:
            return None
        config = hf_folder.read_config(folder)
        return int(config["encoder_layers"]), int(config["d_model"])
    except Exception:  # an old-format or foreign file: load_whisper will say what is wrong
        return None


def _hub_cached(repo_id: str) -> Path | None:
    """The local snapshot of hub model `repo_id` where its weights are cached, else None."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    for patterns in (_HUB_PATTERNS, _HUB_BIN_PATTERNS):
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns,
                                            local_files_only=True))
            hf_folder.hf_weight_files(folder)
            return folder
        except Exception:  # not cached, or cached without weights
            continue
    return None


def _hub_download(repo_id: str) -> Path:
    """A local snapshot of hub model `repo_id`: the cached one, else downloaded (safetensors
    where the repository has them, else PyTorch .bin). Fails within seconds without network."""
    cached = _hub_cached(repo_id)
    if cached is not None:
        return cached
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise ModelUnavailableError(
            f"model: {repo_id!r} names a Hugging Face hub model, which needs huggingface_hub: "
            f"{convert.EXPORT_EXTRA}") from err
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # a blackholed network must not hang the pipeline
    try:
        for patterns in (_HUB_PATTERNS, _HUB_BIN_PATTERNS):
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10))
            try:
                hf_folder.hf_weight_files(folder)
                return folder
            except ValueError:  # no safetensors in this repository: try its .bin weights
                continue
        raise ModelUnavailableError(f"model: Hugging Face model {repo_id!r} has no weights "
                                    "openai-whisper can load (safetensors or pytorch_model.bin)")
    except ModelUnavailableError:
        raise
    except Exception as err:  # no network, unknown repository, gated model, ...
        raise ModelUnavailableError(
            f"model: Hugging Face model {repo_id!r} is not cached and could not be downloaded "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Set "
            "`model` in params.yaml to a local Hugging Face folder or a checkpoint path "
            "instead.") from err
    finally:
        socket.setdefaulttimeout(previous)


def checkpoint_path(spec: str) -> Path | None:
    """Where the weights for `spec` lie on disk (a checkpoint file, or a Hugging Face folder or
    cached hub snapshot), or None for a name not yet downloaded."""
    kind = spec_kind(spec)
    if kind in ("checkpoint", "folder"):
        return Path(spec)
    if kind == "name":
        cached = Path(_download_root()) / os.path.basename(whisper._MODELS[spec])
        return cached if cached.is_file() else None
    if kind == "hub":
        return _hub_cached(spec)
    return None


def load_whisper(spec: str, device: str | torch.device = "cpu") -> Whisper:
    """A fp32 Whisper model from a name (downloaded by whisper on first use), a checkpoint
    path, a Hugging Face Whisper folder or hub name (converted from Hugging Face's layout).

    Without network and without cached weights a name fails within seconds, with a message that
    says to set a checkpoint path.
    """
    validate_model_spec(spec)
    kind = spec_kind(spec)
    if kind in ("folder", "hub"):
        folder = Path(spec) if kind == "folder" else _hub_download(spec)
        return hf_folder.load_hf_folder(folder).to(device)
    if checkpoint_path(spec) is None:
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(20)  # a blackholed network must not hang the pipeline
        try:
            return whisper.load_model(spec, device=device).float()
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            raise ModelUnavailableError(
                f"model: Whisper weights for {spec!r} are not cached in {_download_root()} and "
                f"could not be downloaded ({err}). Set `model` in params.yaml to a checkpoint "
                f"path instead (e.g. `dvc exp run -S model=/path/to/{spec}.pt`).") from err
        finally:
            socket.setdefaulttimeout(previous)
    return whisper.load_model(str(checkpoint_path(spec)), device=device).float()


def model_identity(spec: str, model: Whisper) -> dict:
    """What base model an adapter belongs to: name or path, sha256 of the checkpoint file (of a
    Hugging Face folder's weight files) and dimensions."""
    path = checkpoint_path(spec)
    digest = None
    if path is not None and path.is_dir():
        digest = hf_folder.hf_folder_digest(path)
    elif path is not None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
    return {"model": spec, "sha256": digest, "dims": asdict(model.dims)}


def save_whisper_checkpoint(model: Whisper, path: str | Path, half: bool = True) -> None:
    """Write `model` in openai-whisper's format, loadable by `whisper.load_model(path)`."""
    state = {k: (v.half() if half and v.is_floating_point() else v).cpu()
             for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # Through a file object: given a path, torch.save names the archive's top folder after the
    # file's name (a random temporary's, for an atomic write), so the bytes would differ.
    with open(path, "wb") as f:
        torch.save({"dims": asdict(model.dims), "model_state_dict": state}, f)


def random_whisper(dims: ModelDimensions, seed: int = 0) -> Whisper:
    """A randomly initialised Whisper (for tests and smoke runs that need only the architecture).

    PyTorch's default init leaves attention nearly uniform; weights are re-drawn with a wider
    spread so that the encoder's output depends on its input as in a trained model. Every draw
    comes from a generator seeded by `seed`; the global RNG is left as it was.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        model = Whisper(dims)  # its default init is overwritten below
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5 * 2.0, generator=gen)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=gen)
    return model


TINY_TEST_DIMS = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2,
                                 n_audio_layer=2, n_vocab=51864, n_text_ctx=8, n_text_state=64,
                                 n_text_head=2, n_text_layer=1)
