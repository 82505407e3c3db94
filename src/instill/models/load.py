"""Load a model and tokenizer for training or inference, on the right device and dtype."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from instill.config import ModelConfig, Recipe
from instill.errors import InstillError
from instill.models.resolve import ModelSource, resolve_model
from instill.rundir import RunDir


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: ModelSource
    device: torch.device
    dtype: torch.dtype


def pick_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            # one GPU per process under accelerate launch / torchrun
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise InstillError(
            f"model.device: '{spec}' is not a device (auto, cpu, cuda, cuda:N, mps)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InstillError("model.device: cuda requested but no CUDA device is available")
    return device


def pick_dtype(spec: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU with bf16 units, fp32 elsewhere.

    CPUs without native bf16 run bf16 matrix products hundreds of times slower than fp32, so
    unlike some peers we never autocast to bf16 on a CPU by default.
    """
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    dtype = getattr(torch, spec)
    if device.type == "cpu" and dtype != torch.float32:
        warnings.warn(
            f"model.dtype={spec} on CPU: half-precision matrix products are much slower than "
            "float32 on most CPUs",
            stacklevel=2,
        )
    return dtype


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (x86: AVX512_BF16 or AMX). On one
    that does, a bf16 matrix product ran 2.4x an fp32 one (AMD EPYC, avx512_bf16, 2026-12-04:
    388 against 162 GFLOP/s at [2048, 576] x [576, 1536]); on one that does not, bf16 products
    are emulated and far slower. `INSTILL_CPU_BF16=0` or `1` overrides the probe."""
    forced = os.environ.get("INSTILL_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for name in probes:
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except Exception:  # a torch build without the probe's backing code
            continue
    return False


def load_tokenizer(path: str, cfg: ModelConfig, *, require_template: bool = True):
    """The tokenizer, with `cfg.chat_template` (a file) replacing its own template. Without
    `require_template` a tokenizer with no template is returned as is (raw-prompt use only)."""
    from transformers import AutoTokenizer

    from instill.data.render import load_chat_template

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise InstillError(f"model '{cfg.name}': cannot load its tokenizer ({exc})") from None
    if cfg.chat_template is not None:
        tokenizer.chat_template = load_chat_template(cfg.chat_template)
    if require_template and not getattr(tokenizer, "chat_template", None):
        raise InstillError(
            f"model '{cfg.name}' has no chat template; give a Jinja template file: "
            "model.chat_template in a recipe, --chat-template FILE on the command line"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, *, seed: int = 0, require_template: bool = True) -> LoadedModel:
    """Load the pretrained model (or the same architecture with random weights: `init: scratch`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    run_final = run_model_dir(cfg.name)
    if run_final is not None:
        return _load_run(cfg, run_final, require_template)
    source = resolve_model(cfg.name)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(source.path, cfg, require_template=require_template)
    kwargs = dict(trust_remote_code=cfg.trust_remote_code, dtype=dtype)
    if cfg.quantize == "4bit":
        kwargs.update(_four_bit(device, dtype))
    try:
        if cfg.init == "scratch":
            config = AutoConfig.from_pretrained(
                source.path, trust_remote_code=cfg.trust_remote_code
            )
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise InstillError(f"model '{cfg.name}': cannot load ({exc})") from None
    if cfg.quantize == "none":
        model.to(device)  # a quantised model is placed by device_map
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, device=device, dtype=dtype)


def run_model_dir(name: str) -> Path | None:
    """A run directory given as a model (it holds config.yaml and a final/ without a model of
    its own at the top): its final/ folder; else None."""
    run = RunDir(Path(name).expanduser())
    if run.config.is_file() and run.finished and not (run.root / "config.json").exists():
        return run.final
    return None


def _load_run(cfg: ModelConfig, final: Path, require_template: bool) -> LoadedModel:
    """A finished run as the start of another (preference tuning after supervised tuning): its
    tuned weights (an adapter is merged into its base), and the tokenizer and chat template it
    was trained with. The model records the run directory as its name, so an adapter trained
    on it names the run as its base and loads back onto the same weights."""
    from instill.models.resolve import ModelSource

    run_dir = final.parent
    if cfg.init != "pretrained" or cfg.quantize != "none":
        raise InstillError(
            f"model.name: {cfg.name} is a run; a run starts another with model.init: "
            "pretrained and model.quantize: none"
        )
    if trained_quantize(final) == "4bit":
        raise InstillError(
            f"model.name: {cfg.name} was tuned on a 4-bit base (QLoRA); merging its adapter "
            "would round it to 4 bits. Export it merged into the dequantised base (instill "
            "export RUN --dequantize) and start from that export"
        )
    if (final / "adapter_config.json").is_file():
        loaded = load_adapter_model(final, cfg, require_template=require_template)
        loaded.model = loaded.model.merge_and_unload()
    else:
        loaded = load_model(cfg.model_copy(update={"name": str(final)}),
                            require_template=require_template)  # fmt: skip
    loaded.model.config._name_or_path = str(run_dir.resolve())
    loaded.model.name_or_path = str(run_dir.resolve())
    loaded.source = ModelSource(kind="run", name=cfg.name, path=str(final.resolve()),
                                sha256=loaded.source.sha256)  # fmt: skip
    return loaded


