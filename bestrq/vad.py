"""Speech boundaries from silero-vad, the voice-activity detector faster-whisper and WhisperX cut
with (its model ships inside the wheel; CPU). Segment cuts long recordings between utterances
with it instead of at the quietest frame (`segment.cutter`).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from whisper.audio import SAMPLE_RATE

__all__ = ["speech_spans", "vad_cut_point"]


@cache
def _model() -> torch.nn.Module:
    """silero-vad's TorchScript model, loaded once per process."""
    from silero_vad import load_silero_vad

    return load_silero_vad()


def speech_spans(audio: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) sample indices of the speech in 16 kHz mono `audio`, in order."""
    from silero_vad import get_speech_timestamps

    with torch.inference_mode():
        found = get_speech_timestamps(torch.from_numpy(np.ascontiguousarray(audio, np.float32)),
                                      _model(), sampling_rate=SAMPLE_RATE)
    return [(int(s["start"]), int(s["end"])) for s in found]


def vad_cut_point(window: np.ndarray) -> int | None:
    """Sample index in a 16 kHz `window` to cut at: the middle of the longest pause between
    stretches of speech (or before the first / after the last) among those that leave the piece
    at least a third of the window (else among all), so cuts fall between utterances rather than
    at a breath inside one; `len(window)` when the window holds no speech; None when speech
    fills it without a pause (the caller then falls back to the quietest frame)."""
    n = len(window)
    spans = speech_spans(window)
    if not spans:
        return n
    edges = [0, *(x for span in spans for x in span), n]  # pause i: edges[2i] .. edges[2i+1]
    pauses = [(a, b) for a, b in zip(edges[::2], edges[1::2], strict=True) if b > a]
    pauses = [(a, b) for a, b in pauses if (a + b) // 2 > 0]
    if not pauses:
        return None
    late = [(a, b) for a, b in pauses if (a + b) // 2 >= n // 3] or pauses
    a, b = max(late, key=lambda p: (p[1] - p[0], p[0]))
    return (a + b) // 2
