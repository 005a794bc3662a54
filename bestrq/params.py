"""Typed, validated views of params.yaml: the one place where parameter names meet configs.

Training hyper-parameters are top-level keys (so `dvc exp run -S num_codebooks=16` and the
`train --num_codebooks 16` CLI use the same names); each data stage has its own section.

Checking happens in two steps, both before any work:
1. declared types and ranges (`TopLevel` and one pydantic model per section, strict: no bool
   for a number, no float for an integer, no text for either), with messages that name the key;
2. what needs more than one value or the outside world (`validate`: the model exists, n_mels
   matches it, the configs' own `validate`).
params.yaml stays the one source of values; the library's configs (dataclasses) are built from
the checked values.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bestrq import features, segment, sources
from bestrq.adapters import KINDS, TARGETS, AdapterConfig
from bestrq.evaluate import EvaluateConfig
from bestrq.finetune import FinetuneConfig
from bestrq.masking import MaskingConfig
from bestrq.params_file import quote, read_yaml
from bestrq.quantizer import QuantizerConfig
from bestrq.train import TrainConfig
from bestrq.whisper_model import expected_n_mels, validate_model_spec

# Top-level keys that are not fields of TrainConfig, with their help text.
MODEL_HELP: dict[str, str] = {
    "model": "Whisper model name (tiny, base.en, ..., large-v3, turbo), checkpoint path, or "
             "Hugging Face Whisper folder or hub name (openai/whisper-small)",
    "n_mels": "mel bins of the model's input: 80, or 128 for large-v3 and turbo",
    "nproc": "training processes on this machine (torchrun); 1 runs without torchrun",
    "nnodes": "machines in the run, nproc processes each (torchrun; this machine's rank and "
              "node 0's address: BESTRQ_NODE_RANK, BESTRQ_MASTER_ADDR)",
    "heldout_every": "every this many updates (and at the last), the BEST-RQ loss and accuracy "
                     "on the dev split beside the label prior's (dev/ curves); 0: never",
    "num_codebooks": "codebooks N (1: BEST-RQ; >1: USM multi-softmax)",
    "codebook_size": "codes per codebook (paper: 8192)",
    "code_dim": "dimension of the random projection and codes (paper: 16)",
    "stack_frames": "10 ms log-mel frames stacked per target (2 = Whisper's 20 ms encoder rate)",
    "mask_prob": "probability that a frame starts a masked span (paper: 0.01)",
    "mask_span_ms": "masked span length in ms (paper: 400 ms = 40 frames)",
    "mask_noise_std": "std of the noise replacing masked frames, normalised space (paper: 0.1)",
    "mask_target_share": "share of a target's stacked frames that must be masked for it to be "
                         "predicted (1.0: all; 0.5 with 2 stacked frames: any one)",
    "quantizer_norm": "statistics of the quantizer's input: utterance (each clip's own: "
                      "targets do not follow the recording level) | global (the train split's)",
    "distill_weight": "weight of the distillation guard: MSE of the adapted to the stock "
                      "encoder's output on the clean input (0: off)",
    "distill_layers": "encoder blocks whose outputs are distilled to the stock encoder's (a "
                      "list; negative counts from the top; [-1]: the encoder's output)",
    "distill_padding": "the distillation counts padded frames too (Whisper's decoder attends "
                       "to them)",
    "bestrq_layer": "encoder block whose output feeds the BEST-RQ heads (negative counts from "
                    "the top; -1: the last; BEARD: a middle block, the upper ones distilled)",
    "adapter": "what is trained, in pre-training (encoder) and the fine-tune (encoder and "
               "decoder): ia3 (vectors on k, v, FFN) | lora (PEFT's LoRA on lora_targets)",
    "lora_rank": "LoRA's rank r (PEFT's Whisper recipe: 32)",
    "lora_alpha": "LoRA's alpha: the update is scaled by alpha / r",
    "lora_targets": "Linears LoRA adapts, in every block (a list of query, key, value, out, "
                    "fc1, fc2; attention targets in self- and cross-attention)",
}
# Help text of TrainConfig's fields, for `train --help`.
TRAIN_HELP: dict[str, str] = {
    "batch_size": "clips per micro-batch per process",
    "accumulate_gradients": "micro-batches per optimiser update",
    "learning_rate": "peak learning rate of AdamW",
    "lr_schedule": "inverse_sqrt (BEST-RQ's Transformer schedule) | cosine | constant",
    "warmup_steps": "linear warm-up: a share of max_steps (below 1) or updates (>= 1)",
    "max_steps": "optimiser updates in the run",
    "min_lr_ratio": "floor of the schedule, as a fraction of learning_rate",
    "heads_only_steps": "first updates that train the heads alone, as a share of max_steps "
                        "(below 1) or updates (>= 1); the IA^3 schedule starts after them",
    "weight_decay": "AdamW decay of the heads (never of the IA^3 vectors)",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "adam_eps": "AdamW epsilon",
    "grad_clip": "max global gradient norm; 0 disables clipping",
    "precision": "auto (bf16 autocast on CUDA and on CPUs with AVX-512 BF16 or AMX, fp32 "
                 "elsewhere) | bf16 | fp32",
    "checkpoint_every": "optimiser updates between checkpoints",
    "keep_checkpoints": "checkpoints kept on disk",
    "log_every": "optimiser updates between logged steps",
    "num_workers": "data-loader worker processes",
    "prefetch_factor": "batches each worker prepares ahead",
    "seed": "seed of the quantizer, data order and masks",
    "device": "auto | cpu | cuda | cuda:N",
    "max_nonfinite": "non-finite updates in a row that stop the run",
    "deterministic": "CUDA: deterministic kernels, bitwise-repeatable GPU runs (slower)",
}
QUANTIZER_KEYS = {"num_codebooks": "num_codebooks", "codebook_size": "codebook_size",
                  "code_dim": "code_dim", "stack_frames": "stack_frames",
                  "quantizer_norm": "norm"}
MASKING_KEYS = {"mask_prob": "mask_prob", "mask_span_ms": "span_ms",
                "mask_noise_std": "noise_std", "mask_target_share": "target_share"}
# Knobs that change how fast a run goes or what it logs, not what it computes, in any section
# (matched on a key's last dotted part): a checkpoint made under other values is still resumed.
# Every other knob a run reads is part of its checkpoints' identity (pretrain and finetune).
SPEED_ONLY = ("num_workers", "prefetch_factor", "log_every", "checkpoint_every",
              "keep_checkpoints", "device", "heldout_every")
SECTIONS = {"download": sources.SourceConfig, "segment": segment.SegmentConfig,
            "features": features.FeatureConfig, "evaluate": EvaluateConfig,
            "finetune": FinetuneConfig}

# ----------------------------------------------------------------------------- declarations
# Upper bounds catch typos and unit mix-ups (a count in samples, a rate in percent) before a
# run allocates or schedules something absurd; they are far above any real use.
SEED_MAX = 2**63 - 1  # torch.manual_seed and numpy's SeedSequence take it; negatives they do not
STEPS_MAX = 10**9
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
Steps = Annotated[int, Field(ge=1, le=STEPS_MAX)]
Workers = Annotated[int, Field(ge=0, le=1024)]
Schedule = Literal["inverse_sqrt", "cosine", "constant"]
Text = Annotated[str, Field(min_length=1)]
# A length in updates (>= 1) or a share of max_steps (below 1): `schedule.updates`.
Length = Annotated[float, Field(ge=0, le=STEPS_MAX)]
# Declared once for the knobs that several sections set (pre-training at the top level, the
# fine-tune under `finetune:`, evaluation and features).
BatchSize = Annotated[int, Field(ge=1, le=65536)]
Accumulate = Annotated[int, Field(ge=1, le=2**20)]
LearningRate = Annotated[float, Field(gt=0, le=10.0)]
Ratio = Annotated[float, Field(ge=0, le=1)]
ClipCount = Annotated[int, Field(ge=0, le=10**9)]  # 0: no limit

_TRAIN = TrainConfig()
_ADAPTER = AdapterConfig()
_QUANTIZER = QuantizerConfig()
_MASKING = MaskingConfig()
_SOURCE = sources.SourceConfig()
_SEGMENT = segment.SegmentConfig()
_FEATURES = features.FeatureConfig()
_EVALUATE = EvaluateConfig()
_FINETUNE = FinetuneConfig()


class _Section(BaseModel):
    # strict: YAML's 2.5, true and '0.5' stay what they are instead of becoming 2, 1 and 0.5.
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class DownloadParams(_Section):
    source: Text = _SOURCE.source
    num_utterances: Annotated[int, Field(ge=1, le=10**7)] = _SOURCE.num_utterances
    num_speakers: Annotated[int, Field(ge=1, le=10**4)] = _SOURCE.num_speakers
    seed: Seed = _SOURCE.seed
    checksum: str = _SOURCE.checksum
    watch: Text = _SOURCE.watch
    max_extract_gb: Annotated[float, Field(gt=0, le=10**6)] = _SOURCE.max_extract_gb
    max_ratio: Annotated[float, Field(ge=1, le=10**6)] = _SOURCE.max_ratio
    max_download_gb: Annotated[float, Field(gt=0, le=10**6)] | None = _SOURCE.max_download_gb


class SegmentParams(_Section):
    max_seconds: Annotated[float, Field(gt=0, le=30.0)] = _SEGMENT.max_seconds
    min_seconds: Annotated[float, Field(ge=0, lt=30.0)] = _SEGMENT.min_seconds
    pack: bool = _SEGMENT.pack
    dev_fraction: Annotated[float, Field(gt=0, lt=1)] = _SEGMENT.dev_fraction
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = _SEGMENT.test_fraction
    transcribed_share: Ratio = _SEGMENT.transcribed_share
    seed: Seed = _SEGMENT.seed
    num_workers: Workers = _SEGMENT.num_workers


class FeaturesParams(_Section):
    batch_size: BatchSize = _FEATURES.batch_size
    shard_size: Annotated[int, Field(ge=1, le=10**8)] = _FEATURES.shard_size
    dtype: Literal["float16", "float32"] = _FEATURES.dtype  # type: ignore[assignment]
    device: Text = _FEATURES.device


class EvaluateParams(_Section):
    batch_size: BatchSize = _EVALUATE.batch_size
    max_clips: ClipCount = _EVALUATE.max_clips
    seed: Seed = _EVALUATE.seed
    num_workers: Workers = _EVALUATE.num_workers
    asr: bool = _EVALUATE.asr
    asr_max_clips: ClipCount = _EVALUATE.asr_max_clips
    asr_batch_size: BatchSize = _EVALUATE.asr_batch_size
    language: Text = _EVALUATE.language
    bootstrap_samples: Annotated[int, Field(ge=100, le=10**7)] = _EVALUATE.bootstrap_samples
    bootstrap_unit: Literal["speaker", "window"] = _EVALUATE.bootstrap_unit  # type: ignore
    decoding: Literal["fallback", "greedy"] = _EVALUATE.decoding  # type: ignore
    probes: bool = _EVALUATE.probes
    probe_frames: Annotated[int, Field(ge=1, le=10**7)] = _EVALUATE.probe_frames
    probe_clusters: Annotated[int, Field(ge=2, le=10**5)] = _EVALUATE.probe_clusters


class FinetuneParams(_Section):
    max_clips: ClipCount = _FINETUNE.max_clips
    max_minutes: Annotated[float, Field(ge=0, le=10**8)] = _FINETUNE.max_minutes
    batch_size: BatchSize = _FINETUNE.batch_size
    accumulate_gradients: Accumulate = _FINETUNE.accumulate_gradients
    learning_rate: LearningRate = _FINETUNE.learning_rate
    lr_schedule: Schedule = _FINETUNE.lr_schedule  # type: ignore[assignment]
    warmup_steps: Length = _FINETUNE.warmup_steps
    max_steps: Steps = _FINETUNE.max_steps
    min_lr_ratio: Ratio = _FINETUNE.min_lr_ratio
    checkpoint_every: Steps = _FINETUNE.checkpoint_every
    seeds: Annotated[list[Seed], Field(min_length=1, max_length=100)] = _FINETUNE.seeds


class TopLevel(_Section):
    """Every key of params.yaml: the training hyper-parameters and one field per section."""

    model: Text = "tiny.en"
    n_mels: Annotated[int, Field(ge=1, le=1024)] = _QUANTIZER.n_mels
    nproc: Annotated[int, Field(ge=1, le=1024)] = 1
    nnodes: Annotated[int, Field(ge=1, le=65536)] = 1
    heldout_every: Annotated[int, Field(ge=0, le=STEPS_MAX)] = 5
    num_codebooks: Annotated[int, Field(ge=1, le=64)] = _QUANTIZER.num_codebooks
    codebook_size: Annotated[int, Field(ge=1, le=2**20)] = _QUANTIZER.codebook_size
    code_dim: Annotated[int, Field(ge=1, le=4096)] = _QUANTIZER.code_dim
    stack_frames: Annotated[int, Field(ge=1, le=64)] = _QUANTIZER.stack_frames
    mask_prob: Annotated[float, Field(gt=0, le=1)] = _MASKING.mask_prob
    mask_span_ms: Annotated[float, Field(gt=0, le=30_000)] = _MASKING.span_ms
    mask_noise_std: Annotated[float, Field(ge=0, le=100)] = _MASKING.noise_std
    mask_target_share: Annotated[float, Field(gt=0, le=1)] = _MASKING.target_share
    quantizer_norm: Literal["utterance", "global"] = _QUANTIZER.norm  # type: ignore[assignment]
    distill_weight: Annotated[float, Field(ge=0, le=10**6)] = 0.0
    distill_layers: Annotated[list[Annotated[int, Field(ge=-1024, le=1023)]],
                              Field(min_length=1, max_length=1024)] = [-1]
    distill_padding: bool = False
    bestrq_layer: Annotated[int, Field(ge=-1024, le=1023)] = -1
    adapter: Literal[KINDS] = _ADAPTER.kind  # type: ignore[valid-type]
    lora_rank: Annotated[int, Field(ge=1, le=4096)] = _ADAPTER.lora_rank
    lora_alpha: Annotated[float, Field(gt=0, le=10**6)] = _ADAPTER.lora_alpha
    lora_targets: Annotated[list[Literal[tuple(TARGETS)]],  # type: ignore[valid-type]
                            Field(min_length=1, max_length=len(TARGETS))] = \
        list(_ADAPTER.lora_targets)
    batch_size: BatchSize = _TRAIN.batch_size
    accumulate_gradients: Accumulate = _TRAIN.accumulate_gradients
    learning_rate: LearningRate = _TRAIN.learning_rate
    lr_schedule: Schedule = _TRAIN.lr_schedule  # type: ignore[assignment]
    warmup_steps: Length = _TRAIN.warmup_steps
    max_steps: Steps = _TRAIN.max_steps
    min_lr_ratio: Ratio = _TRAIN.min_lr_ratio
    heads_only_steps: Length = _TRAIN.heads_only_steps
    weight_decay: Annotated[float, Field(ge=0, le=100)] = _TRAIN.weight_decay
    adam_beta1: Annotated[float, Field(ge=0, lt=1)] = _TRAIN.adam_beta1
    adam_beta2: Annotated[float, Field(ge=0, lt=1)] = _TRAIN.adam_beta2
    adam_eps: Annotated[float, Field(gt=0, le=1)] = _TRAIN.adam_eps
    grad_clip: Annotated[float, Field(ge=0, le=10**6)] = _TRAIN.grad_clip
    precision: Literal["auto", "bf16", "fp32"] = _TRAIN.precision  # type: ignore[assignment]
    checkpoint_every: Steps = _TRAIN.checkpoint_every
    keep_checkpoints: Annotated[int, Field(ge=1, le=1000)] = _TRAIN.keep_checkpoints
    log_every: Steps = _TRAIN.log_every
    num_workers: Workers = _TRAIN.num_workers
    prefetch_factor: Annotated[int, Field(ge=1, le=1024)] = _TRAIN.prefetch_factor
    seed: Seed = _TRAIN.seed
    device: Text = _TRAIN.device
    max_nonfinite: Annotated[int, Field(ge=1, le=10**6)] = _TRAIN.max_nonfinite
    deterministic: bool = _TRAIN.deterministic
    download: DownloadParams = Field(default_factory=DownloadParams)
    segment: SegmentParams = Field(default_factory=SegmentParams)
    features: FeaturesParams = Field(default_factory=FeaturesParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)


SECTION_MODELS: dict[str, type[_Section]] = {
    "download": DownloadParams, "segment": SegmentParams, "features": FeaturesParams,
    "evaluate": EvaluateParams, "finetune": FinetuneParams}


def expected(model: type[BaseModel], name: str) -> str:
    """What `model.name` must be, in words: "an integer in [1, 64]", "true or false", ..."""
    info = model.model_fields[name]
    kind = info.annotation
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(str(v) for v in get_args(kind))
    if get_origin(kind) is list:
        item = get_args(kind)[0]
        item = get_args(item)[0] if get_origin(item) is Annotated else item
        if get_origin(item) is Literal:
            return "a non-empty list of distinct names among " + ", ".join(get_args(item))
        return "a non-empty list of distinct integers (see its help for the range)"
    if kind is bool:
        return "true or false"
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return f"a mapping of {name} parameters"
    bounds: dict[str, Any] = {}
    for item in info.metadata:  # annotated_types' Ge, Gt, Le, Lt, MinLen
        for attr in ("ge", "gt", "le", "lt", "min_length"):
            if getattr(item, attr, None) is not None:
                bounds[attr] = getattr(item, attr)
    if kind is str:
        return "a non-empty string" if bounds.get("min_length") else "a string"
    noun = "an integer" if kind is int else "a number"

    def show(v: float) -> str:
        return str(v) if isinstance(v, int) else f"{v:g}"

    low = ("[", show(bounds["ge"])) if "ge" in bounds else \
        ("(", show(bounds["gt"])) if "gt" in bounds else None
    high = (show(bounds["le"]), "]") if "le" in bounds else \
        (show(bounds["lt"]), ")") if "lt" in bounds else None
    if low and high:
        return f"{noun} in {low[0]}{low[1]}, {high[0]}{high[1]}"
    if low:
        return f"{noun} {'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f"{noun} {'<=' if high[1] == ']' else '<'} {high[0]}"
    return noun


def _hint(value: Any, want: str) -> str:
    # YAML 1.1 reads 3e-4 (no dot) as text; quoting a number does the same.
    if not isinstance(value, str) or not want.startswith(("an integer", "a number")):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    if re.fullmatch(r"[+-]?\d+[eE][+-]?\d+", value.strip()):
        return f" (YAML reads {value} as text: write it with a dot, e.g. 1.0e-4)"
    return " (text, not a number: remove the quotes)"


def _messages(err: ValidationError, origin: dict[str, str], source: str) -> list[str]:
    """One line per problem, each naming the dotted key and where its value came from."""
    lines = []
    for item in err.errors():
        # An item of a top-level list (lora_targets.1) is reported as the list's key.
        loc = [str(part) for part in item["loc"]
               if not (isinstance(part, int) and item["loc"][0] not in SECTION_MODELS)]
        key = ".".join(loc)
        where = origin.get(key, source)
        owner: type[BaseModel] = TopLevel
        if len(loc) == 2:
            owner = SECTION_MODELS[loc[0]]
        if item["type"] == "extra_forbidden":
            known = sorted(owner.model_fields)
            close = difflib.get_close_matches(loc[-1], known, n=1)
            guess = f" (did you mean {close[0]}?)" if close else ""
            lines.append(f"{where}: unknown parameter {key}{guess}; known: {', '.join(known)}")
            continue
        want = expected(owner, loc[-1])
        value = item["input"]
        lines.append(f"{where}: {key}: must be {want}, got {quote(value)}{_hint(value, want)}")
    return lines


def check_types(raw: Any, origin: dict[str, str] | None = None,
                source: str = "params.yaml") -> dict[str, Any]:
    """The values of a params.yaml mapping, every key present (defaults filled in), after the
    declared type and range checks. ValueError with one line per bad key otherwise, each
    starting with where the value came from: `origin[key]` (e.g. "command line") or `source`."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: must be a mapping of parameters, got {quote(raw)}")
    _check_keys(raw, source)
    # An empty section (`download:` alone) reads as null: it means "all defaults".
    raw = {k: ({} if k in SECTIONS and v is None else v) for k, v in raw.items()}
    try:
        top = TopLevel.model_validate(raw).model_dump()
    except ValidationError as err:
        raise ValueError("\n".join(_messages(err, origin or {}, source))) from None
    _check_paths(top, source)
    return top


