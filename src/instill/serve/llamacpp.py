"""`instill serve FILE.gguf --engine llama.cpp [--lora ADAPTER.gguf]` (or an export folder): the
same HTTP layer (app.py: routes, auth, Host check, limits, SSE) with llama.cpp decoding in-process.

    request -> Server (app.py) -> prompt: chat template -> text -> llama.cpp's tokenizer, as
            `instill eval --engine llama.cpp` and llama-server do
            -> LlamaCppScheduler.submit(job) -> its decode thread: infer/llamacpp.LlamaCpp.run,
               the decode loop evaluation uses too -> job.on_text (stop strings held back),
               job.done

llama-cpp-python's Llama decodes one sequence at a time (llama-server's parallel slots are not
part of its Python API), so requests run in turn in the order they came; --max-batch does not
apply, and --max-concurrent still bounds how many wait. Consecutive requests that share a
prompt prefix (a growing chat) reuse its KV cache. Sampling: temperature 0 is greedy;
otherwise llama.cpp's samplers with the request's top_k (0: none), top_p and temperature,
min_p off, and the repetition penalty over the last 64 tokens (llama.cpp's window, where
instill's own engine penalises the whole text). A request's seed seeds llama.cpp's sampler, so
the same request with the same seed gets the same reply; without one each reply draws afresh.
"""

from __future__ import annotations

from pathlib import Path

from instill.infer import llamacpp
from instill.serve.app import ServeConfig, Server
from instill.serve.scheduler import DecodeThread

CONTEXT = 2048  # tokens of KV cache llama.cpp allocates (at most the model's trained length)


class LlamaCppScheduler(DecodeThread):
    """scheduler.py's interface (submit, close) over llama.cpp: one decode thread, one reply at
    a time, each decoded by llama.cpp's one loop (infer/llamacpp.LlamaCpp.run, shared with
    evaluation); a failing reply fails its own job and the thread goes on."""

    def __init__(self, engine: llamacpp.LlamaCpp):
        self.engine = engine
        self._start("instill-llamacpp")

    def _loop(self) -> None:
        while (job := self.queue.get()) is not None:
            try:
                if not job.cancelled.is_set():  # a client that hung up while it waited
                    self.engine.run(job)
            except Exception as exc:  # one failed reply fails its job, never the thread
                job.error = f"generation failed: {exc}"
            finally:
                job.done.set()


class LlamaCppServer(Server):
    """app.py's Server with llama.cpp behind it: `model` is an open infer.llamacpp.LlamaCpp,
    `tokenizer` the HF tokenizer that renders the chat template (its ids are not used)."""

    def _context(self) -> int:
        return self.model.llm.n_ctx()

    def _scheduler(self) -> LlamaCppScheduler:
        return LlamaCppScheduler(self.model)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.model.chat_ids(self.tokenizer, messages)

    def text_ids(self, prompt: str) -> list[int]:
        # as the torch server: control tokens written in the text are parsed, no BOS added
        return self.model.tokenize(prompt, add_bos=False)


def load_llamacpp_server(
    model: str, lora: str | None, cfg: ServeConfig, chat_template: Path | None = None
) -> LlamaCppServer:
    """A GGUF file (with an adapter GGUF), or an export folder, ready to serve. A file without a
    chat template (and no --chat-template) serves /v1/completions only."""
    t = llamacpp.target(model, lora)
    engine, tokenizer = llamacpp.open_target(
        t, chat_template, n_ctx=_context(t.model), require_template=False
    )
    name = Path(model.rstrip("/")).name
    names = [name] if name == model else [name, model]
    return LlamaCppServer(engine, tokenizer, names, cfg)


def _context(path: Path) -> int:
    """CONTEXT, or the model's trained context when that is shorter."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields.get("general.architecture")
    if arch is None:
        return CONTEXT
    name = bytes(arch.parts[arch.data[0]]).decode()
    field = reader.fields.get(f"{name}.context_length")
    return min(CONTEXT, int(field.parts[field.data[0]][0])) if field is not None else CONTEXT
