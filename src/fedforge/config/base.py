"""The base of every configuration section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A configuration section: unknown keys are refused, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def changed(section: Section, switch: str) -> list[str]:
    """The keys of ``section`` other than ``switch`` that differ from their defaults."""
    return [
        name
        for name, info in type(section).model_fields.items()
        if name != switch and getattr(section, name) != info.get_default(call_default_factory=True)
    ]
