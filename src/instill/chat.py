"""A terminal chat over the one generation function: multi-turn history, streaming replies."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from instill.atomic import write_text
from instill.config import SamplingConfig, default
from instill.config.load import parse_override, yaml_text
from instill.console import console, out
from instill.errors import InstillError
from instill.infer import GenParams, generate

HELP = "commands: /reset, /system TEXT, /params [key=value ...], /save FILE, /exit"


class ChatSession:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        system: str | None = None,
        max_new_tokens: int = default(SamplingConfig, "max_new_tokens"),
        temperature: float = default(SamplingConfig, "temperature"),
        **sampling,  # top_k, top_p, repetition_penalty, seed: GenParams' own
    ):
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.params = GenParams(max_new_tokens=max_new_tokens, temperature=temperature, **sampling)
        self.history: list[dict] = []

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def reply(self, text: str, stream: bool) -> str:
        self.history.append({"role": "user", "content": text})
        on_text = (lambda piece: out.print(piece, end="", markup=False)) if stream else None
        gen = generate(
            self.model,
            self.tokenizer,
            [self.messages()],
            self.params,
            on_text=on_text,
            batch_invariant=False,  # always one conversation: its speed comes first
        )[0]
        self.history.append({"role": "assistant", "content": gen.text})
        return gen.text

    def command(self, line: str) -> bool:
        """Handle a /command; False means leave the chat."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history = []
            console.print("history cleared")
        elif name == "/system":
            self.system, self.history = (arg or None), []
            console.print(f"system prompt {'set' if arg else 'removed'}; history cleared")
        elif name == "/params":
            self._set_params(arg)
            console.print(self._show_params(), markup=False)
        elif name == "/save" and arg:
            self._save(Path(arg))
        else:
            console.print(HELP)
        return True

    def _save(self, path: Path) -> None:
        """Write the conversation to `path` (whole or not at all); a place that cannot be
        written is one line, and the chat goes on with its history, to be saved elsewhere."""
        text = json.dumps(self.messages(), indent=2, ensure_ascii=False) + "\n"
        try:
            write_text(path, text, "the chat")
        except InstillError as exc:
            why = str(exc)
        except OSError as exc:  # a folder, a missing parent that is a file, ...
            why = f"{path}: cannot save the chat: {exc.strerror}"
        else:
            console.print(f"saved {len(self.history)} messages to {path}", markup=False)
            return
        console.print(
            f"error: {why}; the chat is kept: /save it elsewhere", markup=False, soft_wrap=True
        )

    def _set_params(self, arg: str) -> None:
        """key=value items, each held to the option of the same name's type and limits
        (SamplingConfig); a bad one is said and its setting kept."""
        from pydantic import ValidationError

        known = SamplingConfig.model_fields
        for item in arg.split():
            key, _, value = item.partition("=")
            if key not in known:
                console.print(f"unknown parameter {key!r}; known: {', '.join(known)}")
                continue
            try:  # values are YAML, as in a recipe: 0.7, 4, null (a seed back to random)
                checked = SamplingConfig.model_validate({key: parse_override(item)[1]})
            except (ValidationError, InstillError) as exc:
                why = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
                console.print(f"{item}: {why}", markup=False)
                continue
            self.params = replace(self.params, **{key: getattr(checked, key)})

    def _show_params(self) -> str:
        """The settings /params changes, as key=value (YAML values: seed=null)."""
        keys = SamplingConfig.model_fields
        return " ".join(f"{k}={yaml_text(getattr(self.params, k))}" for k in keys)

    def run(self, stream: TextIO, interactive: bool) -> None:
        """Interactive: prompt and stream. Piped: one reply per input line, printed whole."""
        if interactive:
            console.print(f"chat ready. {HELP}")
        while True:
            if interactive:
                try:
                    line = input("you> ")
                except EOFError:
                    break
            else:
                line = stream.readline()
                if not line:
                    break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    break
                continue
            if interactive:
                self.reply(line, stream=True)
                out.print()
            else:
                out.print(self.reply(line, stream=False), markup=False)
