"""ldmscale.config: the typed configuration every component reads its own section of.

schema.py    the sections as dataclasses (defaults, field docs, range checks)
loading.py   YAML files and `section.key=value` overrides -> Config; the saved/logged form
checks.py    what needs the world size, the device or the filesystem (`validate`)
presets.py   U-Net and autoencoder architectures by name
"""

from ldmscale.config.checks import check_model_ref, pixel_multiple, validate, world_size_from_env
from ldmscale.config.loading import (
    ADDED_FIELDS_OLD_VALUES,
    config_from_yaml_text,
    deep_merge,
    dump_config,
    load_config,
    parse_override,
    public_dict,
    to_dict,
)
from ldmscale.config.presets import UNET_PRESETS, VAE_PRESETS
from ldmscale.config.schema import (
    SAMPLERS,
    AutoencoderConfig,
    BucketConfig,
    Config,
    ConfigError,
    DataConfig,
    DeepSpeedConfig,
    FilterConfig,
    ModelConfig,
    OptimConfig,
    SampleConfig,
    SamplerName,
    SourceConfig,
    StyleConfig,
    TrainConfig,
    WandbConfig,
)

__all__ = [
    "ADDED_FIELDS_OLD_VALUES", "SAMPLERS", "UNET_PRESETS", "VAE_PRESETS", "AutoencoderConfig", "BucketConfig",
    "Config", "ConfigError", "DataConfig", "DeepSpeedConfig", "FilterConfig", "ModelConfig", "OptimConfig",
    "SampleConfig", "SamplerName", "SourceConfig", "StyleConfig", "TrainConfig", "WandbConfig", "check_model_ref",
    "config_from_yaml_text", "deep_merge", "dump_config", "load_config", "parse_override", "pixel_multiple",
    "public_dict", "to_dict", "validate", "world_size_from_env",
]
