"""The command line: user mistakes are one clear line on stderr (exit 2), never a traceback."""

import sys

import pytest

from instill.cli import main


def run(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["instill", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def succeed(args, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["instill", *args])
    main()  # returns normally: no SystemExit


def assert_user_error(code, err, *fragments):
    assert code == 2
    assert "Traceback" not in err
    text = err.strip().splitlines()[-1]  # the error is one line, printed last
    assert text.startswith("error: ")
    for fragment in fragments:
        assert fragment in text, text


def test_unknown_recipe_key(capsys, monkeypatch):
    code, _, err = run(["train", "quickstart", "train.lrr=1"], capsys, monkeypatch)
    assert_user_error(
        code, err, "quickstart.yaml", "unknown key 'train.lrr'", "did you mean 'train.lr'"
    )


def test_wrong_type(capsys, monkeypatch):
    code, _, err = run(["train", "quickstart", "train.epochs=lots"], capsys, monkeypatch)
    assert_user_error(code, err, "train.epochs", "'lots'")


def test_missing_recipe_lists_shipped_ones(capsys, monkeypatch):
    code, _, err = run(["train", "nope.yaml"], capsys, monkeypatch)
    assert_user_error(code, err, "nope.yaml: recipe file not found", "quickstart")


def test_model_path_that_does_not_exist(capsys, monkeypatch, tmp_path):
    missing = tmp_path / "no-such-model"
    code, _, err = run(
        ["train", "quickstart", f"model.name={missing}", f"train.output_dir={tmp_path}"],
        capsys,
        monkeypatch,
    )
    assert_user_error(code, err, str(missing), "does not exist")
    assert not (tmp_path / "quickstart").exists()  # nothing half-made is left behind


def test_gguf_that_is_not_one(capsys, monkeypatch, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    code, _, err = run(
        ["train", "quickstart", f"model.name={fake}", f"train.output_dir={tmp_path}"],
        capsys,
        monkeypatch,
    )
    assert_user_error(code, err, str(fake), "not a GGUF file")


def test_model_without_chat_template_names_the_option(capsys, monkeypatch, tmp_path, tiny_dir):
    import shutil

    model = tmp_path / "no-template"
    shutil.copytree(tiny_dir, model)
    (model / "chat_template.jinja").unlink()
    code, _, err = run(
        ["train", "quickstart", f"model.name={model}", f"train.output_dir={tmp_path}"],
        capsys,
        monkeypatch,
    )
    assert_user_error(code, err, "has no chat template", "model.chat_template")


def test_unwritable_run_directory(capsys, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a run directory cannot be created under a regular file
    code, _, err = run(["train", "quickstart", f"train.output_dir={blocker}"], capsys, monkeypatch)
    assert_user_error(code, err, "is not writable", "train.output_dir")


def test_existing_run_is_not_overwritten(capsys, monkeypatch, tmp_path):
    (tmp_path / "quickstart" / "final").mkdir(parents=True)
    code, _, err = run(["train", "quickstart", f"train.output_dir={tmp_path}"], capsys, monkeypatch)
    assert_user_error(code, err, "already holds a finished run", "--overwrite")


def test_train_help_shows_recipe_field_docs(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["instill", "train", "--help"])
    main()
    out = " ".join(capsys.readouterr().out.split())
    assert "train.lr [default: 0.0002]: Peak learning rate." in out
    assert "adapter.target_modules" in out
    # the keys of a data.sources entry and of data.replay, with their defaults
    for text in (
        "data.sources[].path [required]",
        "data.sources[].weight [default: 1.0]: Sampling weight",
        "data.sources[].format [default: auto; one of: auto, messages,",
        "data.sources[].columns [default: {}]: Rename columns",
        "data.sources[].split [default: train]",
        "data.replay [default: null]",
        "data.replay.fraction [required]",
        "data.replay.prompts [default: null]",
        "data.replay.max_new_tokens [default: 64]",
        "eval.suites[].metric [default: auto; one of:",
    ):
        assert text in out, text


def test_qlora_without_cuda_is_a_clear_error(capsys, monkeypatch, tmp_path):
    code, _, err = run(
        ["train", "quickstart", "model.quantize=4bit", f"train.output_dir={tmp_path}"],
        capsys,
        monkeypatch,
    )
    assert_user_error(code, err, "model.quantize: 4bit (QLoRA) needs a CUDA GPU", "on cpu")
    assert not (tmp_path / "quickstart").exists()


def test_qlora_with_full_fine_tuning_is_refused(capsys, monkeypatch):
    code, _, err = run(["train", "full", "model.quantize=4bit"], capsys, monkeypatch)
    assert_user_error(code, err, "a 4-bit base cannot be fully fine-tuned")


def test_chat_generate_and_eval_take_a_chat_template_file(capsys, monkeypatch, tmp_path, tiny_dir):
    """A model without a chat template: chat, generate and eval refuse it with one line naming
    --chat-template, and work with the template file given (the same text as the model's own
    template gives the same output as the original model)."""
    import io
    import json
    import shutil

    model = tmp_path / "no-template"
    shutil.copytree(tiny_dir, model)
    template = tmp_path / "template.jinja"
    shutil.move(model / "chat_template.jinja", template)
    rows = tmp_path / "in.jsonl"
    rows.write_text('{"prompt": "Name a colour."}\n')
    gen = ["generate", "--input", str(rows), "--max-new-tokens", "3"]
    ev = ["eval", "--suite", "builtin", "--per-family", "1", "--max-new-tokens", "2"]
    chat = ["chat", "--max-new-tokens", "3"]
    for args in (gen + ["--output", str(tmp_path / "x.jsonl")], ev, chat):
        monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
        code, _, err = run([args[0], str(model), *args[1:]], capsys, monkeypatch)
        assert_user_error(code, err, "has no chat template", "--chat-template")
    code, _, err = run(
        [*gen[:1], str(model), *gen[1:], "--output", "o", "--chat-template", str(tmp_path / "no")],
        capsys,
        monkeypatch,
    )
    assert_user_error(code, err, "--chat-template: file not found")
    (tmp_path / "empty.jinja").write_text(" \n")
    code, _, err = run(
        [
            gen[0],
            str(model),
            *gen[1:],
            "--output",
            "o",
            "--chat-template",
            str(tmp_path / "empty.jinja"),
        ],
        capsys,
        monkeypatch,
    )
    assert_user_error(code, err, "--chat-template:", "empty.jinja is empty")

    outs = {}
    for name, source, extra in (("given", model, ["--chat-template", str(template)]),
                                ("own", tiny_dir, [])):  # fmt: skip
        out = tmp_path / f"{name}.jsonl"
        succeed([gen[0], str(source), *gen[1:], "--output", str(out), *extra], monkeypatch)
        outs[name] = [json.loads(x)["output"] for x in out.read_text().splitlines()]
        monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
        capsys.readouterr()
        succeed([chat[0], str(source), *chat[1:], *extra], monkeypatch)
        outs[name + " chat"] = capsys.readouterr().out
        succeed(
            [ev[0], str(source), *ev[1:], "--output", str(tmp_path / name), *extra], monkeypatch
        )
        outs[name + " eval"] = [
            r["prediction"] for r in map(json.loads, (tmp_path / name / "builtin.jsonl").open())
        ]
    assert outs["given"] == outs["own"]
    assert outs["given chat"] == outs["own chat"]
    assert outs["given eval"] == outs["own eval"]


def _commands():
    """(name, click command) of every instill command, subcommands included."""
    import typer

    from instill.cli import app

    todo = [((), typer.main.get_command(app))]
    while todo:
        path, cmd = todo.pop()
        if hasattr(cmd, "commands"):  # a group (typer ships its own click)
            todo.extend((path + (name,), sub) for name, sub in cmd.commands.items())
        else:
            yield path, cmd


def _help(path, capsys, monkeypatch) -> str:
    monkeypatch.setattr(sys, "argv", ["instill", *path, "--help"])
    main()
    return " ".join(capsys.readouterr().out.split())


def test_quickstart_help_shows_the_quickstart_recipe(capsys, monkeypatch):
    """quickstart --help shows the values the quickstart runs with; train --help the defaults a
    recipe gets and the names of the shipped recipes."""
    quick = _help(["quickstart"], capsys, monkeypatch)
    assert "train.lr [default: 0.001]" in quick
    assert "data.max_length [default: 256]" in quick
    assert "data.builtin.train_per_family [default: 32]" in quick
    assert "eval.holdout_clusters [default: [tables]]" in quick
    assert "eval.suites [default: [builtin, general, general_gen]]" in quick
    train = _help(["train"], capsys, monkeypatch)
    assert "train.lr [default: 0.0002]" in train
    assert "dpo, full, lora, orpo, quickstart" in train


def test_help_is_true_yaml_and_complete(capsys, monkeypatch):
    """Every command's help: no Python spellings (None, False, ['x']) or PydanticUndefined, and
    every option and argument says what it is."""
    import re

    seen = 0
    for path, cmd in _commands():
        text = _help(list(path), capsys, monkeypatch)
        for leak in (r"PydanticUndefined", r"\bNone\b", r"\bFalse\b", r"\bTrue\b", r"\['"):
            assert not re.search(leak, text), (path, leak)
        for param in cmd.params:
            assert (getattr(param, "help", None) or "").strip(), (path, param.name)
        seen += 1
    assert seen >= 10


def test_option_helps_name_values_defaults_and_units():
    """Options with a fixed set of values list them; options without a shown default say what
    happens when they are not given."""
    import typing

    import typer

    from instill.cli import app
    from instill.config.schema import METRIC_NAMES

    root = typer.main.get_command(app)
    helps = {
        (c, p.name): " ".join(p.help.split())
        for c, cmd in root.commands.items() if not hasattr(cmd, "commands")
        for p in cmd.params
    }  # fmt: skip
    for metric in typing.get_args(METRIC_NAMES):
        assert metric in helps["eval", "metric"]
    assert "default: all" in helps["eval", "max_examples"]
    assert "default: none" in helps["eval", "holdout"]
    assert "greedy" in helps["eval", "seed"] and "of sampling" not in helps["eval", "seed"]
    assert "default:" in helps["generate", "seed"]
    assert "default:" in helps["export", "min_agreement"]
    assert (
        "default:" in helps["report", "price_per_hour"]
        and "USD" in helps["report", "price_per_hour"]
    )
    inspect = root.commands["data"].commands["inspect"]
    assert "tokens" in next(p.help for p in inspect.params if p.name == "max_length")
    transfer = root.commands["experiment"].commands["transfer"]
    assert "default:" in next(p.help for p in transfer.params if p.name == "max_steps")
    chat = root.commands["chat"].help
    for key in ("/params", "top_k", "top_p", "repetition_penalty", "seed", "temperature"):
        assert key in chat


def test_version(capsys, monkeypatch):
    import instill

    monkeypatch.setattr(sys, "argv", ["instill", "--version"])
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None)
    assert capsys.readouterr().out.strip() == f"instill {instill.__version__}"


def test_generate_and_chat_sampling_options_are_the_engines(
    capsys, monkeypatch, tmp_path, tiny_dir
):
    """--temperature/--top-k/--top-p/--repetition-penalty/--seed reach the engine: the CLI's
    reply is the API's with the same settings, and a different seed or top-k changes it."""
    import io
    import json

    from instill.chat import ChatSession
    from instill.config import ModelConfig
    from instill.infer import GenParams, generate
    from instill.models import load_for_inference

    rows = tmp_path / "in.jsonl"
    rows.write_text('{"prompt": "Name a colour."}\n')
    settings = {"temperature": 1.5, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.3}
    options = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]

    def cli(seed, *extra):
        out = tmp_path / f"out-{seed}-{len(extra)}.jsonl"
        succeed(
            ["generate", str(tiny_dir), "--input", str(rows), "--output", str(out),
             "--max-new-tokens", "8", f"--seed={seed}", *options, *extra],
            monkeypatch,
        )  # fmt: skip
        return json.loads(out.read_text())["output"]

    loaded = load_for_inference(str(tiny_dir), ModelConfig(name=str(tiny_dir)))
    messages = [{"role": "user", "content": "Name a colour."}]

    def api(seed, **changed):
        params = GenParams(max_new_tokens=8, seed=seed, **{**settings, **changed})
        return generate(loaded.model, loaded.tokenizer, [messages], params)[0].text

    assert cli(3) == api(3)
    assert cli(3) != cli(4)
    assert cli(3, "--top-k=1") == api(3, top_k=1) != api(3)

    monkeypatch.setattr(sys, "stdin", io.StringIO("Name a colour.\n"))
    capsys.readouterr()
    succeed(["chat", str(tiny_dir), "--max-new-tokens", "8", "--seed", "3", *options], monkeypatch)
    session = ChatSession(loaded.model, loaded.tokenizer, max_new_tokens=8, **settings, seed=3)
    assert capsys.readouterr().out.strip() == session.reply("Name a colour.", stream=False).strip()


def test_chat_params_are_held_to_the_options_limits(capsys, tiny):
    """/params takes the same keys and limits as the options: a value out of range is said and
    the setting kept; a good one is set."""
    from instill.chat import ChatSession
    from instill.config import SamplingConfig

    session = ChatSession(tiny, None)
    session.command("/params top_p=5 top_k=-1 temperature=0.7 seed=4")
    said = "".join(capsys.readouterr())  # the chat's notes go to stderr
    assert "top_p=5:" in said and "top_k=-1:" in said
    assert (session.params.top_p, session.params.top_k) == (1.0, 0)
    assert (session.params.temperature, session.params.seed) == (0.7, 4)
    session.command("/params")
    shown = "".join(capsys.readouterr())
    for key in SamplingConfig.model_fields:
        assert f"{key}=" in shown


def test_sampling_option_out_of_range_is_one_line(capsys, monkeypatch, tmp_path):
    """A sampling value outside its limits is said naming the option, before any model load."""
    code, _, err = run(
        ["generate", str(tmp_path / "no-model"), "--input", "x", "--output", "y", "--top-p", "2"],
        capsys,
        monkeypatch,
    )
    assert_user_error(code, err, "--top-p 2.0:", "less than or equal to 1")
    code, _, err = run(["chat", str(tmp_path / "no-model"), "--top-k", "-1"], capsys, monkeypatch)
    assert_user_error(code, err, "--top-k -1:", "greater than or equal to 0")


def test_usage_errors_and_no_arguments_are_not_tracebacks(capsys, monkeypatch):
    """A mistyped option is click's one usage message (exit 2); no arguments shows the help."""
    code, out, err = run(["chat", "some-model", "--nope"], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert "No such option: --nope" in err
    code, out, err = run([], capsys, monkeypatch)
    assert "Traceback" not in out + err
    assert "Commands:" in out + err and "quickstart" in out + err
