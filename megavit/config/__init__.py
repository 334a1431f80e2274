"""Configuration: dataclasses by concern, model presets, CLI flags and validation.

Every CLI flag is generated from a dataclass field: the flag name is the field name with
dashes (Megatron-LM's names, e.g. ``tensor_model_parallel_size`` is
``--tensor-model-parallel-size``), the help text and choices come from the field's
metadata. A preset (``--preset vit-b``) fills the model fields; any model flag given on the
command line overrides the preset.

    fields.py      field metadata -> flag (sub-configs flattened: --text-hidden-size);
                   ConfigError; section_to_dict / section_from_dict (the flat form)
    model.py       TransformerConfig (the blocks of both towers), ModelConfig (the ViT),
                   TextConfig (the text tower)
    parallel.py    ParallelConfig
    run.py         Training-, Precision-, Data-, Logging-, CheckpointConfig; Config
    presets.py     --preset, --text-preset
    flags.py       the parser of megavit.pretrain; parse_args
    validation.py  validate (one _check_<section> per section)
    contrastive.py the sections, parser and validation of megavit.pretrain_contrastive

This package is the bottom layer: of megavit it imports only `megavit.errors` (see
docs/architecture.md).

    cfg = parse_args(["--preset", "vit-debug", "--tensor-model-parallel-size", "2"])
    validate(cfg, world_size=4)      # raises ConfigError naming the flag and the fix
"""

from megavit.config.contrastive import (ContrastiveConfig, ContrastiveRunConfig,
                                        contrastive_parser, parse_contrastive_args,
                                        validate_contrastive)
from megavit.config.fields import ConfigError, section_from_dict, section_to_dict
from megavit.config.flags import (build_parser, config_from_sections, flag_names, parse_args,
                                  parse_sections)
from megavit.config.model import ModelConfig, TextConfig, TransformerConfig
from megavit.config.parallel import ParallelConfig
from megavit.config.presets import PRESETS, TEXT_PRESETS, preset_model_config
from megavit.config.run import (CheckpointConfig, Config, DataConfig, LoggingConfig,
                                PrecisionConfig, TrainingConfig)
from megavit.config.validation import validate

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "ContrastiveConfig", "ContrastiveRunConfig",
    "DataConfig", "LoggingConfig", "ModelConfig", "PRESETS", "ParallelConfig",
    "PrecisionConfig", "TEXT_PRESETS", "TextConfig", "TrainingConfig", "build_parser",
    "config_from_sections", "contrastive_parser", "flag_names", "parse_args",
    "parse_contrastive_args", "parse_sections", "preset_model_config", "section_from_dict",
    "section_to_dict", "TransformerConfig", "validate", "validate_contrastive",
]
