"""Reading a parameters file (params.yaml, a study grid) safely: bounded in size, a key given
twice refused as DVC refuses it, and values quoted in messages at a bounded length, so that no
file, however made, crashes or stalls the reader before the parameters are checked
(`bestrq.params`)."""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import yaml

MAX_PARAMS_BYTES = 1 << 20  # a params file is a few KB; more is a mistake or an attack
# What a message quotes of a value: a few levels and items, so that a value built by YAML
# aliases (a "billion laughs" list) is never expanded to be printed.
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxlist, _QUOTE.maxdict, _QUOTE.maxstring, _QUOTE.maxother = \
    2, 4, 4, 80, 80


def quote(value: Any) -> str:
    """A short repr of `value` for a message, whatever its size."""
    return _QUOTE.repr(value)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping, as DVC does."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {quote(key)} given twice (lines {seen[key]} and {line})",
                    key_node.start_mark)
            seen[key] = line
        except TypeError:  # an unhashable key (a list): the base constructor says so
            pass
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_yaml(path: Path) -> Any:
    """A params file's YAML, refusing files over MAX_PARAMS_BYTES and duplicate keys;
    ValueError naming the file (and the line) otherwise."""
    size = path.stat().st_size
    if size > MAX_PARAMS_BYTES:
        raise ValueError(f"{path}: {size} bytes, more than a params file can be "
                         f"({MAX_PARAMS_BYTES} at most)")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text: {err}") from None
