"""llama.cpp in-process, through the optional extra `llama-cpp-python`: the program people deploy
GGUF files with, used to verify exports and to evaluate a GGUF file (with a LoRA adapter GGUF).

    open_gguf(model.gguf, lora=adapter.gguf)  ->  LlamaCpp
        .tokenize(text)            llama.cpp's own tokenizer (as llama-server uses it)
        .logits(ids)               one row per position, teacher-forced
        .greedy(ids, n, stop_ids)  the tokens llama.cpp decodes greedily, and the decode time
        .is_end_of_generation(id), .metadata

Everything runs on the CPU, with an f32 KV cache so that an f32 export is compared with f32
arithmetic (llama.cpp's default f16 cache rounds keys and values).
"""

from __future__ import annotations

import importlib.metadata
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from instill.errors import InstillError

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


@dataclass
class Decoded:
    tokens: list[int]  # generated, up to and with the end-of-generation token when one came
    stopped: bool  # ended on an end-of-generation token (else: the length limit)
    decode_s: float  # time spent after the first generated token (the decode rate's clock)


class LlamaCpp:
    def __init__(self, llm, path: Path, lora: Path | None):
        self.llm, self.path, self.lora = llm, path, lora
        self.metadata: dict[str, str] = dict(llm.metadata)

    @property
    def name(self) -> str:
        return f"llama.cpp (llama-cpp-python {version()})"

    def tokenize(self, text: str) -> list[int]:
        # add_bos=True asks for what the vocabulary says (tokenizer.ggml.add_bos_token), as
        # llama-server does; special=True parses <|im_start|> and the like as control tokens
        return self.llm.tokenize(text.encode(), add_bos=True, special=True)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids, special=True).decode("utf-8", errors="replace")

    def text(self, ids: list[int]) -> str:
        """What a reply reads as (control tokens left out)."""
        return self.llm.detokenize(ids, special=False).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._lib().llama_vocab_is_eog(self.llm._model.vocab, token))

    def logits(self, ids: list[int]) -> np.ndarray:
        if len(ids) > self.llm.n_ctx():
            raise InstillError(f"{self.path}: {len(ids)} tokens exceed the context of this check")
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> Decoded:
        out: list[int] = []
        stopped, first = False, None
        room = self.llm.n_ctx() - len(ids)
        for token in self.llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
            if first is None:
                first = time.perf_counter()
            out.append(int(token))
            if token in stop_ids or self.is_end_of_generation(token):
                stopped = True
                break
            if len(out) >= min(max_new_tokens, room):
                break
        decode_s = time.perf_counter() - first if first is not None else 0.0
        return Decoded(out, stopped, decode_s)

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
    code = llama_cpp.llama_model_quantize(
        str(source).encode(), str(dest).encode(), ctypes.byref(params)
    )
    if code != 0:
        raise InstillError(
            f"llama.cpp's quantizer failed ({code}) turning {source.name} into {ftype}; its log "
            "above says why"
        )