# ----------------------------------------------------------------------------- configs


@dataclass
class Params:
    model: str
    n_mels: int
    nproc: int
    nnodes: int
    heldout_every: int
    distill_weight: float
    distill_layers: list[int]
    distill_padding: bool
    bestrq_layer: int
    adapter: AdapterConfig
    quantizer: QuantizerConfig
    masking: MaskingConfig
    train: TrainConfig
    download: sources.SourceConfig
    segment: segment.SegmentConfig
    features: features.FeatureConfig
    evaluate: EvaluateConfig
    finetune: FinetuneConfig
    raw: dict[str, Any]  # the checked values, every key present, for records and fingerprints


def hyperparameter_names() -> list[str]:
    """Every top-level key of params.yaml, in a stable order."""
    return [*MODEL_HELP, *(f.name for f in fields(TrainConfig) if f.name not in MODEL_HELP)]


def from_dict(raw: dict[str, Any], origin: dict[str, str] | None = None,
              source: str = "params.yaml") -> Params:
    """Check the declared types and ranges of a params.yaml mapping and build the configs
    (ValueError naming every bad key); `validate` does the checks beyond one value."""
    top = check_types(raw, origin, source)
    train_values = {f.name: top[f.name] for f in fields(TrainConfig)}
    quantizer = QuantizerConfig(n_mels=top["n_mels"], seed=top["seed"],
                                **{QUANTIZER_KEYS[k]: top[k] for k in QUANTIZER_KEYS})
    masking = MaskingConfig(**{MASKING_KEYS[k]: top[k] for k in MASKING_KEYS})
    sections = {name: cls(**top[name]) for name, cls in SECTIONS.items()}
    return Params(model=top["model"], n_mels=top["n_mels"], nproc=top["nproc"],
                  nnodes=top["nnodes"], heldout_every=top["heldout_every"],
                  distill_weight=top["distill_weight"], distill_layers=top["distill_layers"],
                  distill_padding=top["distill_padding"], bestrq_layer=top["bestrq_layer"],
                  adapter=AdapterConfig(top["adapter"], top["lora_rank"], top["lora_alpha"],
                                        tuple(top["lora_targets"])),
                  quantizer=quantizer, masking=masking,
                  train=TrainConfig(**train_values), raw=top, **sections)


