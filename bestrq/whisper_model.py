"""Loading and writing openai-whisper checkpoints, by model name or by path."""

from __future__ import annotations

import hashlib
import os
import socket
import urllib.error
from dataclasses import asdict
from pathlib import Path

import torch
import whisper
from whisper.model import ModelDimensions, Whisper


class ModelUnavailableError(RuntimeError):
    """A Whisper model name that is neither cached nor downloadable here."""


def _download_root() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.getenv("XDG_CACHE_HOME", default), "whisper")


def validate_model_spec(spec: str) -> None:
    """Fail before any work when `spec` is neither a whisper model name nor an existing file."""
    if spec in whisper.available_models() or Path(spec).is_file():
        return
    raise ValueError(f"model: {spec!r} is neither a Whisper model name "
                     f"({', '.join(whisper.available_models())}) nor an existing checkpoint file")


# Whisper's names whose models take 128 mel bins; every other name takes 80.
_128_MEL_NAMES = frozenset({"large-v3", "large-v3-turbo", "turbo"})


def expected_n_mels(spec: str) -> int | None:
    """The mel bins `spec`'s model takes, known without loading its weights (a name, or a
    checkpoint whose dims a memory-mapped load reads); None when that cannot be told cheaply."""
    path = Path(spec)
    if path.is_file():
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            return int(checkpoint["dims"]["n_mels"])
        except Exception:  # an old-format or foreign file: load_whisper will say what is wrong
            return None
    if spec in whisper.available_models():
        return 128 if spec in _128_MEL_NAMES else 80
    return None


def checkpoint_path(spec: str) -> Path | None:
    """Where the checkpoint for `spec` lies on disk, or None for a name not yet downloaded."""
    if Path(spec).is_file():
        return Path(spec)
    if spec in whisper.available_models():
        cached = Path(_download_root()) / os.path.basename(whisper._MODELS[spec])
        return cached if cached.is_file() else None
    return None


def load_whisper(spec: str, device: str | torch.device = "cpu") -> Whisper:
    """A fp32 Whisper model from a name (downloaded by whisper on first use) or a checkpoint path.

    Without network and without cached weights a name fails within seconds, with a message that
    says to set a checkpoint path.
    """
    validate_model_spec(spec)
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
    """What base model an adapter belongs to: name or path, checkpoint sha256 and dimensions."""
    path = checkpoint_path(spec)
    digest = None
    if path is not None:
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
    torch.save({"dims": asdict(model.dims), "model_state_dict": state}, path)


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
