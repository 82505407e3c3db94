"""Every command's options come from a config model (config/commands.py, or a recipe section):
the option's default and --help are the field's, written once."""

import importlib
import sys

import pytest
import typer

from instill.config import PairsConfig, SamplingConfig, ServeConfig, describe
from instill.config import commands as c

# command -> the models its options come from (option name -> field of the same name)
SOURCES = {
    ("eval",): [c.EvalOptions],
    ("eval-pairs",): [c.EvalPairsOptions],
    ("compare",): [c.CompareOptions],
    ("report",): [c.ReportOptions],
    ("train",): [c.TrainOptions],
    ("quickstart",): [c.QuickstartOptions],
    ("experiment", "transfer"): [c.TransferOptions],
    ("chat",): [c.ChatOptions, SamplingConfig],
    ("generate",): [c.GenerateOptions, SamplingConfig, c.ChatOptions],
    ("serve",): [c.ServeOptions, ServeConfig, c.EvalOptions],
    ("pairs", "make"): [PairsConfig, c.PairsSourceOptions, c.EvalOptions],
    ("data", "inspect"): [c.InspectOptions],
    ("export",): [c.ExportOptions],
}
RENAMED = {"out_file": "out"}  # a parameter whose Python name is not the field's


def _command(path):
    from instill.cli import app

    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def _field(models, name):
    for model in models:
        if name in model.model_fields:
            return model, name
    return None


@pytest.mark.parametrize("path", list(SOURCES), ids=" ".join)
def test_each_option_is_a_config_field(path):
    cmd = _command(path)
    options = [p for p in cmd.params if p.param_type_name == "option"]  # typer ships its click
    assert options
    for p in options:
        found = _field(SOURCES[path], RENAMED.get(p.name, p.name))
        assert found is not None, (path, p.name)
        model, key = found
        assert p.help == describe(model, key), (path, p.name)
        if model.model_fields[key].is_required():
            assert p.required, (path, p.name)
        else:
            want = c.option_default(model, key)
            assert p.default == (list(want) if isinstance(want, tuple) else want), (path, p.name)


def test_no_option_default_is_a_literal_in_the_cli():
    """cli.py builds options from fields only: it never calls typer.Option with a value."""
    import inspect

    import instill.cli

    source = inspect.getsource(instill.cli)
    assert source.count("typer.Option(") == 2  # --version, and option() itself


def test_a_default_defined_once_shows_in_help(monkeypatch, capsys):
    """Negative control: change SamplingConfig's max_new_tokens default (the 256 that chat,
    generate, the engine and the server share) and chat --help follows it."""
    import instill.cli

    field = SamplingConfig.model_fields["max_new_tokens"]
    monkeypatch.setattr(field, "default", 300)
    try:
        importlib.reload(instill.cli)
        monkeypatch.setattr(sys, "argv", ["instill", "chat", "--help"])
        instill.cli.main()
        assert "Longest reply, in tokens. [default: 300]" in " ".join(
            capsys.readouterr().out.split()
        )
    finally:
        monkeypatch.undo()
        importlib.reload(instill.cli)


def test_linked_defaults_follow_their_recipe_key(monkeypatch):
    """eval --batch-size is eval.batch_size under another name: its default is read from
    EvalConfig when the CLI is built, not copied into EvalOptions' field."""
    from instill.config import EvalConfig

    monkeypatch.setattr(EvalConfig.model_fields["batch_size"], "default", 5)
    assert c.option_default(c.EvalOptions, "batch_size") == 5
    monkeypatch.undo()
    assert c.option_default(c.EvalOptions, "batch_size") == 32


def test_the_engine_and_server_defaults_are_sampling_configs():
    from instill.chat import ChatSession
    from instill.infer.engine import GenParams
    from instill.serve.requests import DEFAULT_MAX_TOKENS

    cfg = SamplingConfig()
    assert GenParams().max_new_tokens == cfg.max_new_tokens == DEFAULT_MAX_TOKENS
    assert ChatSession(None, None).params == GenParams()
