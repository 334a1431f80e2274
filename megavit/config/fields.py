"""How a config field becomes a CLI flag, and the error every configuration mistake raises.

A field's metadata (`opt`) carries its help text and choices. The flag is the field name
with dashes (``tensor_model_parallel_size`` -> ``--tensor-model-parallel-size``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from megavit.errors import UserError


class ConfigError(UserError, ValueError):
    """A user mistake in the configuration; the message names the flag and the fix."""


def opt(help: str, choices: Sequence[Any] | None = None) -> dict:
    """Metadata for a config field: its help text and optional choices."""
    return {"help": help, "choices": choices}


def flag_of(f: dataclasses.Field) -> str:
    """The CLI flag of field `f`."""
    return "--" + f.name.replace("_", "-")


def field_type(f: dataclasses.Field) -> type:
    """bool, int, float or str: the type a flag's value is parsed as (None allowed aside)."""
    t = str(f.type).replace(" ", "")
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if t == name or t.startswith(name + "|"):
            return typ
    raise TypeError(f"config field {f.name} has unsupported type {f.type}")
