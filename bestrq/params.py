"""params.yaml composed from the configs' knobs: the one place where its layout meets them.

Each knob is declared once, beside the code that uses it (`bestrq.knobs`: type, bounds, help,
speed-only). The knobs of the `TOP` configs are params.yaml's top-level keys (so
`dvc exp run -S num_codebooks=16` and `train --num_codebooks 16` use the same names); each
data stage's config is a section (`SECTIONS`). A knob keeps its name from params.yaml to the
config field.

Checking happens in two steps, both before any work:
1. declared types and ranges (`TopLevel`, composed here and checked by `bestrq.params_layout`;
   strict: no bool for a number, no float for an integer, no text for either), with messages
   that name the key and where its value came from;
2. what needs more than one value or the outside world (`validate`: the model exists, n_mels
   matches it, the configs' own `validate`).

This module imports every config, so only the stages that read them all (pretrain, evaluate,
finetune, report, the check stage) use it; a data stage reads its own sections through
`bestrq.params_layout.read_configs` and depends on no training code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bestrq import features, segment, sources
from bestrq.adapters import AdapterConfig
from bestrq.evaluate import EvaluateConfig
from bestrq.finetune import FinetuneConfig
from bestrq.knobs import Section, declared, model_of, speed_only
from bestrq.masking import MaskingConfig
from bestrq.model import HEAD_TRAINING_BYTES, LossConfig, heads_numbers
from bestrq.params_layout import build, check_layout, compose, read_file
from bestrq.quantizer import QuantizerConfig
from bestrq.run import RunConfig
from bestrq.train import TrainConfig
from bestrq.whisper_model import encoder_shape, expected_n_mels, validate_model_spec

# The configs whose knobs are params.yaml's top-level keys (one flat namespace: the names work
# in `dvc exp run -S name=value` and `train --name value`), and the sections'.
TOP = {"run": RunConfig, "quantizer": QuantizerConfig, "masking": MaskingConfig,
       "loss": LossConfig, "adapter": AdapterConfig, "train": TrainConfig}
SECTIONS = {"download": sources.SourceConfig, "segment": segment.SegmentConfig,
            "features": features.FeatureConfig, "evaluate": EvaluateConfig,
            "finetune": FinetuneConfig}
SECTION_MODELS: dict[str, type[Section]] = {name: model_of(cls) for name, cls in SECTIONS.items()}


def _compose() -> type[Section]:
    """The pydantic model of all of params.yaml, from the configs' declarations."""
    top: dict[str, tuple[Any, Any]] = {}
    for cls in TOP.values():
        for name, spec in declared(cls).items():
            if name in top:
                raise TypeError(f"knob {name} is declared twice ({cls.__name__} and another "
                                "top-level config): a knob has one declaration")
            top[name] = spec
    # Adapter files (format 1) record the values in this model's order, which put
    # quantizer_norm after the masking knobs before the knobs moved into the configs; kept, so
    # that a run's bytes do not change. Nothing else reads the order.
    order = [name for name in top if name != "quantizer_norm"]
    order.insert(order.index("mask_target_share") + 1, "quantizer_norm")
    return compose("TopLevel", {name: top[name] for name in order}, SECTIONS)


TopLevel = _compose()


def _speed_only() -> tuple[str, ...]:
    """The names of the knobs declared speed-only. Run identity matches them on a key's last
    dotted part, so a name must be speed-only in every config that declares it, or in none."""
    flags: dict[str, set[bool]] = {}
    for model in (TopLevel, *SECTION_MODELS.values()):
        for name, info in model.model_fields.items():
            if name not in SECTIONS:
                flags.setdefault(name, set()).add(speed_only(info))
    mixed = sorted(name for name, seen in flags.items() if len(seen) > 1)
    if mixed:
        raise TypeError(f"knobs {mixed} are speed-only in one config and not in another")
    return tuple(sorted(name for name, seen in flags.items() if True in seen))


# Knobs that change how fast a run goes or what it logs, not what it computes: a checkpoint
# made under other values is still resumed. Every other knob a run reads is part of its
# checkpoints' identity (pretrain and finetune: `bestrq.run_identity`).
SPEED_ONLY = _speed_only()


def check_types(raw: Any, origin: dict[str, str] | None = None,
                source: str = "params.yaml") -> Section:
    """A params.yaml mapping as `TopLevel`, every key present (defaults filled in), after the
    declared type and range checks. ValueError with one line per bad key otherwise, each
    starting with where the value came from: `origin[key]` (e.g. "command line") or `source`."""
    return check_layout(TopLevel, raw, origin, source)


# ----------------------------------------------------------------------------- configs


@dataclass
class Params:
    """params.yaml as the library's configs: one per top-level config (`TOP`), one per
    section (`SECTIONS`)."""

    run: RunConfig
    quantizer: QuantizerConfig
    masking: MaskingConfig
    loss: LossConfig
    adapter: AdapterConfig
    train: TrainConfig
    download: sources.SourceConfig
    segment: segment.SegmentConfig
    features: features.FeatureConfig
    evaluate: EvaluateConfig
    finetune: FinetuneConfig
    raw: dict[str, Any]  # the checked values, every key present, for records and fingerprints


