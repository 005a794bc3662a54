"""The run's own knobs, which no other config holds: the base model and the processes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from bestrq.knobs import STEPS_MAX, Text, check, knob
from bestrq.whisper_model import expected_n_mels, validate_model_spec


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
        """The model exists and takes n_mels mel bins."""
        check(self)
        validate_model_spec(self.model)
        model_mels = expected_n_mels(self.model)
        if model_mels is not None and model_mels != self.n_mels:
            raise ValueError(f"n_mels: model {self.model!r} takes {model_mels} mel bins but "
                             f"n_mels is {self.n_mels}; set n_mels: {model_mels}")
