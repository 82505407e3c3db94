"""The forgetting verdict says "not measured" when no guard has data on both sides, and a replay
file that shares prompts with a forgetting guard is refused (issue 24, item 8)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from instill.config import load_recipe
from instill.errors import InstillError
from instill.eval.compare import Side, compare_suite
from instill.eval.drift import shipped_prompts
from instill.eval.suites import build_tasks
from instill.recipe import check_replay_prompts
from instill.report.claims import forgetting_verdict
from instill.report.document import Document, to_markdown

FIXTURE = Path(__file__).parent / "fixtures" / "forgetting"  # a real quickstart run's guards
QUICKSTART = Path(__file__).parents[1] / "src" / "instill" / "recipes" / "quickstart.yaml"


@pytest.fixture
def unpaired(tmp_path):
    """The fixture's results with the tuned general_gen records renamed: no prompt pairs."""
    folder = Path(shutil.copytree(FIXTURE / "eval", tmp_path / "eval"))
    path = folder / "general_gen.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "id": r["id"] + "-x"}) + "\n" for r in rows))
    return Side("base", folder, "base-"), Side("tuned", folder)


def test_no_paired_prompts_is_not_measured(unpaired, tmp_path):
    base, tuned = unpaired
    tables = [compare_suite(base, tuned, "general_gen")]
    assert tables[0]["generation"]["n"] == 0
    verdict = forgetting_verdict(tables)
    assert verdict.supported is None, verdict.text
    assert verdict.text.startswith("No forgetting guard has results on both sides")
    assert "general_gen (no prompt answered on both sides)" in verdict.text
    doc = Document("run")
    doc.add(verdict)  # as the run report and the transfer report state it
    assert "**No forgetting: not measured.** No forgetting guard" in to_markdown(doc, tmp_path)


def test_an_unmeasured_guard_is_named_beside_a_measured_one(unpaired):
    base, tuned = unpaired
    tables = [compare_suite(base, tuned, s) for s in ("general", "general_gen")]
    verdict = forgetting_verdict(tables)
    assert verdict.supported is True  # general knowledge measured, no significant loss
    assert "Not measured: general_gen (no prompt answered on both sides)." in verdict.text


def test_compare_prints_not_measured(unpaired, capsys):
    from instill.cli import print_forgetting

    base, tuned = unpaired
    print_forgetting(base, tuned, [compare_suite(base, tuned, "general_gen")])
    assert "No forgetting: not measured" in capsys.readouterr().out


def test_replay_prompts_that_a_guard_scores_are_refused(tmp_path):
    gen = shipped_prompts("eval")
    replay = tmp_path / "replay.jsonl"
    rows = [{"prompt": "Tell me a story about a lighthouse."}]
    rows += [{"prompt": "  " + ex.prompt[-1]["content"].upper() + " "} for ex in gen[:3]]
    replay.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(QUICKSTART, [f"data.replay.prompts={replay}"])
    with pytest.raises(InstillError) as exc:
        check_replay_prompts(recipe, build_tasks(recipe))
    text = str(exc.value)
    assert f"3 prompt(s) of {replay}" in text and "general_gen suite" in text
    # the same file is fine when no guard scores those prompts
    recipe = load_recipe(QUICKSTART, [f"data.replay.prompts={replay}", "eval.suites=[builtin]"])
    check_replay_prompts(recipe, build_tasks(recipe))


def test_the_shipped_replay_prompts_are_checked_against_a_users_drift_suite(tmp_path):
    suite = tmp_path / "mine.jsonl"
    suite.write_text(json.dumps({"prompt": shipped_prompts("replay")[0].prompt[-1]["content"]}))
    spec = {"name": "mine", "path": str(suite), "metric": "drift"}
    recipe = load_recipe(QUICKSTART, [f"eval.suites=[{json.dumps(spec)}]"])
    with pytest.raises(InstillError, match=r"1 prompt\(s\) of instill's replay prompts .* mine"):
        check_replay_prompts(recipe, build_tasks(recipe))
