"""End to end on the real default model (SmolLM2-135M-Instruct from its GGUF): the quickstart
path for a few steps, a reload with plain transformers + peft, and chat through a pipe."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instill.config import load_recipe
from instill.recipe import run_recipe

RECIPES = Path(__file__).resolve().parent.parent / "src" / "instill" / "recipes"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, default_source):
    with pytest.MonkeyPatch.context() as mp:
        # train.autocast: auto as a user's machine resolves it (conftest pins float32)
        mp.delenv("INSTILL_CPU_BF16", raising=False)
        return _quickstart(tmp_path_factory.mktemp("runs"))


def _quickstart(out):
    recipe = load_recipe(
        RECIPES / "quickstart.yaml",
        [
            f"train.output_dir={out}",
            "data.builtin.families=[addition,uppercase]",
            "eval.holdout_clusters=[]",
            "eval.suites=[builtin]",
            "data.builtin.train_per_family=4",  # 8 rows = one batch: every step sees the same rows
            "data.replay=null",  # (no replay row joins them; tests/test_drift.py runs replay)
            "data.builtin.eval_per_family=2",
            "train.max_steps=4",
            "eval.max_new_tokens=12",
        ],
    )
    return run_recipe(recipe)


def test_run_directory_is_complete(run):
    d = run.run_dir
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "data_stats.json",
        "run.json",
        "report.md",
        "eval/base-builtin.json",
        "eval/base-builtin.jsonl",
        "eval/builtin.json",
        "final/adapter_model.safetensors",
        "final/adapter_config.json",
        "final/tokenizer.json",
        "final/chat_template.jinja",
    ):
        assert (d / name).is_file(), name
    summary = json.loads((d / "eval" / "builtin.json").read_text())
    assert summary["n"] == 4 and set(summary["by_family"]) == {"addition", "uppercase"}
    records = (d / "eval" / "builtin.jsonl").read_text().splitlines()
    assert len(records) == 4 and {"prompt", "prediction", "reference", "score"} <= set(
        json.loads(records[0])
    )
    assert "| **overall** |" in (d / "report.md").read_text()


def test_loss_fell_and_adapter_trained(run, monkeypatch):
    from instill.models.load import cpu_has_native_bf16

    monkeypatch.delenv("INSTILL_CPU_BF16", raising=False)  # this CPU's own answer
    assert run.train.steps == 4
    # the quickstart's train.autocast: auto: bf16 products where the CPU has them
    assert run.train.autocast == ("bfloat16" if cpu_has_native_bf16() else None)
    assert run.train.losses[-1] < run.train.losses[0]
    lora_b = [p for n, p in run.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero


def test_final_reloads_with_plain_transformers_and_peft(run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = run.run_dir / "final"
    base_path = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base_path).is_dir()
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template == run.tokenizer.chat_template
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_path), final
    ).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Add 2 and 3."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        expected = run.model(**ids).logits
        torch.testing.assert_close(reloaded(**ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_chat_answers_through_a_pipe(run):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "instill",
            "chat",
            str(run.run_dir / "final"),
            "--max-new-tokens",
            "16",
        ],
        input="What is 2 plus 3? Answer with the number only.\n/reset\nSay hello.\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    replies = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(replies) == 2, proc.stdout


def test_eval_command_writes_records(run):
    env = {**os.environ}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "instill",
            "eval",
            str(run.run_dir),
            "--per-family",
            "1",
            "--max-new-tokens",
            "8",
            "--output",
            str(run.run_dir / "eval-cli"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    # an evaluation of a run takes the run's families (its split), with the options given
    families = {"addition", "uppercase"}
    summary = json.loads((run.run_dir / "eval-cli" / "builtin.json").read_text())
    assert summary["n"] == len(families)  # one held-out example per family
    assert set(summary["by_family"]) == families
    assert summary["split"]["per_family"] == 1 and set(summary["split"]["families"]) == families
    lines = (run.run_dir / "eval-cli" / "builtin.jsonl").read_text().splitlines()
    assert len(lines) == len(families)
    assert "builtin: builtin" in proc.stdout and "95% CI" in proc.stdout


def test_dpo_recipe_chains_from_the_run(run, tmp_path):
    """recipes/dpo.yaml on the real model: the second stage starts from the quickstart run,
    measures its held-out pairs and both suites' sides, and its adapter loads back through the
    first run."""
    from instill.models.load import load_for_inference

    rows = [
        {"prompt": f"What is {a} plus {b}?", "chosen": str(a + b),
         "rejected": f"The answer is probably {a + b + 1}, but I am not sure."}
        for a in range(2, 8) for b in (3, 11)
    ]  # fmt: skip
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(
        RECIPES / "dpo.yaml",
        [
            f"model.name={run.run_dir}", f"train.output_dir={tmp_path}",
            f"data.sources=[{{path: {pairs}}}]", "data.validation=0.25",
            "data.builtin.families=[addition,uppercase]", "data.builtin.eval_per_family=2",
            "eval.holdout_clusters=[]", "eval.suites=[builtin]", "eval.max_new_tokens=12",
            "train.max_steps=2", "train.eval_every=null",
        ],
    )  # fmt: skip
    second = run_recipe(recipe)
    record = json.loads((second.run_dir / "run.json").read_text())
    assert record["objective"]["started_from"]["run"] == str(run.run_dir)
    assert "LoRA adapters switched off" in record["objective"]["reference"]
    assert set(record["eval_before"]) == set(record["eval_after"]) == {"builtin"}
    summary = json.loads((second.run_dir / "eval" / "preference.json").read_text())
    assert summary["n"] == 3 and set(summary["measures"]["reward_accuracy"]) == {"model"}
    ids = torch.tensor([[1, 504, 3180, 314, 2066]])
    with torch.no_grad():
        expected = second.model.eval()(input_ids=ids).logits
        reloaded = load_for_inference(str(second.run_dir)).model(input_ids=ids).logits
    assert torch.allclose(reloaded, expected, atol=1e-4)
