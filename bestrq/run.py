"""The run's own knobs, which no other config holds: the base model and the processes.

Declarations only: the features stage reads n_mels from here, so this file imports no model
code (whether the model exists and takes n_mels bins is checked by `bestrq.params.validate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from bestrq.knobs import STEPS_MAX, Text, check, knob


@dataclass
class RunConfig:
    """The run's own knobs, which no library config holds: the base model and the processes."""

    model: Annotated[Text, knob(
        "Whisper model name (tiny, base.en, ..., large-v3, turbo), checkpoint path, or Hugging "
        "Face Whisper folder or hub name (openai/whisper-small)")] = "tiny.en"
    n_mels: Annotated[int, knob(
        "mel bins of the model's input: 80, or 128 for large-v3 and turbo", ge=1, le=1024)] = 80
    nproc: Annotated[int, knob(
        "training processes on this machine (torchrun); 1 runs without torchrun",
        ge=1, le=1024)] = 1
    nnodes: Annotated[int, knob(
        "machines in the run, nproc processes each (torchrun; this machine's rank and node 0's "
        "address: BESTRQ_NODE_RANK, BESTRQ_MASTER_ADDR)", ge=1, le=65536)] = 1
    heldout_every: Annotated[int, knob(
        "every this many updates (and at the last), the BEST-RQ loss and accuracy on the dev "
        "split beside the label prior's (dev/ curves); 0: never", speed_only=True,
        ge=0, le=STEPS_MAX)] = 5

    def validate(self) -> None:
        """The declared types and ranges (the model itself: `bestrq.params.validate`)."""
        check(self)
