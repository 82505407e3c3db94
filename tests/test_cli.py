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
