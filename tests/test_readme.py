"""README's "Use the adapted model" examples, run as written on a clip of the project's own
synthetic corpus (espeak's 22.05 kHz, so resampling is part of what is tested), each with the
model it names exported from the real tiny.en."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jiwer
import pytest
import soundfile as sf
import torch
from whisper.normalizers import EnglishTextNormalizer

from bestrq.adapter import export_merged, save_vectors
from bestrq.adapters.ia3 import add_ia3, ia3_state_dict
from bestrq.peft_adapter import export_peft
from bestrq.synth import EspeakSynthesizer
from bestrq.whisper_model import load_whisper, model_identity

REPO = Path(__file__).resolve().parents[1]
SPOKEN = "please call stella and ask her to bring these things with her from the store"


def readme_blocks() -> dict[str, str]:
    """The Python blocks of README's "Use the adapted model", by the API each one uses."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Use the adapted model"):text.index("### Hugging Face base")]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    kinds = {"openai": "whisper.load_model(", "hf_pipeline": "pipeline(",
             "hf_steps": "WhisperProcessor", "ct2": "faster_whisper", "peft": "PeftModel"}
    found = {kind: [b for b in blocks if marker in b] for kind, marker in kinds.items()}
    assert all(len(v) == 1 for v in found.values()), found
    return {kind: v[0] for kind, v in found.items()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder holding clip.wav (the corpus' rate) and the exports README's code names, from
    tiny.en with slightly non-trivial encoder vectors: merged (three formats), and as a PEFT
    adapter beside the stock Hugging Face base."""
    from conftest import TINY_EN

    if not TINY_EN.is_file():
        pytest.skip(f"real tiny.en checkpoint not found at {TINY_EN} (set BESTRQ_TINY_EN)")
    pytest.importorskip("transformers")
    pytest.importorskip("faster_whisper")
    work = tmp_path_factory.mktemp("readme")
    audio, rate = EspeakSynthesizer().synthesize(SPOKEN)
    assert rate != 16000  # the corpus is not at Whisper's rate: the examples must resample
    sf.write(work / "clip.wav", audio, rate)
    model = load_whisper(str(TINY_EN))
    add_ia3(model.encoder)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for v in ia3_state_dict(model.encoder).values():
            v.copy_(1.0 + 0.01 * torch.randn(v.shape, generator=g))
    vectors = work / "adapter-only.safetensors"
    save_vectors(vectors, model, model_identity(str(TINY_EN), model))
    export_merged(vectors, str(TINY_EN), work / "tiny.en-adapted.pt")
    export_merged(vectors, str(TINY_EN), work / "tiny.en-adapted-hf", "hf")
    export_merged(vectors, str(TINY_EN), work / "tiny.en-adapted-ct2", "ct2", "int8")
    export_merged(None, str(TINY_EN), work / "tiny.en-hf", "hf")
    export_peft(vectors, work / "tiny.en-adapted-peft")
    return work


@pytest.mark.parametrize("kind", ["openai", "hf_pipeline", "hf_steps", "ct2", "peft"])
def test_readme_example_transcribes_a_corpus_clip(kind: str, workdir: Path) -> None:
    code = readme_blocks()[kind]
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout.strip().splitlines()[-1]
    normalize = EnglishTextNormalizer()
    wer = jiwer.wer(normalize(SPOKEN), normalize(printed))
    # tiny.en reads espeak well at 16 kHz; unresampled 22.05 kHz audio gives nonsense (WER ~1).
    assert wer < 0.3, f"{kind}: {printed!r} (WER {wer:.2f})"
