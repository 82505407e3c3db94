"""OpenAI-compatible server: FastAPI app, continuous-batching scheduler, web chat page."""

from __future__ import annotations

from pathlib import Path

from instill.serve.app import ServeConfig, Server, build_app

__all__ = ["ServeConfig", "Server", "build_app", "load_server", "run_server"]


def load_server(model: str, cfg: ServeConfig) -> Server:
    from instill.models import load_for_inference

    loaded = load_for_inference(model)
    # Requests name the model by this short name (never a path the server would open).
    name = Path(model.rstrip("/")).name if Path(model).exists() else model
    names = [name] if name == model else [name, model]
    return Server(loaded.model, loaded.tokenizer, names, cfg)


def run_server(model: str, cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    server = load_server(model, cfg)
    from instill.console import console

    key = "required" if cfg.api_key else "off"
    console.print(f"serving {server.names[0]} on http://{host}:{port}/ (API key {key})")
    uvicorn.run(build_app(server), host=host, port=port, log_level="warning")
