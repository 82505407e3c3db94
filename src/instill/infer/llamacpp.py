"""llama.cpp, instill's second engine: in-process, through the optional extra
`llama-cpp-python` (the program people deploy GGUF files with). One module for everything that
runs a GGUF in llama.cpp: evaluation (eval/gguf.py), serving (serve/llamacpp.py), and the
export's verification and quantizer (export/).

    choose_engine(engine, lora)  torch or llama.cpp, and the options each refuses (eval, serve)
    target(model, lora)          a .gguf file (+ an adapter GGUF), or an export folder: its
                                 instill.json names the files; an adapter's base GGUF must still
                                 have the sha256 recorded there
    open_target(target, ...)     -> LlamaCpp, and the HF tokenizer that renders the chat template
    open_gguf(model.gguf, lora=adapter.gguf)  ->  LlamaCpp
        .tokenize(text)          llama.cpp's own tokenizer (as llama-server uses it)
        .logits(ids)             one row per position, teacher-forced (the export's verifier)
        .run(job)                the one decode loop, for eval and serve: llama.cpp generates
                                 token by token -> end of turn, max_new_tokens, stop strings and
                                 the finish reason as the torch engine has them (infer/engine.py
                                 end_reply, infer/text.py) -> job.ids, job.text, job.finish_reason
        .is_end_of_generation(id), .metadata
    quantize(f32.gguf, dest, ftype)  llama.cpp's own quantizer

It lives in infer/ beside the torch engine because its decode loop fills the torch engine's Job
with the same finish rules: a module in models/ could not import them (models/ sits below the
stages). Everything runs on the CPU, with an f32 KV cache so that an f32 export is compared with
f32 arithmetic (llama.cpp's default f16 cache rounds keys and values).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from instill.config.commands import ENGINES
from instill.errors import InstillError
from instill.infer.engine import Job, end_reply
from instill.infer.text import TextStream

INSTALL = ".venv/bin/pip install -c constraints.txt -e '.[llamacpp]' (compiles llama.cpp once)"


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str | None:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def require(what: str):
    """The llama_cpp module, or an error that says how to install it and what needed it."""
    try:
        import llama_cpp
    except ImportError:
        raise InstillError(
            f"{what} needs llama.cpp, which is not installed; install the extra: {INSTALL}"
        ) from None
    return llama_cpp


def threads() -> int:
    """Half the cores, at most 4: llama.cpp's threads spin while they wait, so one per core on a
    busy machine slows everything down (its own decoding first)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) // 2))


def choose_engine(engine: str, lora: str | None, *, int8: bool = False) -> str:
    """The engine `instill eval` and `instill serve` run: torch (the default) or llama.cpp, with
    the options only one of them takes refused with the other."""
    if engine not in ENGINES:
        raise InstillError(f"--engine {engine}: choose torch or llama.cpp")
    if lora is not None and engine != "llama.cpp":
        raise InstillError(
            "--lora: an adapter GGUF is applied by llama.cpp; add --engine llama.cpp"
        )
    if int8 and engine != "torch":
        raise InstillError(
            "--int8: applies to --engine torch; a GGUF carries its own quantisation (instill "
            "export --quant)"
        )
    return engine


def llamacpp_seed(seed: int) -> int:
    """A request's seed (any int64, as OpenAI's) as llama.cpp's 32-bit sampler seed: taken modulo
    0xFFFFFFFF, so it is never LLAMA_DEFAULT_SEED (0xFFFFFFFF, which llama.cpp reads as "draw a
    random seed") and never wraps silently in ctypes; the same seed gives the same reply."""
    return seed % 0xFFFFFFFF


