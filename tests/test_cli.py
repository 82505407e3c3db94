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
