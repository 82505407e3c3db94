"""Decide what trains: LoRA-family adapters through peft, or full fine-tuning with freezing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from instill.config import AdapterConfig
from instill.errors import InstillError

# Presets in Llama-family module names (Llama, Mistral, Qwen2, SmolLM, Gemma and others share them).
TARGET_PRESETS: dict[str, list[str]] = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}


@dataclass(frozen=True)
class ParamReport:
    trainable: int
    total: int

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        return (
            f"trainable parameters: {self.trainable:,} ({pct:.2f}%), "
            f"frozen: {self.frozen:,}, total: {self.total:,}"
        )


def param_report(model: torch.nn.Module) -> ParamReport:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ParamReport(trainable=trainable, total=total)


def _linear_names(model: torch.nn.Module) -> list[str]:
    names = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    return sorted(names)


def _targets(model: torch.nn.Module, spec: str | list[str]) -> str | list[str]:
    if spec == "all-linear":
        return "all-linear"  # peft's own preset: every linear layer except the output head
    names = TARGET_PRESETS.get(spec, [spec]) if isinstance(spec, str) else list(spec)
    existing = _linear_names(model)
    missing = [n for n in names if n not in existing]
    if missing:
        raise InstillError(
            f"adapter.target_modules: {missing} match no linear module of this model; "
            f"linear modules here: {existing} (or use a preset: all-linear, attention, mlp)"
        )
    return names


def attach_adapter(
    model: torch.nn.Module, cfg: AdapterConfig, seed: int | None = None
) -> tuple[torch.nn.Module, ParamReport]:
    """Return the model ready to train (peft-wrapped for LoRA) and its parameter counts.
    `seed` (train.seed) makes the adapters' random initialisation the same in every run and every
    process; the global random state is left as it was."""
    if cfg.method == "full":
        for name, param in model.named_parameters():
            param.requires_grad = not any(s in name for s in cfg.freeze)
        report = param_report(model)
        if cfg.freeze and report.trainable == report.total:
            raise InstillError(f"adapter.freeze: {cfg.freeze} matches no parameter name")
        return model, report
    if cfg.freeze:
        raise InstillError("adapter.freeze applies to adapter.method: full only; remove it")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):  # QLoRA: norms in fp32, input grads on
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=_targets(model, cfg.target_modules),
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        task_type="CAUSAL_LM",
    )
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora)
    return peft_model, param_report(peft_model)


def merged_for_evaluation(model: torch.nn.Module) -> torch.nn.Module:
    """What a run evaluates its tuned model with: a copy of a peft model with the adapter merged
    into the base weights (one matrix product per layer instead of the base's and the adapter's
    two more; `instill eval` loads a run's final/ the same way), or `model` itself for full
    fine-tuning, a quantized base (merging would round the update back to its 4 bits), or a
    device without room for the copy. `model` is left as it was (its adapter is what was saved,
    and held-out pairs need it switched off for the reference)."""
    if not hasattr(model, "merge_and_unload"):
        return model
    base = model.get_base_model()
    if getattr(base, "hf_quantizer", None) is not None or getattr(base, "is_loaded_in_4bit", False):
        return model
    import copy

    from instill.models.load import copy_room

    if not copy_room(model)[0]:
        return model
    merged = copy.deepcopy(model).merge_and_unload()
    return merged.eval()
