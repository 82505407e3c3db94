"""`instill serve FILE.gguf --engine llama.cpp [--lora ADAPTER.gguf]` (or an export folder): the
same HTTP layer (app.py: routes, auth, Host check, limits, SSE) with llama.cpp decoding in-process.

    request -> Server (app.py) -> prompt: chat template -> text -> llama.cpp's tokenizer, as
            `instill eval --engine llama.cpp` and llama-server do
            -> LlamaCppScheduler.submit(job) -> its decode thread: llama.cpp generates the reply
               token by token -> job.on_text (stop strings held back), job.done

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

from instill.data.render import end_of_turn_ids, render_text
from instill.infer.engine import Job
from instill.infer.text import TextStream, cut_at_stop
from instill.serve.app import ServeConfig, Server
from instill.serve.scheduler import DecodeThread

CONTEXT = 2048  # tokens of KV cache llama.cpp allocates (at most the model's trained length)


class _Decoder:
    """llama.cpp's detokenizer with the tokenizer method TextStream calls."""

    def __init__(self, engine):
        self.engine = engine

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.engine.text(ids)


def llamacpp_seed(seed: int) -> int:
    """A request's seed (any int64, as OpenAI's) as llama.cpp's 32-bit sampler seed: taken modulo
    0xFFFFFFFF, so it is never LLAMA_DEFAULT_SEED (0xFFFFFFFF, which llama.cpp reads as "draw a
    random seed") and never wraps silently in ctypes; the same seed gives the same reply."""
    return seed % 0xFFFFFFFF


class LlamaCppScheduler(DecodeThread):
    """scheduler.py's interface (submit, close) over llama.cpp: one decode thread, one reply at
    a time; a failing reply fails its own job and the thread goes on."""

    def __init__(self, engine, tokenizer):
        self.engine = engine
        self.eot = set(end_of_turn_ids(tokenizer))
        self.decoder = _Decoder(engine)
        self._start("instill-llamacpp")

    def _loop(self) -> None:
        while (job := self.queue.get()) is not None:
            try:
                if not job.cancelled.is_set():  # a client that hung up while it waited
                    self._run(job)
            except Exception as exc:  # one failed reply fails its job, never the thread
                job.error = f"generation failed: {exc}"
            finally:
                job.done.set()

    def _run(self, job: Job) -> None:
        import llama_cpp

        p, llm = job.params, self.engine.llm
        llm.set_seed(llama_cpp.LLAMA_DEFAULT_SEED if p.seed is None else llamacpp_seed(p.seed))
        stream = TextStream(self.decoder, p.stop, job.on_text)
        end = None
        tokens = llm.generate(
            job.prompt,
            temp=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            min_p=0.0,
            typical_p=1.0,
            repeat_penalty=p.repetition_penalty,
            reset=True,
        )
        try:
            for token in tokens:
                token = int(token)
                if token in self.eot or self.engine.is_end_of_generation(token):
                    end = token
                    break
                job.ids.append(token)
                if stream.push(token) or len(job.ids) >= p.max_new_tokens:
                    break
                if job.cancelled.is_set():
                    return
        finally:
            tokens.close()
        text, stopped = cut_at_stop(self.engine.text(job.ids), p.stop)
        job.text, job.end_of_turn = text, end
        job.finish_reason = "stop" if stopped or end is not None else "length"
        stream.finish(text)


class LlamaCppServer(Server):
    """app.py's Server with llama.cpp behind it: `model` is an open models.llamacpp.LlamaCpp,
    `tokenizer` the HF tokenizer that renders the chat template (its ids are not used)."""

    def _context(self) -> int:
        return self.model.llm.n_ctx()

    def _scheduler(self) -> LlamaCppScheduler:
        return LlamaCppScheduler(self.model, self.tokenizer)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.model.tokenize(render_text(self.tokenizer, messages, generation_prompt=True))

    def text_ids(self, prompt: str) -> list[int]:
        # as the torch server: control tokens written in the text are parsed, no BOS added
        return self.model.llm.tokenize(prompt.encode(), add_bos=False, special=True)


def load_llamacpp_server(
    model: str, lora: str | None, cfg: ServeConfig, chat_template: Path | None = None
) -> LlamaCppServer:
    """A GGUF file (with an adapter GGUF), or an export folder, ready to serve. A file without a
    chat template (and no --chat-template) serves /v1/completions only."""
    from instill.eval.gguf import target, tokenizer_for
    from instill.models import llamacpp

    t = target(model, lora)
    tokenizer = tokenizer_for(t, chat_template, require_template=False)
    engine = llamacpp.open_gguf(
        t.model, lora=t.lora, n_ctx=_context(t.model), logits_all=False, what="--engine llama.cpp"
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
