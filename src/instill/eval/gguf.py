"""`instill eval FILE.gguf --engine llama.cpp [--lora ADAPTER.gguf]`: score the deployed
artifact itself, as llama-server would answer.

    target(model, lora)  a .gguf file, or an export folder (its instill.json names the files;
                         an adapter's base GGUF must still have the sha256 recorded there)
    each prompt: chat template -> text -> llama.cpp's tokenizer -> greedy decode until an
    end-of-generation token -> text  -> the same scorers as every other evaluation

The template is the export's chat_template.jinja when there is one (what llama-server.sh
passes), else --chat-template, else the one inside the GGUF file.

An export folder of a run (RUN/export/NAME, or any folder whose instill.json names the run) is
scored on the run's own held-out split by default and recorded in RUN/eval/deployed/NAME/, with
the export's type, size and verification, so the run report can set the deployed artifact's
score beside the in-memory one (deployed()).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from instill.config import EvalConfig
from instill.console import console
from instill.errors import InstillError
from instill.eval.runner import (
    SuiteResult,
    check_renders,
    generation_records,
    task_split,
    write_result,
)
from instill.eval.tasks import Task
from instill.infer.generate import Generation
from instill.models import llamacpp
from instill.rundir import RunDir, RunSplit


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


def export_run_dir(model: str) -> Path | None:
    """The run an export folder was made from (its instill.json's run, when that still holds a
    tuned model), else None."""
    manifest = Path(model) / "instill.json"
    if not manifest.is_file():
        return None
    run = json.loads(manifest.read_text()).get("run")
    return Path(run) if run and (Path(run) / "final").is_dir() else None


def run_split(run: Path) -> RunSplit:
    """The run's own split, from its recipe read through the typed schema (RunDir)."""
    return RunDir(run).split()


def deployed_record(folder: Path) -> dict:
    """What the run report needs of an export: its kind, size, verification, and the sha256 of
    its instill.json (a later export into the same folder makes the score stale)."""
    raw = (folder / "instill.json").read_bytes()
    manifest = json.loads(raw)
    export = manifest.get("export") or {}
    base = export.get("base_gguf") or {}
    return {
        "export": str(folder.resolve()),
        "format": export.get("format"),
        "quant": export.get("quant"),
        "size_bytes": export.get("size_bytes"),
        "base_size_bytes": base.get("size_bytes"),
        "verification": manifest.get("verification"),
        "manifest_sha256": hashlib.sha256(raw).hexdigest(),
    }


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


def _generate(engine, tokenizer, task: Task, cfg: EvalConfig) -> tuple[list[Generation], dict]:
    from instill.data.render import end_of_turn_ids, render_text

    stop = set(end_of_turn_ids(tokenizer))
    gens, decoded, decode_s = [], 0, 0.0
    for ex in task.examples:
        ids = engine.tokenize(render_text(tokenizer, ex.prompt, generation_prompt=True))
        d = engine.greedy(ids, task.max_new_tokens or cfg.max_new_tokens, stop)
        body = d.tokens[:-1] if d.stopped else d.tokens
        finish = "stop" if d.stopped else "length"
        gens.append(Generation(engine.text(body), len(ids), len(body), finish, tuple(d.tokens)))
        # the first token comes from the prompt's pass; the rest are decode steps
        decoded += max(0, len(d.tokens) - 1)
        decode_s += d.decode_s
    speed = {
        "decode_tokens": decoded,
        "decode_s": round(decode_s, 3),
        "decode_tokens_per_s": round(decoded / decode_s, 1) if decode_s else None,
    }
    return gens, speed


def run_llamacpp(
    model: str,
    lora: str | None,
    tasks: list[Task],
    cfg: EvalConfig,
    folder: Path,
    chat_template: Path | None = None,
) -> dict[str, SuiteResult]:
    t = target(model, lora)
    for task in tasks:
        if task.metric in ("choice", "drift"):
            raise InstillError(
                f"suite {task.name}: scored by log-likelihood or against a base model's "
                "replies, which --engine llama.cpp does not do; it scores generated answers "
                "(builtin, and files with text metrics)"
            )
    tokenizer = tokenizer_for(t, chat_template)
    engine = llamacpp.open_gguf(
        t.model, lora=t.lora, n_ctx=2048, logits_all=False, what="--engine llama.cpp"
    )
    results = {}
    try:
        for task in tasks:
            if not task.examples:
                raise InstillError(f"suite {task.name}: no examples to evaluate")
            check_renders(tokenizer, task)
            console.print(
                f"evaluating {t.label} with llama.cpp on {task.name} "
                f"({len(task.examples)} examples)..."
            )
            start = time.perf_counter()
            gens, speed = _generate(engine, tokenizer, task, cfg)
            result = SuiteResult(
                task.name,
                t.label,
                generation_records(task, gens),
                time.perf_counter() - start,
                metric=task.metric,
                holdout=sorted(task.holdout),
                split=task_split(task),
                extra={
                    "engine": engine.name,
                    **speed,
                    **({"deployed": deployed_record(t.export)} if t.export else {}),
                },
            )
            write_result(result, folder, task.name)
            results[task.name] = result
    finally:
        engine.close()
    return results
