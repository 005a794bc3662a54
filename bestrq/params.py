"""Typed, validated views of params.yaml: the one place where parameter names meet configs.

Training hyper-parameters are top-level keys (so `dvc exp run -S num_codebooks=16` and the
`train --num_codebooks 16` CLI use the same names); each data stage has its own section.
Unknown keys and bad values fail before any work, with a message naming the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from bestrq import features, segment, sources
from bestrq.evaluate import EvaluateConfig
from bestrq.finetune import FinetuneConfig
from bestrq.masking import MaskingConfig
from bestrq.quantizer import QuantizerConfig
from bestrq.train import TrainConfig
from bestrq.whisper_model import expected_n_mels, validate_model_spec

# Top-level keys that are not fields of TrainConfig, with their help text.
MODEL_HELP: dict[str, str] = {
    "model": "Whisper model name (tiny, base.en, ..., large-v3, turbo) or checkpoint path",
    "n_mels": "mel bins of the model's input: 80, or 128 for large-v3 and turbo",
    "nproc": "training processes on this machine (torchrun); 1 runs without torchrun",
    "num_codebooks": "codebooks N (1: BEST-RQ; >1: USM multi-softmax)",
    "codebook_size": "codes per codebook (paper: 8192)",
    "code_dim": "dimension of the random projection and codes (paper: 16)",
    "stack_frames": "10 ms log-mel frames stacked per target (2 = Whisper's 20 ms encoder rate)",
    "mask_prob": "probability that a frame starts a masked span (paper: 0.01)",
    "mask_span_ms": "masked span length in ms (paper: 400 ms = 40 frames)",
    "mask_noise_std": "std of the noise replacing masked frames, normalised space (paper: 0.1)",
    "distill_weight": "weight of the distillation guard: MSE of the adapted to the stock "
                      "encoder's output on the clean input (0: off)",
}
# Help text of TrainConfig's fields, for `train --help`.
TRAIN_HELP: dict[str, str] = {
    "batch_size": "clips per micro-batch per process",
    "accumulate_gradients": "micro-batches per optimiser update",
    "learning_rate": "peak learning rate of AdamW",
    "lr_schedule": "inverse_sqrt (BEST-RQ's Transformer schedule) | cosine | constant",
    "warmup_steps": "optimiser updates of linear warm-up",
    "max_steps": "optimiser updates in the run",
    "min_lr_ratio": "floor of the schedule, as a fraction of learning_rate",
    "weight_decay": "AdamW decay of the heads (never of the IA^3 vectors)",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "adam_eps": "AdamW epsilon",
    "grad_clip": "max global gradient norm; 0 disables clipping",
    "precision": "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32",
    "checkpoint_every": "optimiser updates between checkpoints",
    "keep_checkpoints": "checkpoints kept on disk",
    "log_every": "optimiser updates between logged steps",
    "num_workers": "data-loader worker processes",
    "prefetch_factor": "batches each worker prepares ahead",
    "seed": "seed of the quantizer, data order and masks",
    "device": "auto | cpu | cuda | cuda:N",
    "max_nonfinite": "non-finite updates in a row that stop the run",
}
QUANTIZER_KEYS = {"num_codebooks": "num_codebooks", "codebook_size": "codebook_size",
                  "code_dim": "code_dim", "stack_frames": "stack_frames"}
MASKING_KEYS = {"mask_prob": "mask_prob", "mask_span_ms": "span_ms",
                "mask_noise_std": "noise_std"}
SECTIONS = {"download": sources.SourceConfig, "segment": segment.SegmentConfig,
            "features": features.FeatureConfig, "evaluate": EvaluateConfig,
            "finetune": FinetuneConfig}


@dataclass
class Params:
    model: str
    n_mels: int
    nproc: int
    distill_weight: float
    quantizer: QuantizerConfig
    masking: MaskingConfig
    train: TrainConfig
    download: sources.SourceConfig
    segment: segment.SegmentConfig
    features: features.FeatureConfig
    evaluate: EvaluateConfig
    finetune: FinetuneConfig
    raw: dict[str, Any]  # the flat dict it was built from, for records and fingerprints


def hyperparameter_names() -> list[str]:
    """Every top-level key of params.yaml, in a stable order."""
    return [*MODEL_HELP, *(f.name for f in fields(TrainConfig) if f.name not in MODEL_HELP)]


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        names = ", ".join(where + k for k in unknown)
        raise ValueError(f"params.yaml: unknown parameter(s) {names}; "
                         f"known: {', '.join(sorted(known))}")
    return cls(**values)


def from_dict(raw: dict[str, Any]) -> Params:
    """Build (without validating) the configs from a params.yaml mapping."""
    raw = dict(raw)
    top = {k: v for k, v in raw.items() if k not in SECTIONS}
    names = set(hyperparameter_names())
    unknown = sorted(set(top) - names)
    if unknown:
        raise ValueError(f"params.yaml: unknown top-level parameter(s) {', '.join(unknown)}")
    train_values = {f.name: top[f.name] for f in fields(TrainConfig) if f.name in top}
    quantizer = QuantizerConfig(n_mels=int(top.get("n_mels", 80)),
                                seed=int(top.get("seed", 0)),
                                **{QUANTIZER_KEYS[k]: top[k] for k in QUANTIZER_KEYS if k in top})
    masking = MaskingConfig(**{MASKING_KEYS[k]: top[k] for k in MASKING_KEYS if k in top})
    sections = {name: _build(cls, dict(raw.get(name) or {}), f"{name}.")
                for name, cls in SECTIONS.items()}
    return Params(model=str(top.get("model", "tiny.en")), n_mels=int(top.get("n_mels", 80)),
                  nproc=int(top.get("nproc", 1)),
                  distill_weight=top.get("distill_weight", 0.0), quantizer=quantizer,
                  masking=masking,
                  train=TrainConfig(**train_values), raw=raw, **sections)


def validate(params: Params, stage: str | None = None) -> None:
    """Check the parameters a stage uses (all when `stage` is None); raises ValueError."""
    if stage in (None, "download"):
        sources.validate(params.download)
    if stage in (None, "segment"):
        segment.validate(params.segment)
    if stage in (None, "features"):
        features.validate(params.features)
        if params.n_mels not in features.SUPPORTED_N_MELS:
            raise ValueError(f"n_mels must be one of {sorted(features.SUPPORTED_N_MELS)}, "
                             f"got {params.n_mels}")
    if stage in (None, "pretrain", "evaluate", "finetune"):
        validate_model_spec(params.model)
        model_mels = expected_n_mels(params.model)
        if model_mels is not None and model_mels != params.n_mels:
            raise ValueError(f"n_mels: model {params.model!r} takes {model_mels} mel bins but "
                             f"n_mels is {params.n_mels}; set n_mels: {model_mels}")
        params.quantizer.validate()
        params.masking.validate()
        params.train.validate()
        if params.nproc < 1:
            raise ValueError(f"nproc must be >= 1, got {params.nproc}")
        weight = params.distill_weight
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
            raise ValueError(f"distill_weight must be a number >= 0, got {weight!r}")
    if stage in (None, "evaluate", "finetune"):
        params.evaluate.validate()
    if stage in (None, "finetune"):
        params.finetune.validate(params.train)


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None,
                stage: str | None = None) -> Params:
    """Read, override (top-level keys) and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run from the project root")
    raw = yaml.safe_load(path.read_text()) or {}
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    params = from_dict(raw)
    validate(params, stage)
    return params
