"""The forgetting verdict says "not measured" when no guard has data on both sides, and a replay
file that shares prompts with a forgetting guard is refused (issue 24, item 8)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from instill.anchors import shipped_prompts
from instill.config import load_recipe
from instill.errors import InstillError
from instill.eval.compare import Side, compare_suite
from instill.eval.drift import DRIFT_LIMIT
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


# --- the reply-length guard is two-sided (issue 23, item 8) -----------------------------------


def _gen_records(
    factor: float, n: int = 40, cap: int = 256, drift: tuple[float, ...] = (0.0,)
) -> tuple[list[dict], list[dict]]:
    """A base's and a tuned model's general_gen records over n prompts: the base ends every
    reply (20 to 98 tokens, under the cap), the tuned model writes `factor` times as many tokens
    (cut at `cap`); the tuned model's drift on prompt i is drift[i % len(drift)] (the base's 0)."""
    base, tuned = [], []
    for i in range(n):
        b = 20 + 2 * i
        t = min(cap, round(factor * b))
        common = {"id": f"p{i:02d}", "family": "explain", "cluster": "explain", "seen": True,
                  "prompt": f"prompt {i}", "base_reply": "y " * b, "reference": None,
                  "base_tokens": b, "base_words": b, "anchor": "a", "score": 0.0,
                  "scores": {"drift": 0.0}}  # fmt: skip
        base.append({**common, "prediction": "y " * b, "finish_reason": "stop", "tokens": b,
                     "words": b})  # fmt: skip
        d = drift[i % len(drift)]
        tuned.append({**common, "prediction": "x " * t, "tokens": t, "words": t,
                      "finish_reason": "stop" if t < cap else "length",
                      "score": d, "scores": {"drift": d}})  # fmt: skip
    return base, tuned


def _gen_folder(
    tmp_path: Path, factor: float, cap: int = 256, drift: tuple[float, ...] = (0.0,)
) -> Path:
    """A run-like results folder (base-general_gen.* and general_gen.*) of _gen_records."""
    folder = tmp_path / f"x{factor}-{'-'.join(map(str, drift))}" / "eval"
    folder.mkdir(parents=True)
    sides = _gen_records(factor, cap=cap, drift=drift)
    for prefix, records in zip(("base-", ""), sides, strict=True):
        summary = {"suite": "general_gen", "metric": "drift", "split": {"per_kind": None}}
        (folder / f"{prefix}general_gen.json").write_text(json.dumps(summary))
        (folder / f"{prefix}general_gen.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records)
        )
    return folder


def _verdict(folder: Path):
    base, tuned = Side("base", folder, "base-"), Side("tuned", folder)
    tables = [compare_suite(base, tuned, "general_gen")]
    return tables, forgetting_verdict(tables)


def test_replies_twice_the_base_length_are_flagged(tmp_path):
    tables, verdict = _verdict(_gen_folder(tmp_path, 2.0))
    assert tables[0]["generation"]["tokens"][2] == pytest.approx(2.0)
    assert verdict.supported is False, verdict.text
    assert "general_gen: replies 2.00x the base's length (limit 1.3x): longer replies" in (
        verdict.text
    )


def test_replies_1_2x_the_base_length_are_not_flagged(tmp_path):
    tables, verdict = _verdict(_gen_folder(tmp_path, 1.2))
    assert tables[0]["generation"]["tokens"][2] == pytest.approx(1.2, abs=0.01)
    assert verdict.supported is True, verdict.text
    assert "longer replies" not in verdict.text


@pytest.mark.parametrize("drift", [(0.0, 0.40), (0.0, 0.36)], ids=["mean-0.20", "mean-0.18"])
def test_a_drift_interval_across_the_limit_is_not_settled_either_way(tmp_path, drift):
    # Drift 0.20 and 0.18 nats/token, each prompt 0 or twice that: the 95% interval reaches
    # across the 0.19 limit. Neither "supported" (the point estimate may be past the limit) nor
    # "forgetting found" (the interval is not wholly past it).
    tables, verdict = _verdict(_gen_folder(tmp_path, 1.0, drift=drift))
    d = tables[0]["generation"]["drift"]
    assert d.delta == pytest.approx(sum(drift) / 2)
    assert d.ci[0] < DRIFT_LIMIT < d.ci[1], d.ci
    assert verdict.supported is None and verdict.settled is False, verdict.text
    assert verdict.text.startswith("Not settled for the tuned model")
    assert "reaches past its +0.19 limit" in verdict.text
    doc = Document("r")
    doc.add(verdict)
    assert "**No forgetting: not settled.** Not settled" in to_markdown(doc, tmp_path)


def test_a_drift_interval_wholly_on_one_side_settles_the_verdict(tmp_path):
    # negative controls for the test above: the same spread, wholly past or wholly inside
    _, verdict = _verdict(_gen_folder(tmp_path, 1.0, drift=(0.30, 0.34)))
    assert verdict.supported is False and verdict.settled, verdict.text
    assert "drift from the base model +0.320" in verdict.text
    _, verdict = _verdict(_gen_folder(tmp_path, 1.0, drift=(0.08, 0.12)))
    assert verdict.supported is True and verdict.settled, verdict.text
    assert "real change" in verdict.text and "drift +0.100" in verdict.text


def test_compare_says_not_settled_in_words_and_json(tmp_path, capsys):
    from typer.testing import CliRunner

    from instill.cli import app, print_forgetting

    run = _gen_folder(tmp_path, 1.0, drift=(0.0, 0.40)).parent
    result = CliRunner().invoke(app, ["compare", str(run), "--json"])
    assert result.exit_code == 0, result.output
    forgetting = json.loads(result.output)["forgetting"]
    assert forgetting["verdict"] == "not settled" and forgetting["supported"] is None
    base, tuned = Side("base", run / "eval", "base-"), Side("tuned", run / "eval")
    print_forgetting(base, tuned, [compare_suite(base, tuned, "general_gen")])
    printed = capsys.readouterr().out
    assert "No forgetting: not settled" in printed
    assert "general_gen: the replies that moved most" in printed


def test_the_verdict_shows_each_guards_limit_beside_its_value(tmp_path):
    _, verdict = _verdict(_gen_folder(tmp_path, 1.2))
    assert "reply length 1.20x (limits 0.8x to 1.3x" in verdict.text
    assert "drift +0.000 nats/token (limit +0.19" in verdict.text
    assert "(limit a rise of 10 points)" in verdict.text


def test_compare_json_carries_the_limits_and_the_table_prints_them(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from instill.cli import app

    run = _gen_folder(tmp_path, 2.0).parent
    result = CliRunner().invoke(app, ["compare", str(run), "--json"])
    assert result.exit_code == 0, result.output
    forgetting = json.loads(result.output)["forgetting"]
    assert forgetting["supported"] is False
    assert forgetting["limits"] == {
        "general_choice": "no drop with a 95% interval below 0",
        "drift_max": 0.19,
        "length_ratio_min": 0.8,
        "length_ratio_max": 1.3,
        "short_share_rise_max": 0.1,
        "rouge_l": "no drop with a 95% interval below 0",
    }
    assert "longer replies" in forgetting["text"]
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(app, ["compare", str(run)])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "reply tokens (mean)" in x)
    assert "x2.00" in line and "x0.80 to x1.30" in line
    line = next(x for x in result.output.splitlines() if "drift, nats/token" in x)
    assert "≤ +0.19" in line


def test_the_run_report_table_shows_the_limits(tmp_path):
    from instill.report.run_report import drift_block

    tables, _ = _verdict(_gen_folder(tmp_path, 2.0))
    block = drift_block(tables[0])
    assert block.header[-1] == "limit"
    rows = {r[0]: r for r in block.rows}
    assert rows["**reply tokens (mean)**"][-1] == "x0.80 to x1.30"
    assert rows["**drift, nats/token**"][-1] == "≤ +0.19"
    assert rows["**replies under 10 words (%)**"][-1] == "rise ≤ 10 points"


def test_a_length_cap_that_hides_longer_replies_is_said(tmp_path):
    # The real quickstart's base wrote to the 64-token cap on 57 of 64 prompts: no reply of the
    # tuned model can be 1.3x as long, so the upper limit cannot be seen to be crossed.
    folder = Path(shutil.copytree(FIXTURE / "eval", tmp_path / "eval"))
    side = Side("base", folder, "base-")
    tables = [compare_suite(side, side, "general_gen")]
    verdict = forgetting_verdict(tables)
    assert verdict.supported is True
    assert (
        "general_gen: longer replies cannot be seen: 57 of 64 base replies were cut at 64 "
        "tokens, so a reply can be at most 1.06x the base's length, under the 1.3x limit "
        "(raise eval.gen_max_new_tokens)" in verdict.text
    )
    # with room above the base's replies, no such note
    _, verdict = _verdict(_gen_folder(tmp_path, 1.0))
    assert "cannot be seen" not in verdict.text
