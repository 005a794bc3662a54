"""A knob's one declaration, beside the config field that holds it: type, bounds, help text and
whether it changes what a run computes or only how fast it goes (or what it logs).

    batch_size: Annotated[int, knob("clips per micro-batch per process", ge=1, le=65536)] = 4

A config is a plain dataclass (saved in every adapter and checkpoint, as whisper's
`ModelDimensions`); its declarations are pydantic `Field`s, so pydantic checks them (`check`
for a config built in code, `bestrq.params` for params.yaml). params.py composes params.yaml's
layout from the configs' declarations; `train --help`, the checkpoint identity (speed-only
knobs aside) and the test holding dvc.yaml's params lists read the same declarations. A field
without a `knob` is not a knob: the composition fills it in (the quantizer's seed is the
top-level seed).
"""

from __future__ import annotations

import functools
from dataclasses import MISSING, fields
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

# Upper bounds catch typos and unit mix-ups (a count in samples, a rate in percent) before a run
# allocates or schedules something absurd; they are far above any real use.
SEED_MAX = 2**63 - 1  # torch.manual_seed and numpy's SeedSequence take it; negatives they do not
STEPS_MAX = 10**9
# Types that several configs declare (bounds only; each field adds its own help).
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
Steps = Annotated[int, Field(ge=1, le=STEPS_MAX)]
Workers = Annotated[int, Field(ge=0, le=1024)]
BatchSize = Annotated[int, Field(ge=1, le=65536)]
Accumulate = Annotated[int, Field(ge=1, le=2**20)]
LearningRate = Annotated[float, Field(gt=0, le=10.0)]
Ratio = Annotated[float, Field(ge=0, le=1)]
ClipCount = Annotated[int, Field(ge=0, le=10**9)]  # 0: no limit
# A length in updates (>= 1) or a share of max_steps (below 1): `schedule.updates`.
Length = Annotated[float, Field(ge=0, le=STEPS_MAX)]
Text = Annotated[str, Field(min_length=1)]

_SPEED_ONLY = "speed_only"
# strict: YAML's 2.5, true and '0.5' stay what they are instead of becoming 2, 1 and 0.5.
STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class Section(BaseModel):
    """The checked values of one config (or of params.yaml's top level)."""

    model_config = STRICT


def knob(help: str, *, speed_only: bool = False, **bounds: Any) -> Any:
    """The declaration of a knob: `help` for `train --help`, pydantic's bounds (ge, le, gt, lt,
    multiple_of, min_length, max_length), and `speed_only` for a knob that changes how fast a
    run goes or what it logs, never what it computes (a checkpoint made under another value is
    resumed)."""
    return Field(description=help, json_schema_extra={_SPEED_ONLY: speed_only}, **bounds)


def is_knob(info: FieldInfo) -> bool:
    return isinstance(info.json_schema_extra, dict) and _SPEED_ONLY in info.json_schema_extra


def speed_only(info: FieldInfo) -> bool:
    """Whether the declared knob `info` changes only speed or logging."""
    return bool(is_knob(info) and info.json_schema_extra[_SPEED_ONLY])  # type: ignore[index]


def declared(cls: type) -> dict[str, tuple[Any, Any]]:
    """The knobs of config dataclass `cls`, in field order: name -> (annotated type, default),
    as `pydantic.create_model` takes them."""
    hints = get_type_hints(cls, include_extras=True)
    out: dict[str, tuple[Any, Any]] = {}
    for f in fields(cls):
        hint = hints[f.name]
        meta = get_args(hint)[1:] if get_origin(hint) is Annotated else ()
        if not any(isinstance(m, FieldInfo) and is_knob(m) for m in meta):
            continue
        default = f.default if f.default is not MISSING else \
            Field(default_factory=f.default_factory)  # type: ignore[arg-type]
        out[f.name] = (hint, default)
    return out


@functools.cache
def model_of(cls: type) -> type[Section]:
    """The pydantic model of config dataclass `cls`'s knobs."""
    return create_model(cls.__name__ + "Knobs", __base__=Section,
                        **declared(cls))  # type: ignore[call-overload]


def to_file(values: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """A config's values under the names a file format gave its knobs (`names`: knob -> name
    in the file; the others keep theirs), so that renaming a knob leaves the files as they
    were."""
    return {names.get(k, k): v for k, v in values.items()}


def from_file(values: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """The inverse of `to_file`."""
    return to_file(values, {v: k for k, v in names.items()})


def check(config: Any, prefix: str = "") -> None:
    """ValueError, one line per knob of `config` (a config dataclass) outside its declared type
    or bounds, each naming `prefix` + the knob."""
    model = model_of(type(config))
    values = {name: getattr(config, name) for name in model.model_fields}
    try:
        model.model_validate(values)
    except ValidationError as err:
        raise ValueError("\n".join(
            f"{prefix}{loc}: must be {want}, got {value!r}"
            for loc, want, value in problems(err, {"": model}))) from None


def problems(err: ValidationError, owners: dict[str, type[BaseModel]]
             ) -> list[tuple[str, str, Any]]:
    """(dotted key, what it must be, the value given) of each error of `err`. `owners` maps a
    section's name ("" for the top) to its model; an item of a list is reported as the list."""
    out = []
    for item in err.errors():
        loc = [str(part) for part in item["loc"] if not isinstance(part, int)]
        section = loc[0] if len(loc) > 1 and loc[0] in owners else ""
        owner = owners[section]
        name = loc[-1]
        if item["type"] == "extra_forbidden":
            out.append((".".join(loc), "", item["input"]))
            continue
        value = item["input"]  # for an item of a list, the item
        out.append((".".join(loc), expected(owner, name), value))
    return out


def expected(model: type[BaseModel], name: str) -> str:
    """What `model.name` must be, in words: "an integer in [1, 64]", "true or false", ..."""
    info = model.model_fields[name]
    kind = info.annotation
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(str(v) for v in get_args(kind))
    if get_origin(kind) in (list, tuple):
        item = get_args(kind)[0]
        item = get_args(item)[0] if get_origin(item) is Annotated else item
        if get_origin(item) is Literal:
            return "a non-empty list of distinct names among " + ", ".join(get_args(item))
        return "a non-empty list of distinct integers (see its help for the range)"
    if kind is bool:
        return "true or false"
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return f"a mapping of {name} parameters"
    optional = get_origin(kind) is not None and type(None) in get_args(kind)
    if optional:
        kind = next(a for a in get_args(kind) if a is not type(None))
        if get_origin(kind) is Annotated:
            info = FieldInfo.merge_field_infos(info, *get_args(kind)[1:])
            kind = get_args(kind)[0]
    words = _range(kind, info.metadata)
    return f"{words} or null" if optional else words


def _range(kind: Any, metadata: list[Any]) -> str:
    bounds: dict[str, Any] = {}
    for item in metadata:  # annotated_types' Ge, Gt, Le, Lt, MinLen, MultipleOf
        for attr in ("ge", "gt", "le", "lt", "min_length", "multiple_of"):
            if getattr(item, attr, None) is not None:
                bounds[attr] = getattr(item, attr)
    if kind is str:
        return "a non-empty string" if bounds.get("min_length") else "a string"
    noun = "an integer" if kind is int else "a number"
    if "multiple_of" in bounds:
        noun = f"a multiple of {bounds['multiple_of']}"

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
