"""CLI flags generated from the section dataclasses, and parsing them into a `Config`.

One argument group per section (its docstring is the group's description); one flag per
field, its help text and choices from the field's metadata, "(default: ...)" appended.
Booleans get `--flag / --no-flag`. Defaults are left unset in the parser, so explicit flags
can be told apart from preset values (a preset fills the model, explicit flags win).

    cfg = parse_args(["--preset", "vit-debug", "--tensor-model-parallel-size", "2"])
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from megavit.config.fields import (ConfigError, FlagField, field_type, finite_float,
                                   flag_fields, section_from_dict)
from megavit.config.model import ModelConfig
from megavit.config.parallel import ParallelConfig
from megavit.config.presets import (PRESETS, TEXT_PRESETS, preset_help, preset_model_config,
                                    text_preset_help)
from megavit.config.run import (CheckpointConfig, Config, DataConfig, LoggingConfig,
                                PrecisionConfig, TrainingConfig)

SECTIONS: tuple[tuple[str, type], ...] = (
    ("model", ModelConfig),
    ("parallel", ParallelConfig),
    ("training", TrainingConfig),
    ("precision", PrecisionConfig),
    ("data", DataConfig),
    ("logging", LoggingConfig),
    ("checkpoint", CheckpointConfig),
)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of exiting, so callers decide."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def build_parser(prog: str = "python -m megavit.pretrain",
                 sections: Sequence[tuple[str, type]] = SECTIONS,
                 description: str = "Train a Vision Transformer with tensor and data "
                 "parallelism. Launch with torchrun, mpirun or srun for more than one process.",
                 ) -> argparse.ArgumentParser:
    """The argument parser, one group per config dataclass; defaults are left unset so
    that explicit flags can be told apart from preset values."""
    parser = _ArgumentParser(prog=prog, description=description,
                             argument_default=argparse.SUPPRESS, allow_abbrev=False)
    parser.add_argument("--preset", choices=tuple(PRESETS), help=preset_help())
    if any(name == "text" for name, _ in sections):
        parser.add_argument("--text-preset", choices=tuple(TEXT_PRESETS),
                            help=text_preset_help())
    for section, cls in sections:
        group = parser.add_argument_group(section, cls.__doc__)
        for ff in flag_fields(cls):
            group.add_argument(_flag(ff), **_argument(section, ff))
    return parser


def _flag(ff: FlagField) -> str:
    return "--" + ff.name.replace("_", "-")


def _argument(section: str, ff: FlagField) -> dict[str, Any]:
    """argparse's keyword arguments for flag `ff` of `section` (dest "section.flat_name")."""
    typ = field_type(ff.field)
    parse = finite_float if typ is float else typ
    help_text = ff.help + f" (default: {ff.default})"
    kwargs: dict[str, Any] = {"dest": f"{section}.{ff.name}",
                              "help": help_text.replace("%", "%%")}
    if typ is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif ff.field.metadata.get("choices"):
        kwargs.update(type=parse, choices=ff.field.metadata["choices"])
    else:
        kwargs.update(type=parse, metavar=ff.name.upper())
    return kwargs


def parse_sections(parser: argparse.ArgumentParser, sections: Sequence[tuple[str, type]],
                   argv: Sequence[str] | None) -> tuple[dict[str, dict[str, Any]], dict]:
    """({section: {field: value given}}, {"preset": ..., "text_preset": ...}) from argv."""
    ns = vars(parser.parse_args(argv))
    presets = {k: ns.pop(k, None) for k in ("preset", "text_preset")}
    given: dict[str, dict[str, Any]] = {name: {} for name, _ in sections}
    for key, value in ns.items():
        section, name = key.split(".", 1)
        given[section][name] = value
    return given, presets


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parse command-line flags into a Config (preset first, explicit flags on top).

    Raises ConfigError for unknown flags or malformed values; call `validate` afterwards
    for cross-field checks that need the world size.
    """
    sections, presets = parse_sections(build_parser(), SECTIONS, argv)
    return config_from_sections(sections, presets["preset"])


def config_from_sections(sections: dict[str, dict[str, Any]], preset: str | None) -> Config:
    """A Config from parsed sections; a missing section takes its defaults."""
    model = (preset_model_config(preset, **sections.get("model", {})) if preset
             else ModelConfig(**sections.get("model", {})))
    built = {name: section_from_dict(cls, sections.get(name, {}))
             for name, cls in SECTIONS if name != "model"}
    return Config(model=model, preset=preset, **built)


def flag_names(section: str | None = None) -> list[str]:
    """Every flag the parser accepts, or those of one section ("model", "parallel", ...)."""
    if section is not None:
        return [_flag(ff) for name, cls in SECTIONS if name == section
                for ff in flag_fields(cls)]
    return ["--preset"] + [_flag(ff) for _, cls in SECTIONS for ff in flag_fields(cls)]
