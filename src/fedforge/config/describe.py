"""``fedforge config``: every key of the run configuration as a TOML file that ``fedforge
run`` accepts, each key at its default with its type, bounds and meaning in a comment, keys
unset by default (decided automatically) commented out. Generated from the schema that
validates configurations, so it cannot drift from it."""

from __future__ import annotations

import json
import math
import re
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from fedforge.config.run import RunConfig

HEADER = """\
# fedforge run configuration: every key at its default, with its type, bounds and meaning.
# Save this as a file, edit what you need and run it (fedforge run FILE), or override one key
# on the command line (--set section.key=value). Keys commented out are unset: decided
# automatically unless you set them.
"""
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def describe_config() -> str:
    """The default configuration as commented TOML (``tomllib`` reads it back, and
    ``load_config`` gives ``RunConfig()``)."""
    lines = [HEADER]
    _describe_model(RunConfig, "", lines)
    return "\n".join(lines) + "\n"


def _describe_model(model: type[BaseModel], prefix: str, lines: list[str]) -> None:
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested.append((name, annotation))
            continue
        default = field.get_default(call_default_factory=True)
        parts = [_describe_type(annotation) + _describe_bounds(field.metadata)]
        if field.description:
            parts.append(field.description)
        comment = "; ".join(parts)
        if default is None:
            lines.append(f"# {_key(name)} =   # unset; {comment}")
        else:
            lines.append(f"{_key(name)} = {toml_value(default)}  # {comment}")
    for name, section in nested:
        summary = _first_sentence(section.__doc__ or "")
        header = f"[{prefix}{_key(name)}]" + (f"  # {summary}" if summary else "")
        lines.extend(["", header])
        _describe_model(section, f"{prefix}{_key(name)}.", lines)


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name)


def toml_value(value: Any) -> str:
    """``value`` as a one-line TOML value (strings, numbers, booleans, arrays, tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = ", ".join(f"{_key(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }"
    raise TypeError(f"no TOML form for {value!r}")


def _first_sentence(doc: str) -> str:
    """A docstring's first sentence on one line (the whole first paragraph if it has none)."""
    paragraph = " ".join(doc.strip().split("\n\n", 1)[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]


def _describe_type(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of: " + ", ".join(str(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        inner = " | ".join(_describe_type(a) for a in members)
        return f"{inner}, optional" if len(members) < len(get_args(annotation)) else inner
    if origin is not None:
        inner = ", ".join(_describe_type(a) for a in get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(annotation, "__name__", str(annotation))


def _describe_bounds(metadata: list[Any]) -> str:
    bounds = []
    for item in metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(item, attr, None)
            if value is not None:
                bounds.append(f"{symbol} {value}")
    return f" ({', '.join(bounds)})" if bounds else ""
