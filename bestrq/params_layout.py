"""params.yaml's layout checked against the configs' declared knobs, for any set of configs: the
whole pipeline's (`bestrq.params`) or the few one data stage reads (`read_configs`).

It imports no config: a stage that checks its own sections through it depends on those
configs' code alone, so editing training code re-runs no data stage (dvc.yaml lists each
stage's imports, tests/test_dvc_deps.py).

Checking happens before any work: the declared types and ranges (strict: no bool for a number,
no float for an integer, no text for either), with one line per bad key naming the key and
where its value came from; then paths the file system cannot hold.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from bestrq.knobs import Section, declared, model_of, problems
from bestrq.params_file import quote, read_yaml

MAX_PATH_BYTES, MAX_NAME_BYTES = 4096, 255  # Linux's PATH_MAX and NAME_MAX
PATH_KEYS = ("model", "download.source", "download.watch")


class Partial(Section):
    """One stage's share of params.yaml: the top-level keys and sections it does not read
    belong to other stages, which check them; inside its own sections every key is known."""

    model_config = ConfigDict(extra="ignore")


def compose(name: str, knobs: Mapping[str, tuple[Any, Any]], sections: Mapping[str, type],
            partial: bool = False) -> type[Section]:
    """The pydantic model of a params.yaml layout: `knobs` (name -> (annotated type, default),
    as `bestrq.knobs.declared` gives them) at the top level and a section per config of
    `sections` (section name -> config dataclass). `partial`: other keys are left alone."""
    spec: dict[str, tuple[Any, Any]] = dict(knobs)
    for section, cls in sections.items():
        model = model_of(cls)
        spec[section] = (model, Field(default_factory=model))
    return create_model(name, __base__=Partial if partial else Section,  # type: ignore[call-overload]
                        **spec)


def section_models(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """The sections of a composed layout: section name -> its model."""
    return {name: info.annotation for name, info in model.model_fields.items()
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)}


def build(cls: type, values: dict[str, Any], **filled: Any) -> Any:
    """Config `cls` from the checked values of its knobs and `filled`, its other fields."""
    return cls(**{name: values[name] for name in declared(cls)}, **filled)


def _hint(value: Any, want: str) -> str:
    # A quoted number is text ('5e-05'); unquoted, the reader takes 5e-05 as a number
    # (`params_file`: YAML 1.2's floats, as DVC writes them).
    if not isinstance(value, str) or not want.startswith(("an integer", "a number")):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return " (text, not a number: remove the quotes)"


def _messages(err: ValidationError, model: type[BaseModel], origin: dict[str, str],
              source: str) -> list[str]:
    """One line per problem, each naming the dotted key and where its value came from."""
    sections = section_models(model)
    lines = []
    for key, want, value in problems(err, {"": model, **sections}):
        where = origin.get(key, source)
        if want:
            lines.append(f"{where}: {key}: must be {want}, got {quote(value)}"
                         f"{_hint(value, want)}")
            continue
        head, _, rest = key.partition(".")  # an unknown key (its name may hold a dot)
        section, name = (head, rest) if rest and head in sections else ("", key)
        known = sorted(sections[section].model_fields if section else model.model_fields)
        close = difflib.get_close_matches(name, known, n=1)
        guess = f" (did you mean {close[0]}?)" if close else ""
        lines.append(f"{where}: unknown parameter {key}{guess}; known: {', '.join(known)}")
    return lines


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


def _check_paths(checked: BaseModel, source: str) -> None:
    """Paths the file system cannot hold are an error naming the key, not an OSError later
    (those of `PATH_KEYS` that the layout holds)."""
    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        holder = getattr(checked, section, None) if section else checked
        value = getattr(holder, name, None)
        if not isinstance(value, str):
            continue
        encoded = value.encode("utf-8", "surrogateescape")
        longest = max((len(p) for p in encoded.split(b"/")), default=0)
        if len(encoded) > MAX_PATH_BYTES or longest > MAX_NAME_BYTES:
            raise ValueError(f"{source}: {key}: {quote(value)} is too long for a path "
                             f"({len(encoded)} bytes, a name of {longest}; at most "
                             f"{MAX_PATH_BYTES} and {MAX_NAME_BYTES})")


def check_layout(model: type[Section], raw: Any, origin: dict[str, str] | None = None,
                 source: str = "params.yaml") -> Section:
    """A params.yaml mapping as `model` (a `compose`d layout), every key it holds present
    (defaults filled in), after the declared type and range checks. ValueError with one line
    per bad key otherwise, each starting with where the value came from: `origin[key]` (e.g.
    "command line") or `source`."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: must be a mapping of parameters, got {quote(raw)}")
    _check_keys(raw, source)
    sections = section_models(model)
    # An empty section (`download:` alone) reads as null: it means "all defaults".
    raw = {k: ({} if k in sections and v is None else v) for k, v in raw.items()}
    try:
        checked = model.model_validate(raw)
    except ValidationError as err:
        raise ValueError("\n".join(_messages(err, model, origin or {}, source))) from None
    _check_paths(checked, source)
    return checked


def read_file(path: str | Path, overrides: dict[str, Any] | None = None
              ) -> tuple[Any, dict[str, str], str]:
    """params.yaml's contents with `overrides` (top-level keys, e.g. from the command line; None
    values are not given), where each overridden value came from, and the file's name for
    messages."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run from the project root")
    raw = read_yaml(path)
    raw = {} if raw is None else raw
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if isinstance(raw, dict):
        raw.update(given)
    return raw, dict.fromkeys(given, "command line"), path.name


def read_configs(path: str | Path, sections: Mapping[str, type],
                 knobs: Mapping[str, type] | None = None) -> dict[str, Any]:
    """What one stage reads of params.yaml at `path`, checked as declared: a config per section
    of `sections` (section name -> config dataclass) and the value of each top-level knob of
    `knobs` (knob -> the config that declares it), by name. The file's other keys are left to
    the stages that read them. ValueError naming each bad key, FileNotFoundError."""
    knobs = knobs or {}
    model = compose("StageParams", {name: declared(cls)[name] for name, cls in knobs.items()},
                    sections, partial=True)
    raw, origin, source = read_file(path)
    values = check_layout(model, raw, origin, source).model_dump()
    return {**{name: build(cls, values[name]) for name, cls in sections.items()},
            **{name: values[name] for name in knobs}}