class LlamaCpp:
    def __init__(self, llm, path: Path, lora: Path | None):
        self.llm, self.path, self.lora = llm, path, lora
        self.metadata: dict[str, str] = dict(llm.metadata)
        # end-of-turn tokens of the chat template's tokenizer (open_target), on top of
        # llama.cpp's own end-of-generation ones
        self.eot: set[int] = set()

    @property
    def name(self) -> str:
        return f"llama.cpp (llama-cpp-python {version()})"

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        # add_bos=True asks for what the vocabulary says (tokenizer.ggml.add_bos_token), as
        # llama-server does; special=True parses <|im_start|> and the like as control tokens
        return self.llm.tokenize(text.encode(), add_bos=add_bos, special=True)

    def chat_ids(self, tokenizer, messages) -> list[int]:
        """A conversation's prompt as llama-server builds it: the chat template (rendered by
        `tokenizer`, open_target's) to text, then llama.cpp's tokenizer."""
        from instill.data.render import render_text

        return self.tokenize(render_text(tokenizer, messages, generation_prompt=True))

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids, special=True).decode("utf-8", errors="replace")

    def text(self, ids: list[int]) -> str:
        """What a reply reads as (control tokens left out)."""
        return self.decode(ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """llama.cpp's detokenizer as a tokenizer's decode (what infer/text.TextStream calls)."""
        raw = self.llm.detokenize(ids, special=not skip_special_tokens)
        return raw.decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._lib().llama_vocab_is_eog(self.llm._model.vocab, token))

    def logits(self, ids: list[int]) -> np.ndarray:
        if len(ids) > self.llm.n_ctx():
            raise InstillError(f"{self.path}: {len(ids)} tokens exceed the context of this check")
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def run(self, job: Job) -> float:
        """The one decode loop, for eval and serve: llama.cpp generates the reply to job.prompt
        token by token with job.params (temperature 0: greedy; else llama.cpp's samplers, min_p
        off, the repetition penalty over its last-64-token window) until an end-of-turn or
        end-of-generation token, max_new_tokens (or the context's end), a stop string, or
        job.cancelled. The reply ends as the torch engine's do (engine.end_reply): job.ids
        without the end of turn, job.text cut at a stop string, job.finish_reason. job.on_text
        gets the text as it grows (stop strings held back). Returns the seconds spent after the
        first generated token (the decode rate's clock)."""
        p, llm = job.params, self.llm
        llm.set_seed(self._lib().LLAMA_DEFAULT_SEED if p.seed is None else llamacpp_seed(p.seed))
        wants_text = job.on_text is not None or bool(p.stop)
        stream = TextStream(self, p.stop, job.on_text) if wants_text else None
        limit = min(p.max_new_tokens, llm.n_ctx() - len(job.prompt))
        ids, end, first = job.ids, None, None
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
                if first is None:
                    first = time.perf_counter()
                token = int(token)
                if token in self.eot or self.is_end_of_generation(token):
                    end = token
                    break
                ids.append(token)
                if (stream is not None and stream.push(token)) or len(ids) >= limit:
                    break
                if job.cancelled.is_set():  # a client that hung up: no reply to finish
                    return 0.0
        finally:
            tokens.close()
        decode_s = time.perf_counter() - first if first is not None else 0.0
        text = end_reply(job, ids, end, self.text(ids))
        if stream is not None:
            stream.finish(text)
        return decode_s

    @staticmethod
    def _lib():
        import llama_cpp

        return llama_cpp

    def close(self) -> None:
        self.llm.close()


def open_gguf(
    path: Path,
    *,
    lora: Path | None = None,
    n_ctx: int = 1024,
    logits_all: bool = True,
    what: str = "this check",
    n_threads: int | None = None,
) -> LlamaCpp:
    """Load a GGUF file (and a LoRA adapter GGUF applied at run time) into llama.cpp."""
    llama_cpp = require(what)
    f32 = llama_cpp.GGML_TYPE_F32
    n_threads = n_threads or threads()
    try:
        llm = llama_cpp.Llama(
            str(path),
            lora_path=str(lora) if lora else None,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            logits_all=logits_all,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            type_k=f32,
            type_v=f32,
            flash_attn=False,
            verbose=False,
        )
    except (ValueError, RuntimeError) as exc:
        files = f"{path}" + (f" with the adapter {lora}" if lora else "")
        raise InstillError(f"llama.cpp could not load {files}: {exc}") from None
    return LlamaCpp(llm, Path(path), Path(lora) if lora else None)


@dataclass
class Target:
    model: Path  # the GGUF llama.cpp loads
    lora: Path | None  # an adapter GGUF applied on it
    template: Path | None  # a chat template file beside an export

    export: Path | None = None  # the export folder the files came from

    @property
    def label(self) -> str:
        return f"{self.model.name}" + (f" + {self.lora.name}" if self.lora else "")


def target(model: str, lora: str | None) -> Target:
    path = Path(model)
    if path.is_dir() and (path / "instill.json").is_file():
        if lora is not None:
            raise InstillError(f"--lora: {path} is an export folder; it names its own files")
        export = json.loads((path / "instill.json").read_text()).get("export") or {}
        if export.get("format") not in ("gguf", "gguf-lora"):
            raise InstillError(
                f"{path}: not a GGUF export (instill.json format "
                f"{export.get('format')}); --engine llama.cpp runs GGUF files"
            )
        template = path / "chat_template.jinja"
        template = template if template.is_file() else None
        if export["format"] == "gguf-lora":
            base = export["base_gguf"]
            model = path / base["file"] if base.get("file") else Path(base["path"])
            check_base(model, base.get("sha256"), path)
            return Target(model, path / export["file"], template, path)
        return Target(path / export["file"], None, template, path)
    for what, file in (("MODEL", path), ("--lora", Path(lora) if lora else None)):
        if file is not None and (not file.is_file() or file.suffix != ".gguf"):
            raise InstillError(
                f"{what} {file}: --engine llama.cpp needs a .gguf file (or an export folder "
                "written by instill export --format gguf / gguf-lora)"
            )
    return Target(path, Path(lora) if lora else None, None)


