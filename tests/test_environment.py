"""The installed environment: torchaudio's compiled code loads beside this torch and computes
what it should, and the lock file pins the pair that does."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torchaudio

REPO = Path(__file__).resolve().parents[1]


def test_torchaudio_resamples_with_its_compiled_kernels():
    # A torch/torchaudio pair built apart fails here (`undefined symbol` when libtorchaudio
    # loads), not only at import: run real kernels and compare them with the sine they must give.
    rate_in, rate_out, hz = 22050, 16000, 440.0
    t_in = torch.arange(rate_in, dtype=torch.float64) / rate_in
    wave = torch.sin(2 * math.pi * hz * t_in)
    out = torchaudio.functional.resample(wave, rate_in, rate_out)
    assert out.shape == (rate_out,)
    t_out = torch.arange(rate_out, dtype=torch.float64) / rate_out
    reference = torch.sin(2 * math.pi * hz * t_out)
    inner = slice(200, rate_out - 200)  # away from the edges, where the filter sees zeros
    assert float((out[inner] - reference[inner]).abs().max()) < 2e-3
    # torchaudio's C++ extension itself (the library that fails to load on a broken pair).
    assert torchaudio._extension._IS_TORCHAUDIO_EXT_AVAILABLE  # type: ignore[attr-defined]
    spec = torchaudio.transforms.MelSpectrogram(sample_rate=rate_out, n_mels=8)(out.float())
    assert spec.shape[0] == 8 and int(spec.sum(dim=1).argmax()) < 4  # 440 Hz: a low band


def _pinned(name: str) -> str:
    text = (REPO / "requirements.lock").read_text()
    found = re.findall(rf"^{re.escape(name)}==([^\s;]+)", text, flags=re.M)
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


def test_the_lock_pins_the_installed_tested_pair():
    assert _pinned("torchaudio") != "2.11.1"  # fails to import with torch 2.11.0 and 2.12.1
    assert _pinned("torch").split(".")[:2] == _pinned("torchaudio").split(".")[:2]
    assert torch.__version__.split("+")[0] == _pinned("torch")
    assert torchaudio.__version__.split("+")[0] == _pinned("torchaudio")
