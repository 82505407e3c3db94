"""Checkpoints that are complete or absent: written to a temporary directory, fsynced, renamed.

A write that fails for want of space or permission is one error naming the folder (a WriteError
from instill.atomic); the checkpoints already complete are left as they were.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from instill.atomic import COMPLETE, atomic_directory, remove_directory
from instill.errors import InstillError


def save_model_dir(
    model: torch.nn.Module,
    tokenizer,
    target: Path,
    extra: dict | None = None,
    text: dict[str, str] | None = None,
    *,
    what: str = "model",
) -> None:
    """Save weights (or the adapter) + tokenizer + chat template to `target`, atomically.

    `extra` maps file names to tensors/objects saved with torch.save (optimizer state, RNG...);
    `text` maps file names to text. `what` names the write in an error ("checkpoint").
    """
    with atomic_directory(target, what, "train.output_dir") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, obj in (extra or {}).items():
            # through a Python file: a full disk then shows as the OSError (torch.save to a path
            # reports only "unexpected pos"), which names the reason in the error
            with open(tmp / name, "wb") as f:
                torch.save(obj, f)
        for name, body in (text or {}).items():
            (tmp / name).write_text(body + "\n")


def complete_checkpoints(folder: Path) -> list[Path]:
    """step-N directories that finished writing, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def prune(folder: Path, keep: int) -> None:
    """Delete all but the last `keep` checkpoints; each is renamed aside before it is deleted,
    so a kill part way never leaves a half-deleted step-N that still looks complete."""
    for old in complete_checkpoints(folder)[:-keep]:
        try:
            remove_directory(old)
        except OSError:  # kept, complete: pruned by a later save
            pass


STATE = "trainer_state.pt"
RESUME = "resume.json"  # step and fingerprint, readable without loading the optimiser state


def save_checkpoint(
    folder: Path, model, tokenizer, optimizer, scheduler, result, fingerprint: dict, keep: int
) -> Path:
    """checkpoints/step-N: weights (or adapter), tokenizer, and everything resume needs."""
    state = {
        "step": result.steps,
        "tokens": result.tokens,
        "trained_tokens": result.trained_tokens,
        "losses": list(result.losses),
        "val_losses": [list(v) for v in result.val_losses],
        "best": list(result.best) if result.best else None,
        "best_score": list(result.best_score) if result.best_score else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "fingerprint": fingerprint,
    }
    target = folder / f"step-{result.steps}"
    save_model_dir(
        model, tokenizer, target, extra={STATE: state},
        text={RESUME: json.dumps({"step": result.steps, "fingerprint": fingerprint}, indent=2)},
        what="checkpoint",
    )  # fmt: skip
    prune(folder, keep)
    return target


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint has {a!r}, this run has {b!r}")
    return out


def load_weights(model, path: Path) -> None:
    """Load the weights (or adapter) of a checkpoint or model directory into `model`."""
    from safetensors.torch import load_file

    if (path / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict

        if not hasattr(model, "peft_config"):
            raise InstillError(f"{path} holds an adapter but this run trains the full model")
        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
        return
    if hasattr(model, "peft_config"):
        raise InstillError(f"{path} holds a full model but this run trains an adapter")
    state: dict = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k}  # tied to the embeddings, not saved twice
    if unexpected or set(missing) - tied:
        raise InstillError(f"{path}: weights do not fit this model (missing {sorted(missing)[:3]})")


def resume_info(path: Path) -> dict:
    """{"step", "fingerprint"} of a resumable checkpoint (a step-N directory), or a clear error
    for anything else: an incomplete write, or checkpoints/best and final/, which hold weights
    only (no optimiser, scheduler, RNG or data position)."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise InstillError(
            f"train.resume: {path} is not a complete checkpoint (no {COMPLETE}: the write "
            "was cut short, or it is not a checkpoint); use train.resume=auto for the last "
            "complete one"
        )
    if not (path / STATE).is_file():
        raise InstillError(
            f"train.resume: {path} holds weights only, not a training state to resume from "
            f"(no {STATE}; checkpoints/best and final/ are weights); resume from a "
            "checkpoints/step-N folder, or train.resume=auto for the last one"
        )
    if (path / RESUME).is_file():
        return json.loads((path / RESUME).read_text())
    state = torch.load(path / STATE, weights_only=True)  # a checkpoint from before resume.json
    return {"step": state["step"], "fingerprint": state.get("fingerprint", {})}


def check_resumable(path: Path, fingerprint: dict) -> int:
    """The step to resume from; refuses, saying what changed, when `fingerprint` (this run's
    model, adapter, batching, data and process count) differs from the checkpoint's."""
    info = resume_info(path)
    diffs = _differences(info["fingerprint"], fingerprint)
    if diffs:
        raise InstillError(
            f"cannot resume from {path}: the run changed since it was written: "
            + "; ".join(diffs)
            + ". Resume with the same recipe and data, or start afresh with --overwrite"
        )
    return int(info["step"])


def restore_checkpoint(path: Path, model, optimizer, scheduler, fingerprint: dict) -> dict:
    """Load a checkpoint into model, optimiser and scheduler; return its trainer state."""
    path = Path(path)
    if not (path / COMPLETE).is_file() or not (path / STATE).is_file():
        raise InstillError(f"{path}: not a complete instill checkpoint (no {COMPLETE} or {STATE})")
    state = torch.load(path / STATE, weights_only=True)
    diffs = _differences(state.get("fingerprint", {}), fingerprint)
    if diffs:
        raise InstillError(f"cannot resume from {path}: the run changed: {'; '.join(diffs)}")
    load_weights(model, path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state