_HASHED: dict[tuple, str] = {}  # (path, inode, size, mtime) -> sha256: once per file a process


def check_base(model: Path, recorded: str | None, export: Path) -> None:
    """The base GGUF an adapter export names must be the file it was exported for: another
    base would score (or serve) another model under the export's name."""
    if recorded is None:  # an export written before the hash was recorded
        return
    if not model.is_file():
        raise InstillError(
            f"{model}: the base GGUF of the export {export} is missing; put the file with "
            f"sha256 {recorded} back there, or export the run again"
        )
    from instill.models.resolve import sha256_file

    st = model.stat()
    key = (str(model.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    found = _HASHED.get(key) or _HASHED.setdefault(key, sha256_file(model))
    if found != recorded:
        raise InstillError(
            f"{model}: sha256 {found}, but {export} was exported for a base GGUF with sha256 "
            f"{recorded} (its instill.json); the adapter reproduces the tuned model on that "
            f"base only: put that exact file back at {model}, or export the run again"
        )


def tokenizer_for(t: Target, chat_template: Path | None, require_template: bool = True):
    """An HF tokenizer read from the GGUF, for rendering the chat template (its tokens are not
    used: llama.cpp tokenises the rendered text itself)."""
    from transformers import AutoTokenizer

    from instill.data.render import load_chat_template
    from instill.models.resolve import quiet_gguf_reader

    with quiet_gguf_reader():
        tok = AutoTokenizer.from_pretrained(str(t.model.parent), gguf_file=t.model.name)
    file = chat_template or t.template
    if file is not None:
        tok.chat_template = load_chat_template(file)
    if not tok.chat_template and require_template:
        raise InstillError(f"{t.model}: no chat template in the file; give --chat-template")
    return tok


def open_target(
    t: Target,
    chat_template: Path | None,
    *,
    n_ctx: int,
    require_template: bool = True,
) -> tuple[LlamaCpp, object]:
    """The target loaded into llama.cpp for generation, and the HF tokenizer that renders its
    chat template; the reply ends at llama.cpp's end-of-generation tokens and the template's
    end-of-turn ones."""
    from instill.data.render import end_of_turn_ids

    tokenizer = tokenizer_for(t, chat_template, require_template)
    engine = open_gguf(
        t.model, lora=t.lora, n_ctx=n_ctx, logits_all=False, what="--engine llama.cpp"
    )
    engine.eot = set(end_of_turn_ids(tokenizer))
    return engine, tokenizer


def quantize(source: Path, dest: Path, ftype: str, what: str) -> None:
    """llama.cpp's own quantizer (what llama-quantize runs), in-process: `source` (an f32 or f16
    GGUF) to `dest` at llama.cpp's file type `ftype` (a LLAMA_FTYPE_MOSTLY_* suffix such as
    "q4_k_m"), with llama.cpp's per-tensor rules for it. No importance matrix: llama-cpp-python
    passes one to the quantizer (llama_model_imatrix_data) but cannot collect one (llama.cpp's
    imatrix tool is not in the binding), so the types that need one are not offered."""
    import ctypes

    llama_cpp = require(what)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = threads()
    # llama-cpp-python's log callback prints only errors once a model was opened quietly; the
    # whole log (one line per tensor and the loader's dump, ~500 lines) is kept, not printed
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with _stderr_kept() as log:
            code = llama_cpp.llama_model_quantize(
                str(source).encode(), str(dest).encode(), ctypes.byref(params)
            )
    finally:
        logger.setLevel(level)
    if code != 0:
        tail = "\n".join("".join(log).splitlines()[-15:])
        raise InstillError(
            f"llama.cpp's quantizer failed ({code}) turning {source.name} into {ftype}; the end "
            f"of its log:\n{tail}"
        )


@contextlib.contextmanager
def _stderr_kept():
    """Keep what is written to stderr during the block out of the terminal: llama.cpp's C code
    writes to file descriptor 2, and llama-cpp-python's log callback prints to sys.stderr.
    Yields a list that holds both as one string once the block has ended."""
    import io
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    python, kept = io.StringIO(), []
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            with contextlib.redirect_stderr(python):
                yield kept
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept.append(tmp.read().decode("utf-8", "replace") + python.getvalue())