def validate(params: Params, stage: str | None = None) -> None:
    """Check the parameters a stage uses (all when `stage` is None) beyond their declared types
    and ranges; raises ValueError."""
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
        params.adapter.validate()
        params.train.validate()
    if stage in (None, "evaluate", "finetune"):
        params.evaluate.validate()
    if stage in (None, "finetune"):
        params.finetune.validate(params.train)


MAX_PATH_BYTES, MAX_NAME_BYTES = 4096, 255  # Linux's PATH_MAX and NAME_MAX
PATH_KEYS = ("model", "download.source", "download.watch")


def _check_keys(raw: dict, source: str) -> None:
    """Every key a name: a number, null or list as a key is named, not a KeyError later."""
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ValueError(f"{source}: key {quote(key)} ({type(key).__name__}): parameter "
                             "names are text")
        if isinstance(value, dict):
            for inner in value:
                if not isinstance(inner, str):
                    raise ValueError(f"{source}: {key}: key {quote(inner)} "
                                     f"({type(inner).__name__}): parameter names are text")


def _check_paths(top: dict[str, Any], source: str) -> None:
    """Paths the file system cannot hold are an error naming the key, not an OSError later."""
    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        value = top[section][name] if section else top[name]
        encoded = value.encode("utf-8", "surrogateescape")
        longest = max((len(p) for p in encoded.split(b"/")), default=0)
        if len(encoded) > MAX_PATH_BYTES or longest > MAX_NAME_BYTES:
            raise ValueError(f"{source}: {key}: {quote(value)} is too long for a path "
                             f"({len(encoded)} bytes, a name of {longest}; at most "
                             f"{MAX_PATH_BYTES} and {MAX_NAME_BYTES})")


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None,
                stage: str | None = None) -> Params:
    """Read, override (top-level keys, e.g. from the command line) and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run from the project root")
    raw = read_yaml(path)
    raw = {} if raw is None else raw
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if isinstance(raw, dict):
        raw.update(given)
    params = from_dict(raw, dict.fromkeys(given, "command line"), path.name)
    validate(params, stage)
    return params