def hyperparameter_names() -> list[str]:
    """Every top-level key of params.yaml (the knobs of the `TOP` configs), in a stable order."""
    return [name for name in TopLevel.model_fields if name not in SECTIONS]


def from_dict(raw: dict[str, Any], origin: dict[str, str] | None = None,
              source: str = "params.yaml") -> Params:
    """Check the declared types and ranges of a params.yaml mapping and build the configs
    (ValueError naming every bad key); `validate` does the checks beyond one value."""
    checked = check_types(raw, origin, source)
    # As the declarations hold them (a tuple where params.yaml has a list), and as records and
    # fingerprints keep them (JSON's types).
    top, record = checked.model_dump(), checked.model_dump(mode="json")
    # The quantizer's input and seed are the run's.
    filled: dict[str, dict[str, Any]] = {
        "quantizer": {"n_mels": top["n_mels"], "seed": top["seed"]}}
    configs = {name: build(cls, top, **filled.get(name, {})) for name, cls in TOP.items()}
    sections = {name: build(cls, top[name]) for name, cls in SECTIONS.items()}
    return Params(**configs, **sections, raw=record)


def validate(params: Params, stage: str | None = None) -> None:
    """Check the parameters a stage uses (all when `stage` is None) beyond their declared types
    and ranges; raises ValueError."""
    if stage in (None, "download"):
        sources.validate(params.download)
    if stage in (None, "segment"):
        segment.validate(params.segment)
    if stage in (None, "features"):
        features.validate(params.features)
        if params.run.n_mels not in features.SUPPORTED_N_MELS:
            raise ValueError(f"n_mels must be one of {sorted(features.SUPPORTED_N_MELS)}, "
                             f"got {params.run.n_mels}")
    if stage in (None, "pretrain", "evaluate", "finetune"):
        for name in TOP:
            getattr(params, name).validate()
            if name == "run":
                _check_model(params.run)
    if stage in (None, "pretrain"):
        _check_against_model(params)
    if stage in (None, "evaluate", "finetune"):
        params.evaluate.validate()
    if stage in (None, "finetune"):
        params.finetune.validate(params.train)


def _check_model(run: RunConfig) -> None:
    """The model exists and takes n_mels mel bins."""
    validate_model_spec(run.model)
    model_mels = expected_n_mels(run.model)
    if model_mels is not None and model_mels != run.n_mels:
        raise ValueError(f"n_mels: model {run.model!r} takes {model_mels} mel bins but "
                         f"n_mels is {run.n_mels}; set n_mels: {model_mels}")


def validate_corpus(params: Params, train_clips: int, where: str) -> None:
    """Before pre-training builds anything: a micro-batch no larger than the training split
    (`train_clips` windows, in `where`). A larger one holds windows twice, as more accumulated
    micro-batches would, at a memory cost that may not fit; ValueError naming batch_size."""
    batch = params.train.batch_size
    if batch > train_clips:
        raise ValueError(f"batch_size: {batch} windows a micro-batch, more than the "
                         f"{train_clips} training windows in {where}: set batch_size to at "
                         f"most {train_clips} (accumulate_gradients makes an update larger)")


def physical_memory() -> int | None:
    """Bytes of this machine's memory; None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_against_model(params: Params) -> None:
    """The knobs sized by the base model, checked before any work where the model's encoder is
    known without its weights (`encoder_shape`: a Whisper name, a checkpoint's or a Hugging
    Face config's dims): the blocks that bestrq_layer and distill_layers name exist, and a
    training process's heads and quantizer fit in this machine's memory. Otherwise pretrain
    checks the blocks once the encoder is loaded."""
    spec = params.run.model
    shape = encoder_shape(spec)
    if shape is not None:
        params.loss.resolve(shape[0], f"the encoder of model {spec!r}")
    memory = physical_memory()
    if memory is None:
        return
    q = params.quantizer
    heads = 0 if shape is None else heads_numbers(q, shape[1]) * HEAD_TRAINING_BYTES
    need = (heads + q.buffer_bytes()) * params.run.nproc
    if need <= memory:
        return
    gb = 1e9
    heads_say = "" if shape is None else (
        f"heads {heads / gb:.1f} GB on the width {shape[1]} of model {spec!r}: weights, "
        f"gradient and AdamW's moments, {HEAD_TRAINING_BYTES} bytes a number; ")
    procs = f" in each of nproc {params.run.nproc} processes" if params.run.nproc > 1 else ""
    raise ValueError(f"num_codebooks x codebook_size: {q.num_codebooks} x {q.codebook_size} "
                     f"codes need {need / gb:.1f} GB to train ({heads_say}quantizer "
                     f"{q.buffer_bytes() / gb:.1f} GB with code_dim {q.code_dim}){procs}, "
                     f"more than this machine's {memory / gb:.1f} GB of memory: lower "
                     "num_codebooks, codebook_size or code_dim")


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None,
                stage: str | None = None) -> Params:
    """Read, override (top-level keys, e.g. from the command line) and validate params.yaml."""
    raw, origin, source = read_file(path, overrides)
    params = from_dict(raw, origin, source)
    validate(params, stage)
    return params
