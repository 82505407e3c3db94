"""Typed recipes: pydantic models, YAML loading, dotted overrides."""

from instill.config.load import load_recipe, recipe_help
from instill.config.schema import (
    AdapterConfig,
    BuiltinDataConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
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