def _four_bit(device: torch.device, dtype: torch.dtype) -> dict:
    """from_pretrained arguments for a 4-bit NF4 base (QLoRA)."""
    if device.type != "cuda":
        raise InstillError(
            f"model.quantize: 4bit (QLoRA) needs a CUDA GPU (bitsandbytes' 4-bit kernels); this "
            f"run is on {device.type}. Use model.quantize: none and LoRA in {dtype} instead"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise InstillError(
            "model.quantize: 4bit needs bitsandbytes: pip install bitsandbytes"
        ) from None
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    return {"quantization_config": quant, "device_map": {"": device}}


def _final_dir(path: Path) -> Path:
    """A run directory means its final/ model."""
    run = RunDir(path)
    if run.finished and not (path / "config.json").exists():
        return run.final
    return path


def trained_quantize(adapter_dir: Path) -> str:
    """model.quantize of the run whose final/ (or checkpoint) holds this adapter: "4bit" when
    it was trained on an NF4 base (QLoRA), "none" otherwise or when no run config is found."""
    run = RunDir.holding(adapter_dir)
    return (run.recipe() if run is not None else Recipe()).model.quantize


def _check_four_bit_inference(adapter_dir: Path, device: torch.device) -> None:
    """A QLoRA adapter is only the model it was trained as on the same NF4 base; refuse to put
    it on a full-precision base (a different model) when that base cannot be had here."""
    import importlib.util

    if device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        raise InstillError(
            f"{adapter_dir}: this adapter was trained on a 4-bit NF4 base (model.quantize: 4bit), "
            "and loading that base needs a CUDA GPU and bitsandbytes; on a full-precision base "
            "it would be a different model. Run it where a GPU is, or export it merged into the "
            "dequantised base (instill export RUN --dequantize) and use that export"
        )


def model_spec(model: str, chat_template: Path | None) -> ModelConfig:
    """The ModelConfig for loading MODEL with --chat-template; a missing file is an error before
    the slow model load."""
    from instill.data.render import load_chat_template

    if chat_template is not None:  # missing or empty: said now, naming the option
        load_chat_template(chat_template, "--chat-template")
    return ModelConfig(
        name=model, chat_template=str(chat_template) if chat_template is not None else None
    )


def load_for_inference(
    name: str, cfg: ModelConfig | None = None, *, require_template: bool = True
) -> LoadedModel:
    """Load a base model, a full fine-tune, or base + adapter (merged in memory for speed).
    `require_template=False` accepts a model without a chat template (raw prompts only)."""
    cfg = cfg or ModelConfig(name=name)
    path = _final_dir(Path(name).expanduser())
    adapter_file = path / "adapter_config.json"
    if not adapter_file.is_file():
        update = {"name": str(path) if path.exists() else name}
        loaded = load_model(cfg.model_copy(update=update), require_template=require_template)
        loaded.model.eval()
        return loaded
    quantize = trained_quantize(path)
    if quantize == "4bit":
        _check_four_bit_inference(path, pick_device(cfg.device))
    loaded = load_adapter_model(path, cfg, quantize=quantize, require_template=require_template)
    # merged for speed, except on a 4-bit base: merging would round the update back to 4 bits
    if quantize == "none":
        loaded.model = loaded.model.merge_and_unload()
    loaded.model.eval()
    return loaded


def load_adapter_model(
    adapter_dir: Path, cfg: ModelConfig, *, quantize: str = "none", require_template: bool = True
) -> LoadedModel:
    """The base model an adapter folder names (its adapter_config.json) with the adapter on it,
    unmerged (a peft PeftModel, in eval mode), and the tokenizer saved beside the adapter (its
    chat template is the one trained with). `cfg` gives device, dtype and remote-code trust;
    `quantize` the base's loading ("4bit": the NF4 base a QLoRA adapter was trained on)."""
    from peft import PeftModel

    adapter_file = adapter_dir / "adapter_config.json"
    base_name = json.loads(adapter_file.read_text()).get("base_model_name_or_path")
    if not base_name:
        raise InstillError(
            f"{adapter_file}: no base_model_name_or_path; cannot find the base model"
        )
    base_cfg = cfg.model_copy(update={"name": base_name, "quantize": quantize})
    base = load_model(base_cfg, require_template=False)
    tokenizer = load_tokenizer(
        str(adapter_dir),
        cfg.model_copy(update={"name": str(adapter_dir)}),
        require_template=require_template,
    )
    model = PeftModel.from_pretrained(base.model, str(adapter_dir)).eval()
    return LoadedModel(
        model=model, tokenizer=tokenizer, source=base.source, device=base.device, dtype=base.dtype
    )


def model_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, bytes): the same weights give the
    same digest whatever file or hub id they came from; any changed weight gives another."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def available_memory(device: torch.device) -> int:
    """Bytes free for a second copy of the weights on `device`."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62  # unknown: do not refuse


def copy_room(model: torch.nn.Module) -> tuple[bool, int, int]:
    """Whether a second copy of `model`'s weights fits on its device, with a fifth more for the
    activations the copy needs: (fits, bytes the copy needs, bytes free)."""
    device = next(model.parameters()).device
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    free = available_memory(device)
    return need * 1.2 <= free, need, free
