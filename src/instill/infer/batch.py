"""`instill generate`: a JSONL file of prompts -> a JSONL file of replies, one output row per
input row in the same order, resumable (rows already in the output are skipped). All rows go
through one engine run (continuous batching); each reply is written once the rows before it
are."""

from __future__ import annotations

import json
from pathlib import Path

from instill import jsonl
from instill.atomic import writing
from instill.data.formats import ROLES
from instill.errors import InstillError
from instill.infer.generate import GenParams, generate


def row_messages(row: object, where: str) -> list[dict]:
    """A row is {"messages": [...]} or {"prompt": "..."} (or a bare JSON string)."""
    if isinstance(row, str):
        return [{"role": "user", "content": row}]
    if not isinstance(row, dict):
        raise InstillError(f"{where}: expected a JSON object with 'messages' or 'prompt'")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise InstillError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise InstillError(f"{where}: messages[{i}] needs a role in {', '.join(ROLES)}")
            if not isinstance(m.get("content"), str):
                raise InstillError(f"{where}: messages[{i}].content must be a string")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}]
    raise InstillError(f"{where}: expected a 'messages' list or a 'prompt' string")


def read_inputs(path: Path) -> list[tuple[object, list[dict]]]:
    if not path.is_file():
        raise InstillError(f"{path}: input file not found")
    rows = []
    for n, line in jsonl.lines(jsonl.read_text(path)):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InstillError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        rows.append((row, row_messages(row, f"{path}:{n}")))
    return rows


def done_rows(path: Path) -> int:
    """Complete rows already written; a partial last line (a crash mid-write) is cut off."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        path.write_bytes(keep)
    return keep.count(b"\n")


def generate_file(
    model, tokenizer, inputs: Path, output: Path, params: GenParams, batch_size: int = 8
) -> tuple[int, int]:
    """Returns (rows generated now, rows skipped because already in the output)."""
    from rich.progress import Progress

    from instill.console import console

    rows = read_inputs(inputs)
    skip = done_rows(output)
    if skip > len(rows):
        raise InstillError(
            f"{output}: has {skip} rows but {inputs} has only {len(rows)}; "
            "choose a new --output for a different input"
        )
    todo = rows[skip:]
    with writing(output, "generated rows", "--output"):
        output.parent.mkdir(parents=True, exist_ok=True)
        f = open(output, "ab", buffering=0)  # unbuffered: nothing left to flush on close
    done: dict[int, str] = {}
    written = 0

    def write(i: int, gen) -> None:
        """Rows are written in input order: each reply as soon as all before it are."""
        nonlocal written
        row = todo[i][0]
        record = dict(row) if isinstance(row, dict) else {"prompt": row}
        record.update(
            output=gen.text,
            finish_reason=gen.finish_reason,
            prompt_tokens=gen.prompt_tokens,
            completion_tokens=gen.completion_tokens,
        )
        done[i] = jsonl.dumps(record) + "\n"
        lines = []
        while written in done:
            lines.append(done.pop(written))
            written += 1
        if lines:
            with writing(output, "generated rows", "--output"):
                # one write per run of finished rows, so a resume loses only the rows in
                # flight (a line cut by a full disk or a kill is dropped by done_rows)
                f.write("".join(lines).encode("utf-8"))
            bar.advance(task, len(lines))

    with f, Progress(console=console) as bar:
        task = bar.add_task("generating", total=len(rows), completed=skip)
        # one engine run over every row: a row that ends frees its slot for the next one
        generate(
            model, tokenizer, [m for _, m in todo], params, batch_size=batch_size, on_reply=write
        )
    return len(todo), skip
