"""OpenAI-compatible server: FastAPI app, continuous-batching scheduler, web chat page."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from instill.serve.app import ServeConfig, Server, build_app

if TYPE_CHECKING:
    from instill.config import ModelConfig

__all__ = ["ServeConfig", "Server", "build_app", "load_server", "run_server"]


def load_server(model: str, cfg: ServeConfig, spec: ModelConfig | None = None) -> Server:
    """The model ready to serve; `spec` as `load_for_inference` takes it (its chat_template, a
    Jinja file, replaces the model's own). A model without a template serves /v1/completions
    only (its chat routes answer 400)."""
    from instill.models import load_for_inference

    loaded = load_for_inference(model, spec, require_template=False)
    # Requests name the model by this short name (never a path the server would open).
    name = Path(model.rstrip("/")).name if Path(model).exists() else model
    names = [name] if name == model else [name, model]
    return Server(loaded.model, loaded.tokenizer, names, cfg)


def run_server(
    model: str,
    cfg: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    spec: ModelConfig | None = None,
) -> None:
    import uvicorn

    server = load_server(model, cfg, spec)
    from instill.console import console

    key = "required" if cfg.api_key else "off"
    console.print(f"serving {server.names[0]} on http://{host}:{port}/ (API key {key})")
    uvicorn.run(build_app(server), host=host, port=port, log_level="warning")
