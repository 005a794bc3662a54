"""Reading a parameters file (params.yaml, a study grid) safely: bounded in size, a key given
twice refused as DVC refuses it, and values quoted in messages at a bounded length, so that no
file, however made, crashes or stalls the reader before the parameters are checked
(`bestrq.params`). Numbers are read as DVC reads and writes them (YAML 1.2's floats: `5e-05`,
which `dvc exp run -S learning_rate=5e-5` writes, is a number, not YAML 1.1's text)."""

from __future__ import annotations

import re
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
    """PyYAML's safe loader that refuses a key given twice in one mapping, as DVC does, and
    reads floats as YAML 1.2 (DVC's ruamel.yaml) does."""


# YAML 1.1's floats (PyYAML's own pattern: a dot, and a signed exponent, are required) and
# YAML 1.2's: an exponent without a dot or without a sign (5e-05, 1e5, 1.0e5, 1E-5), a leading
# dot after a sign (-.5). A plain integer matches neither, so it stays an int; a quoted value is
# never resolved, so '5e-05' stays text.
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
                    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
                    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN)
                    |[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+
                    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?)$""", re.X)
_FLOAT_TAG = "tag:yaml.org,2002:float"
# The float resolver replaced where it stands (before the int one, which it must precede).
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, _FLOAT if tag == _FLOAT_TAG else regexp) for tag, regexp in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


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
