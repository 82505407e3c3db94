"""The files beside a GGUF export that run it: an Ollama Modelfile and the llama-server command.

Ollama reads Go templates, not Jinja, so the Modelfile's TEMPLATE is derived from the tuned
model's own chat template by rendering probe conversations and cutting them apart:

    [user U]            -> (default system block) + user block
    [user U, asst A]    -> ... + assistant block          each block = prefix + content + suffix
    [sys S, user U]     -> system block + user block
    add_generation_prompt -> the text that opens the reply

The pieces are checked by rebuilding those conversations and others from them; a template they
cannot reproduce gets no TEMPLATE line (Ollama then falls back to its own guess), and says so.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from instill.data.render import end_of_turn_ids

_MARK = {"system": "\x01S\x01", "user": "\x01U\x01", "assistant": "\x01A\x01"}
TEMPLATE_FILE = "chat_template.jinja"


@dataclass
class Pieces:
    wrap: dict[str, tuple[str, str]]  # role -> (prefix, suffix) around the content
    generation: str  # what opens the assistant's reply
    default_system: str | None  # the system text the template adds when none is given

    def render(self, messages: list[dict]) -> str:
        if self.default_system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        body = "".join(
            self.wrap[m["role"]][0] + m["content"] + self.wrap[m["role"]][1] for m in messages
        )
        return body + self.generation


def _render(tokenizer, messages: list[dict], generation: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _msg(role: str) -> dict:
    return {"role": role, "content": _MARK[role]}


def _split(block: str, role: str) -> tuple[str, str] | None:
    prefix, found, suffix = block.partition(_MARK[role])
    return (prefix, suffix) if found and _MARK[role] not in suffix else None


def chat_pieces(tokenizer) -> Pieces | None:
    """The template cut into per-role prefixes and suffixes, or None when it is not that simple
    (it rewrites earlier turns, or its roles render differently by position)."""
    try:
        user_only = _render(tokenizer, [_msg("user")])
        with_reply = _render(tokenizer, [_msg("user"), _msg("assistant")])
        two_users = _render(tokenizer, [_msg("user"), _msg("assistant"), _msg("user")])
        with_system = _render(tokenizer, [_msg("system"), _msg("user")])
        prompt = _render(tokenizer, [_msg("user")], generation=True)
    except Exception:  # a template that refuses a probe is not one we can translate
        return None
    if not (with_reply.startswith(user_only) and two_users.startswith(with_reply)):
        return None
    user = _split(two_users[len(with_reply) :], "user")
    assistant = _split(with_reply[len(user_only) :], "assistant")
    if user is None or assistant is None:
        return None
    user_block = user[0] + _MARK["user"] + user[1]
    if not (user_only.endswith(user_block) and with_system.endswith(user_block)):
        return None
    system = _split(with_system[: -len(user_block)], "system")
    if system is None:
        return None
    default_block = user_only[: -len(user_block)]
    default = None
    if default_block:
        if not (default_block.startswith(system[0]) and default_block.endswith(system[1])):
            return None
        default = default_block[len(system[0]) : len(default_block) - len(system[1])]
    if not prompt.startswith(user_only):
        return None
    pieces = Pieces(
        {"system": system, "user": user, "assistant": assistant}, prompt[len(user_only) :], default
    )
    return pieces if _reproduces(tokenizer, pieces) else None


def _reproduces(tokenizer, pieces: Pieces) -> bool:
    probes = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b\nc"},
            {"role": "user", "content": "d"},
        ],
    ]
    return all(pieces.render(m) == _render(tokenizer, m, generation=True) for m in probes)


def go_template(pieces: Pieces) -> str:
    """The Ollama (Go text/template) form of the pieces, one line, no whitespace trimming: the
    pieces' own newlines are kept exactly."""
    branches = "".join(
        f'{"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{pre}{{{{ .Content }}}}{suf}{{{{ '
        for i, (role, (pre, suf)) in enumerate(pieces.wrap.items())
    )
    return f"{{{{ range .Messages }}}}{{{{ {branches}end }}}}{{{{ end }}}}{pieces.generation}"


def _quoted(text: str) -> str | None:
    return None if '"""' in text else f'"""{text}"""'


def modelfile(tokenizer, base: Path, adapter: str | None, source: str) -> tuple[str, str | None]:
    """The Modelfile text, and a note when the template could not be translated."""
    lines = [
        f"# Written by instill export from {source}.",
        f"FROM {base if base.is_absolute() else f'./{base}'}",
    ]
    if adapter is not None:
        # Ollama's source (parser/parser.go, server/create.go, llm/llama_server.go at
        # fb30760, v0.33.0-rc2) accepts ADAPTER and runs it with llama-server --lora
        lines.append(
            "# an Ollama that refuses ADAPTER: export --format gguf for a merged file instead"
        )
        lines.append(f"ADAPTER ./{adapter}")
    note = None
    pieces = chat_pieces(tokenizer)
    template = _quoted(go_template(pieces)) if pieces else None
    if template is None or "{{" in "".join(p + s for p, s in pieces.wrap.values()):
        note = (
            "the chat template could not be translated to Ollama's template language; the "
            "Modelfile has no TEMPLATE (Ollama guesses one from the GGUF), so check its prompts"
        )
    else:
        lines.append(f"TEMPLATE {template}")
        if pieces.default_system is not None and _quoted(pieces.default_system):
            lines.append(f"SYSTEM {_quoted(pieces.default_system)}")
    for tid in end_of_turn_ids(tokenizer):
        lines.append(f'PARAMETER stop "{tokenizer.convert_ids_to_tokens(tid)}"')
    lines.append("# greedy, as instill chat and eval answer (and as the export was verified)")
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n", note


def llama_server(model: Path, adapter: str | None) -> str:
    """A shell script that starts llama-server on the export (files beside it, template too)."""
    here = '"$(dirname "$0")"'
    args = ["-m", shlex.quote(str(model)) if model.is_absolute() else f"{here}/{model}"]
    if adapter is not None:
        args += ["--lora", f"{here}/{adapter}"]
    args += ["--jinja", "--chat-template-file", f"{here}/{TEMPLATE_FILE}"]
    return (
        "#!/bin/sh\n# Serve this export with llama.cpp's OpenAI-compatible server; extra "
        "arguments pass through (e.g. --port 8080).\n"
        f'exec llama-server {" ".join(args)} "$@"\n'
    )


def write_beside(folder: Path, tokenizer, model: Path, adapter: str | None, source: str):
    """Modelfile, llama-server.sh and the chat template into `folder`; returns the note, if any.
    `model`: the base GGUF for an adapter (absolute, or its name in the folder with
    --copy-base), else the merged file's name."""
    text, note = modelfile(tokenizer, model, adapter, source)
    (folder / "Modelfile").write_text(text)
    script = folder / "llama-server.sh"
    script.write_text(llama_server(model, adapter))
    script.chmod(0o755)
    (folder / TEMPLATE_FILE).write_text(tokenizer.chat_template or "")
    return note
