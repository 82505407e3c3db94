"""OpenAI-compatible server: FastAPI app, continuous-batching scheduler, web chat page."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from instill.config import ServeConfig
from instill.errors import InstillError
from instill.serve.app import Server, allowed_hosts, build_app, is_loopback

if TYPE_CHECKING:
    from instill.config import ModelConfig

__all__ = [
    "ServeConfig",
    "Server",
    "build_app",
    "load_server",
    "read_api_key",
    "run_server",
    "startup_warnings",
]


def load_server(model: str, cfg: ServeConfig, spec: ModelConfig | None = None) -> Server:
    """The model ready to serve; `spec` as `load_for_inference` takes it (its chat_template, a
    Jinja file, replaces the model's own). A model without a template serves /v1/completions
    only (its chat routes answer 400)."""
    from instill.infer.int8 import for_int8_decoding, require_int8_kernel
    from instill.models import load_for_inference

    if cfg.int8:
        require_int8_kernel()  # before the slow load
    loaded = load_for_inference(model, spec, require_template=False)
    if cfg.int8:
        for_int8_decoding(loaded.model)
    # Requests name the model by this short name (never a path the server would open).
    name = Path(model.rstrip("/")).name if Path(model).exists() else model
    names = [name] if name == model else [name, model]
    return Server(loaded.model, loaded.tokenizer, names, cfg)


def read_api_key(path: Path) -> str:
    """The bearer key from a file (its first line), so it never appears in `ps`."""
    if not path.is_file():
        raise InstillError(f"--api-key-file: {path}: file not found")
    key = path.read_text(encoding="utf-8").strip().splitlines()
    if not key or not key[0].strip():
        raise InstillError(f"--api-key-file: {path} is empty")
    return key[0].strip()


def startup_warnings(cfg: ServeConfig) -> list[str]:
    warnings = []
    if not is_loopback(cfg.host) and cfg.api_key is None:
        warnings.append(
            f"WARNING: no API key, and listening on {cfg.host}, beyond this machine's loopback: "
            "anyone who can reach this address can use the model. Set INSTILL_API_KEY or pass "
            "--api-key-file FILE, or listen on 127.0.0.1."
        )
    hosts = allowed_hosts(cfg)
    if hosts is None:
        warnings.append(
            "WARNING: --allowed-host '*': requests naming any host are answered (no DNS-rebinding "
            "protection)."
        )
    elif not is_loopback(cfg.host):
        warnings.append(
            f"answering requests for host {', '.join(sorted(hosts))}; add others with "
            "--allowed-host NAME"
        )
    return warnings


def run_server(
    model: str,
    cfg: ServeConfig,
    port: int = 8000,
    spec: ModelConfig | None = None,
    *,
    lora: str | None = None,
    engine: str = "torch",
    chat_template: Path | None = None,
) -> None:
    """Serve until interrupted. engine "llama.cpp": MODEL is a GGUF file (with `lora`, an
    adapter GGUF) or an export folder, decoded by llama.cpp (serve/llamacpp.py)."""
    import uvicorn

    if engine == "llama.cpp":
        from instill.serve.llamacpp import load_llamacpp_server

        server = load_llamacpp_server(model, lora, cfg, chat_template)
    else:
        server = load_server(model, cfg, spec)
    from rich.markup import escape

    from instill.console import console

    key = "required" if cfg.api_key else "off"
    where = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    console.print(escape(f"serving {server.names[0]} on http://{where}:{port}/ (API key {key})"))
    if engine == "llama.cpp":
        console.print(
            escape(
                f"decoded by {server.model.name}, one request at a time (--max-batch does not "
                f"apply), context {server.context} tokens"
            ),
            soft_wrap=True,
        )
    for line in startup_warnings(cfg):
        style = "bold red" if line.startswith("WARNING") else "default"
        console.print(f"[{style}]{escape(line)}[/{style}]", soft_wrap=True)
    uvicorn.run(build_app(server), host=cfg.host, port=port, log_level="warning")
