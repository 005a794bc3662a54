"""Shared fixtures: a small random Whisper and, where present, the real tiny.en checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bestrq.whisper_model import TINY_TEST_DIMS, random_whisper, save_whisper_checkpoint

REPO = Path(__file__).resolve().parents[1]
# .ci/run sets BESTRQ_TINY_EN; a developer checkout finds the file beside the repository.
TINY_EN = Path(os.environ.get("BESTRQ_TINY_EN", REPO.parent / "shared" / "models" / "tiny.en.pt"))


@pytest.fixture
def tiny_whisper():
    """A small random Whisper (2 layers, d=64) with the real 80-mel, 3000-frame input."""
    return random_whisper(TINY_TEST_DIMS, seed=0)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random Whisper saved in openai-whisper's format: a `model` that passes the params
    check (it loads as weights alone) without the real weights."""
    path = tmp_path_factory.mktemp("model") / "random.pt"
    save_whisper_checkpoint(random_whisper(TINY_TEST_DIMS, seed=0), path, half=False)
    return path


@pytest.fixture
def tiny_en_path() -> Path:
    if not TINY_EN.is_file():
        pytest.skip(f"real tiny.en checkpoint not found at {TINY_EN} (set BESTRQ_TINY_EN)")
    return TINY_EN


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
