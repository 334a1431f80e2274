"""CLI flags generated from the section dataclasses, and parsing them into a `Config`.

One argument group per section (its docstring is the group's description); one flag per
field, its help text and choices from the field's metadata, "(default: ...)" appended.
Booleans get `--flag / --no-flag`. Defaults are left unset in the parser, so explicit flags
can be told apart from preset values (a preset fills the model, explicit flags win).

    cfg = parse_args(["--preset", "vit-debug", "--tensor-model-parallel-size", "2"])
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Sequence

from megavit.config.fields import ConfigError, field_type, flag_of
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
                             argument_default=argparse.SUPPRESS)
    parser.add_argument("--preset", choices=tuple(PRESETS), help=preset_help())
    if any(name == "text" for name, _ in sections):
        parser.add_argument("--text-preset", choices=tuple(TEXT_PRESETS),
                            help=text_preset_help())
    for section, cls in sections:
        group = parser.add_argument_group(section, cls.__doc__)
        for f in dataclasses.fields(cls):
            group.add_argument(flag_of(f), **_argument(section, f))
    return parser


def _argument(section: str, f: dataclasses.Field) -> dict[str, Any]:
    """argparse's keyword arguments for field `f` of `section` (dest "section.field")."""
    typ = field_type(f)
    help_text = f.metadata.get("help", "") + f" (default: {f.default})"
    kwargs: dict[str, Any] = {"dest": f"{section}.{f.name}",
                              "help": help_text.replace("%", "%%")}
    if typ is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif f.metadata.get("choices"):
        kwargs.update(type=typ, choices=f.metadata["choices"])
    else:
        kwargs.update(type=typ, metavar=f.name.upper())
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
    return Config(
        model=model,
        parallel=ParallelConfig(**sections.get("parallel", {})),
        training=TrainingConfig(**sections.get("training", {})),
        precision=PrecisionConfig(**sections.get("precision", {})),
        data=DataConfig(**sections.get("data", {})),
        logging=LoggingConfig(**sections.get("logging", {})),
        checkpoint=CheckpointConfig(**sections.get("checkpoint", {})),
        preset=preset,
    )


def flag_names(section: str | None = None) -> list[str]:
    """Every flag the parser accepts, or those of one section ("model", "parallel", ...)."""
    if section is not None:
        return [flag_of(f) for name, cls in SECTIONS if name == section
                for f in dataclasses.fields(cls)]
    return ["--preset"] + [flag_of(f) for _, cls in SECTIONS for f in dataclasses.fields(cls)]
