"""Typed recipes: pydantic models, YAML loading, dotted overrides; and the options of every
other command (commands.py), so a default and its --help are written once."""

from instill.config.load import load_recipe, recipe_help
from instill.config.schema import (
    AdapterConfig,
    BuiltinDataConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    PairsConfig,
    PreferenceConfig,
    Recipe,
    ReportConfig,
    SamplingConfig,
    ServeConfig,
    SourceConfig,
    SuiteConfig,
    TrainConfig,
    default,
    describe,
)

__all__ = [
    "AdapterConfig",
    "BuiltinDataConfig",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "PairsConfig",
    "PreferenceConfig",
    "Recipe",
    "ReportConfig",
    "SamplingConfig",
    "ServeConfig",
    "SourceConfig",
    "SuiteConfig",
    "TrainConfig",
    "default",
    "describe",
    "load_recipe",
    "recipe_help",
]
