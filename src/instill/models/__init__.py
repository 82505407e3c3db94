"""Load pretrained models (alias, HF dir, GGUF, hub id), pick device and dtype, add adapters."""

from instill.models.adapters import ParamReport, attach_adapter
from instill.models.load import (
    LoadedModel,
    load_adapter_model,
    load_for_inference,
    load_model,
    load_tokenizer,
    model_spec,
    pick_device,
    pick_dtype,
)
from instill.models.resolve import ModelSource, resolve_model

__all__ = [
    "LoadedModel",
    "ModelSource",
    "ParamReport",
    "attach_adapter",
    "load_adapter_model",
    "load_for_inference",
    "load_model",
    "load_tokenizer",
    "model_spec",
    "pick_device",
    "pick_dtype",
    "resolve_model",
]
