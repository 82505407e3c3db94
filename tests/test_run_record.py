"""What a finished run leaves for its user besides the report: run.json's phase breakdown of the
wall time (also printed at the end of the run) and a model card in final/README.md (issue 26
item 1, issue 27 item 3). One short `instill train` of the tiny model serves all three."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import pytest
import yaml
from conftest import TINY_DATA


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """(run directory, what `instill train` printed)."""
    from instill.cli import main

    out = tmp_path_factory.mktemp("runs")
    argv = ["instill", "train", "quickstart", f"model.name={tiny_dir}", f"train.output_dir={out}",
            *TINY_DATA, "train.max_steps=2", "data.replay=null", "eval.suites=[builtin]",
            "eval.holdout_clusters=[]", "eval.max_new_tokens=4"]  # fmt: skip
    printed = io.StringIO()
    saved = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(printed):
            main()
    finally:
        sys.argv = saved
    return out / "quickstart", printed.getvalue()


PHASES = [
    "load model (and convert)",
    "data and suites",
    "evaluate base: builtin",
    "train",
    "save final model",
    "evaluate tuned: builtin",
    "report and model card",
]


def test_run_json_records_each_phase_in_order(trained):
    run_dir, _ = trained
    run = json.loads((run_dir / "run.json").read_text())
    assert list(run["phases"]) == PHASES
    assert all(s >= 0 for s in run["phases"].values())
    assert run["phases"]["train"] >= run["train"]["wall_s"]  # the loop runs inside the phase
    assert 0 <= run["wall_s"] - sum(run["phases"].values()) < 0.5 * run["wall_s"]
    # the report shows the same phases, the remainder and the whole run
    text = (run_dir / "report.md").read_text()
    table = text.split("| phase | seconds | share |")[1].split("\n\n")[0]
    for name in PHASES[:-1]:  # (the report's own time is recorded after the page is written)
        assert f"| {name} | {run['phases'][name]:.1f} |" in table
    assert "| not accounted for |" in table and "| = whole run |" in table


def test_the_end_of_the_run_prints_the_phases(trained):
    run_dir, printed = trained
    run = json.loads((run_dir / "run.json").read_text())
    lines = printed[printed.index("time by phase") :].splitlines()[1:]
    assert [x.split()[0] for x in lines[: len(PHASES)]] == [p.split()[0] for p in PHASES]
    for name, seconds in run["phases"].items():
        assert any(x.strip().startswith(name) and f"{seconds:.1f} s" in x for x in lines), name
    rest = run["wall_s"] - sum(run["phases"].values())
    assert any(x.strip().startswith("not accounted for") for x in lines)
    whole = next(x for x in lines if x.strip().startswith("= whole run"))
    assert abs(float(whole.split()[3]) - run["wall_s"]) < 0.06, (whole, rest)


def test_final_holds_a_model_card_written_after_the_save(trained):
    run_dir, _ = trained
    card = (run_dir / "final" / "README.md").read_text()
    assert card.startswith("---\n") and "[More Information Needed]" not in card
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert {"instill", "lora", "sft"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local directory: no hub id to name
    run = json.loads((run_dir / "run.json").read_text())
    base, tuned = run["eval_before"]["builtin"], run["eval_after"]["builtin"]
    a, b = 100 * base["score"], 100 * tuned["score"]
    assert f"| builtin (task suite, builtin, %) | {a:.1f} | {b:.1f} | {b - a:+.1f} |" in card
    for heading in ("## Training data", "## Recipe", "## Results", "## Intended use", "## Limits"):
        assert heading in card
    assert "| method | LoRA r=16, alpha 32, all-linear; objective sft |" in card
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()


def test_model_card_names_a_known_base_on_the_hub():
    from instill.config import Recipe
    from instill.report.model_card import front_matter

    run = {"model": {"name": "smollm2-135m-instruct", "kind": "gguf", "path": "/nowhere"}}
    meta = front_matter(run, Recipe())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0"
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in meta["tags"]
    full = Recipe.model_validate({"adapter": {"method": "full"}})
    assert front_matter(run, full)["library_name"] == "transformers"
