"""How a config field becomes a CLI flag, and the error every configuration mistake raises.

A field's metadata (`opt`) carries its help text and choices. The flag is the field name
with dashes (``tensor_model_parallel_size`` -> ``--tensor-model-parallel-size``).

A field may hold a sub-config (`nested`): the text tower's `blocks` is a
`TransformerConfig`, and the fields it names become flags with a prefix
(``blocks.hidden_size`` -> ``--text-hidden-size``). A section's *flat* form — one name per
flag, e.g. ``text_hidden_size`` — is what the parser produces, what presets give and what
`megavit_config.json` records (`section_to_dict`, `section_from_dict`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from megavit.errors import UserError


class ConfigError(UserError, ValueError):
    """A user mistake in the configuration; the message names the flag and the fix."""


def opt(help: str, choices: Sequence[Any] | None = None) -> dict:
    """Metadata for a config field: its help text and optional choices."""
    return {"help": help, "choices": choices}


def finite_float(text: str) -> float:
    """argparse type of every float flag: a number, not nan or inf."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


finite_float.__name__ = "finite number"   # argparse: "invalid finite number value: 'nan'"


def field_type(f: dataclasses.Field) -> type:
    """bool, int, float or str: the type a flag's value is parsed as (None allowed aside)."""
    t = str(f.type).replace(" ", "")
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if t == name or t.startswith(name + "|"):
            return typ
    raise TypeError(f"config field {f.name} has unsupported type {f.type}")


def nested(prefix: str, flags: Mapping[str, str]) -> dict:
    """Metadata for a field holding a sub-config: `flags` maps each of its fields that is a
    flag to that flag's help text; the flag (and flat name) is `prefix` + the field name.
    Its other fields keep the value of the field's default_factory."""
    return {"prefix": prefix, "flags": dict(flags)}


@dataclass(frozen=True)
class FlagField:
    """One flag of a section: `name` (flat: the flag without dashes and the key in
    megavit_config.json), the config field it sets (`field`, at attribute `path` of the
    section), its default and help."""

    name: str
    field: dataclasses.Field
    path: tuple[str, ...]
    default: Any
    help: str


def flag_fields(cls: type) -> list[FlagField]:
    """The flags of section dataclass `cls`, sub-configs expanded, in field order."""
    out = []
    for f in dataclasses.fields(cls):
        if "prefix" not in f.metadata:
            out.append(FlagField(f.name, f, (f.name,), f.default, f.metadata.get("help", "")))
            continue
        sub_default = f.default_factory()  # type: ignore[misc]
        sub_fields = {g.name: g for g in dataclasses.fields(sub_default)}
        for name, help_text in f.metadata["flags"].items():
            out.append(FlagField(f.metadata["prefix"] + name, sub_fields[name], (f.name, name),
                                 getattr(sub_default, name), help_text))
    return out


def section_to_dict(obj: Any) -> dict[str, Any]:
    """{flat name: value} of a section object (a sub-config's fields that are no flag are
    fixed by the section, so not recorded)."""
    out = {}
    for ff in flag_fields(type(obj)):
        value = obj
        for attr in ff.path:
            value = getattr(value, attr)
        out[ff.name] = value
    return out


def section_from_dict(cls: type, values: Mapping[str, Any]) -> Any:
    """The section `cls` with the flat `values` set (others at their defaults); TypeError
    naming an unknown name, as `cls(**values)` would."""
    by_name = {ff.name: ff for ff in flag_fields(cls)}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)}")
    top: dict[str, Any] = {}
    nested_values: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        path = by_name[name].path
        if len(path) == 1:
            top[path[0]] = value
        else:
            nested_values.setdefault(path[0], {})[path[1]] = value
    for attr, sub in nested_values.items():
        factory = next(f for f in dataclasses.fields(cls) if f.name == attr).default_factory
        top[attr] = dataclasses.replace(factory(), **sub)  # type: ignore[misc]
    return cls(**top)
