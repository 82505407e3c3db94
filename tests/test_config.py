from pathlib import Path

import pytest
from pydantic import ValidationError

from instill.config import load_recipe, recipe_help
from instill.config.load import apply_overrides
from instill.errors import InstillError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "src" / "instill" / "recipes").rglob("*.yaml"))


def test_recipes_are_shipped():
    assert {p.stem for p in SHIPPED} >= {"quickstart", "lora", "full"}
    # the repository's recipes/ is the packaged folder, not a copy
    assert sorted(p.name for p in (REPO / "recipes").rglob("*.yaml")) == [p.name for p in SHIPPED]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem


def test_dotted_overrides_and_types():
    recipe = load_recipe(
        REPO / "recipes" / "lora.yaml",
        ["train.lr=1e-4", "adapter.r=8", "adapter.target_modules=[q_proj,v_proj]"],
    )
    assert recipe.train.lr == 1e-4
    assert recipe.adapter.r == 8
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]


def test_overrides_do_not_mutate_input():
    data = {"train": {"lr": 1.0}}
    apply_overrides(data, ["train.lr=2"])
    assert data == {"train": {"lr": 1.0}}


def test_unknown_key_suggests_closest(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(InstillError) as err:
        load_recipe(f)
    msg = str(err.value)
    assert str(f) in msg and "'train.lrr'" in msg and "did you mean 'train.lr'" in msg


def test_unknown_section_suggests_closest():
    with pytest.raises(InstillError, match=r"unknown key 'adaptor' \(did you mean 'adapter'\?\)"):
        load_recipe(None, ["adaptor.r=4"])


def test_wrong_type_names_key_and_value(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("train:\n  batch_size: many\n")
    with pytest.raises(InstillError, match=r"train\.batch_size: .*integer.*'many'"):
        load_recipe(f)


def test_bad_yaml_names_line(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("train:\n  lr: [1,\n")
    with pytest.raises(InstillError, match=r"line \d+ is not valid YAML"):
        load_recipe(f)


def test_recipe_is_frozen():
    recipe = load_recipe(None)
    with pytest.raises(ValidationError):
        recipe.train.lr = 3.0


def test_no_data_is_an_error():
    with pytest.raises(InstillError, match="no training data"):
        load_recipe(None, ["data.builtin=null"])


def test_help_text_comes_from_field_descriptions():
    from instill.config.schema import TrainConfig

    text = recipe_help()
    assert TrainConfig.model_fields["lr"].description in text
    assert "train.lr [default: 0.0002]" in text


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 2


def _cli_params(command: str) -> list:
    import typer

    from instill.cli import app

    return typer.main.get_command(app).commands[command].params


def _cli_defaults(command: str) -> dict:
    return {p.name: p.default for p in _cli_params(command)}


def test_cli_option_defaults_are_the_config_defaults():
    from instill.config import (
        BuiltinDataConfig,
        DataConfig,
        EvalConfig,
        ModelConfig,
        ServeConfig,
        SuiteConfig,
    )

    ev = _cli_defaults("eval")
    assert ev["batch_size"] == EvalConfig().batch_size
    # per_family, seed and max_new_tokens are None when not given (an export of a run is then
    # scored on the run's own split); otherwise they fall back to config/'s defaults, which
    # their help names
    builtin = BuiltinDataConfig()
    assert (ev["per_family"], ev["seed"], ev["max_new_tokens"]) == (None, None, None)
    helps = {p.name: p.help for p in _cli_params("eval")}
    assert f"default {builtin.eval_per_family};" in helps["per_family"]
    assert f"(default {builtin.seed})" in helps["seed"]
    assert f"(default {EvalConfig().max_new_tokens};" in helps["max_new_tokens"]
    assert ev["metric"] == SuiteConfig.model_fields["metric"].default
    serve, cfg = _cli_defaults("serve"), ServeConfig()
    assert (serve["host"], serve["max_batch"], serve["max_concurrent"]) == (
        cfg.host,
        cfg.max_batch,
        cfg.max_concurrent,
    )
    assert serve["max_tokens_cap"] == cfg.max_tokens_cap
    import typer

    from instill.cli import app

    data = typer.main.get_command(app).commands["data"].commands["inspect"]
    d = {p.name: p.default for p in data.params}
    assert d["model"] == ModelConfig().name
    assert d["max_length"] == DataConfig.model_fields["max_length"].default


def test_cli_defaults_follow_a_changed_config_default(monkeypatch):
    """Negative control: the CLI reads the config's default at import, so a different config
    default shows up as a different option default (a copied literal would not follow)."""
    import importlib

    import instill.cli
    from instill.config import EvalConfig

    field = EvalConfig.model_fields["batch_size"]
    monkeypatch.setattr(field, "default", 7)
    try:
        importlib.reload(instill.cli)
        assert _cli_defaults("eval")["batch_size"] == 7
    finally:
        monkeypatch.undo()
        importlib.reload(instill.cli)
    assert _cli_defaults("eval")["batch_size"] == 32


def test_serve_config_is_a_config_section():
    from instill.config import ServeConfig, default, describe

    cfg = ServeConfig(allowed_hosts=("box.lan",))
    assert cfg.allowed_hosts == ("box.lan",) and cfg.host == "127.0.0.1"
    with pytest.raises(ValidationError, match="extra"):
        ServeConfig(max_batchh=4)  # unknown keys are errors, as in every section
    with pytest.raises(ValidationError):
        cfg.max_batch = 2  # frozen
    assert default(ServeConfig, "max_tokens_cap") == 1024
    assert describe(ServeConfig, "max_batch") == "Requests decoded together."


def _enum_fields(model=None, prefix=""):
    """(dotted key, allowed values) of every Literal field in the schema, found by walking it, so
    a field added later is covered too."""
    import types
    import typing

    from pydantic import BaseModel

    from instill.config import Recipe

    model = model or Recipe
    for name, field in model.model_fields.items():
        args = [field.annotation]
        while args:  # unwrap X | None, list[X], ...
            ann = args.pop()
            if typing.get_origin(ann) is typing.Literal:
                yield prefix + name, typing.get_args(ann)
            elif isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from _enum_fields(ann, f"{prefix}{name}.")
            elif typing.get_origin(ann) is list:  # a list's entries: data.sources[].format
                for entry in typing.get_args(ann):
                    for sub in [entry, *typing.get_args(entry)]:
                        if isinstance(sub, type) and issubclass(sub, BaseModel):
                            yield from _enum_fields(sub, f"{prefix}{name}[].")
            elif typing.get_origin(ann) in (typing.Union, types.UnionType):
                args.extend(typing.get_args(ann))


def _help_entries(text: str) -> dict[str, str]:
    """recipe_help's text as {dotted key: its whole entry}."""
    entries = [e.strip() for e in text.split("\n\n") if e.startswith("  ")]
    return {e.split(" ", 1)[0]: e for e in entries}


def test_recipe_help_lists_every_enum_fields_values():
    entries = _help_entries(recipe_help())
    found = list(_enum_fields())
    assert ("model.dtype", ("auto", "float32", "bfloat16", "float16")) in found
    assert {"train.schedule", "data.mask", "data.sources[].format", "eval.suites[].metric"} <= {
        k for k, _ in found
    }
    for key, values in found:
        assert key in entries, key
        shown = entries[key].removeprefix(key).split("[", 1)[1].split("]", 1)[0]
        for value in values:
            assert value in shown, (key, value)


def test_recipe_help_documents_nested_keys():
    """The keys inside a list entry (data.sources, a suite file) and inside a section that is
    off by default (data.replay), each with its default; a section's own line says whether a
    recipe gets it without asking."""
    entries = _help_entries(recipe_help())
    assert entries["data.sources[].path"].startswith("data.sources[].path [required]: A JSON")
    for key, value in [("split", "train"), ("columns", "{}"), ("weight", "1.0")]:
        assert entries[f"data.sources[].{key}"].startswith(
            f"data.sources[].{key} [default: {value}]"
        )
    assert entries["data.sources[].format"].startswith(
        "data.sources[].format [default: auto; one of: auto, messages, sharegpt, alpaca, "
        "prompt_completion, selfinstruct, text,"
    )
    assert entries["data.replay"].startswith("data.replay [default: null]: Self-distillation")
    assert entries["data.replay.prompts"].startswith("data.replay.prompts [default: null]")
    assert entries["data.replay.max_new_tokens"].startswith(
        "data.replay.max_new_tokens [default: 64]"
    )
    # a recipe without a data section trains on the built-in tasks; one with a data section
    # that leaves builtin out does not, and the help says so
    builtin = entries["data.builtin"]
    assert builtin.startswith(
        "data.builtin [default: {train_per_family: 64, eval_per_family: 12, seed: 0, "
        "families: null}]"
    )
    assert "leaves builtin out" in builtin
    assert entries["eval.suites[].name"].startswith("eval.suites[].name [required]")
    assert entries["eval.suites[].path"].startswith("eval.suites[].path [required]")
    assert entries["eval.suites[].max_examples"].startswith(
        "eval.suites[].max_examples [default: null]"
    )
    assert list(entries).index("data.sources") + 1 == list(entries).index("data.sources[].path")
    quick = _help_entries(recipe_help(load_recipe(REPO / "recipes" / "quickstart.yaml")))
    assert quick["data.replay"].startswith(
        "data.replay [default: {fraction: 0.1, prompts: null, max_new_tokens: 64}]"
    )


def test_recipe_help_is_yaml_and_shows_the_described_recipe():
    """Values as YAML writes them (null, false, [builtin]); a required key says so; with a
    recipe, its values (the quickstart's, not the schema's)."""
    import re

    from instill.config import load_recipe

    text = recipe_help()
    for leak in ("PydanticUndefined", "None", "False", "True", "['"):
        assert leak not in text, leak
    entries = _help_entries(text)
    assert entries["eval.suites"].startswith("eval.suites [default: [builtin]]")
    assert entries["train.max_steps"].startswith("train.max_steps [default: null]")
    assert entries["train.compile"].startswith("train.compile [default: false]")
    assert entries["data.replay.fraction"].startswith("data.replay.fraction [required]")
    quick = _help_entries(recipe_help(load_recipe(REPO / "recipes" / "quickstart.yaml")))
    assert quick["train.lr"].startswith("train.lr [default: 0.001]")
    assert quick["data.max_length"].startswith("data.max_length [default: 256]")
    assert quick["data.builtin.train_per_family"].startswith(
        "data.builtin.train_per_family [default: 32]"
    )
    assert quick["eval.suites"].startswith("eval.suites [default: [builtin, general, general_gen]]")
    assert quick["eval.holdout_clusters"].startswith("eval.holdout_clusters [default: [tables]]")
    assert quick["eval.batch_size"].startswith("eval.batch_size [default: 64]")
    assert quick["data.replay.fraction"].startswith("data.replay.fraction [default: 0.1]")
    assert not re.search(r"\bNone\b|PydanticUndefined", "\n".join(quick.values()))


def test_sampling_defaults_are_the_engines():
    """generate's and chat's option defaults (SamplingConfig) are GenParams' own."""
    import dataclasses

    from instill.config.schema import SamplingConfig
    from instill.infer import GenParams

    engine = {f.name: f.default for f in dataclasses.fields(GenParams) if f.name != "stop"}
    assert SamplingConfig().model_dump() == engine
