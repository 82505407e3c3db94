"""Preference on held-out pairs (issue 23, item 8): scored log-probs equal a hand computation,
swapping chosen and rejected flips every margin, a model against itself has margins exactly 0,
intervals resample prompts, results on other rows refuse to pair, the CLI and the report."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from instill.data.preference import Pair
from instill.data.preference_tokens import tokenize_preferences
from instill.errors import InstillError
from instill.eval.metrics import bootstrap_ci, bootstrap_clustered_ci
from instill.eval.preference import (
    pair_preference,
    pair_records,
    per_pair,
    preference_summary,
    read_preference,
    rows_sha256,
    score_pairs,
    write_preference,
)
from instill.eval.results import result_stems
from tests.conftest import build_tiny
from tests.test_cli import assert_user_error, run, succeed

FIXTURE = Path(__file__).parent / "fixtures" / "run"
PAIRS = [  # two prompts, the first with two pairs (clustered like the AlpacaEval file)
    ("Name a colour.", "Blue.", "I like turtles very much, thank you."),
    ("Name a colour.", "Red is a colour.", "Seven."),
    ("What is 2 + 2?", "4", "The answer is five, I think."),
]


def _pairs(data=PAIRS) -> list[Pair]:
    user = lambda t: ({"role": "user", "content": t},)  # noqa: E731
    reply = lambda t: ({"role": "assistant", "content": t},)  # noqa: E731
    return [Pair(user(p), reply(c), reply(r), f"pairs.jsonl:{i + 1}")
            for i, (p, c, r) in enumerate(data)]  # fmt: skip


@pytest.fixture
def rows(tokenizer):
    return tokenize_preferences(tokenizer, _pairs(), 256)[0]


def _by_hand(model, ids: list[int], mask: list[int]) -> tuple[float, int]:
    """Summed log-prob of the masked tokens: logits -> log_softmax -> gather, one row alone."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    total = sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t])
    return total, sum(mask)


def test_scores_equal_a_hand_computation_and_mode_is_restored(tiny, tokenizer, rows):
    tiny.train()  # scoring must run in eval mode and give the mode back
    records = score_pairs(tiny, tokenizer.pad_token_id, rows, batch_size=2)  # 3 pairs: 2 + 1
    assert tiny.training
    tiny.eval()
    assert [r["source"] for r in records] == ["pairs.jsonl:1", "pairs.jsonl:2", "pairs.jsonl:3"]
    for row, rec in zip(rows, records, strict=True):
        c, ct = _by_hand(tiny, *row.chosen())
        r, rt = _by_hand(tiny, *row.rejected())
        assert (rec["chosen_tokens"], rec["rejected_tokens"]) == (ct, rt)
        assert rec["chosen_logp"] == pytest.approx(c, abs=1e-4)
        assert rec["rejected_logp"] == pytest.approx(r, abs=1e-4)
    # pairs sharing a prompt share its cluster key; the other prompt has its own
    assert records[0]["prompt"] == records[1]["prompt"] != records[2]["prompt"]


def test_swapping_chosen_and_rejected_negates_every_margin(tiny, tokenizer, rows):
    reference = build_tiny(tokenizer, seed=1)
    swapped = [replace(r, chosen_ids=r.rejected_ids, chosen_mask=r.rejected_mask,
                       rejected_ids=r.chosen_ids, rejected_mask=r.chosen_mask)
               for r in rows]  # fmt: skip
    pad = tokenizer.pad_token_id
    pol, ref = score_pairs(tiny, pad, rows), score_pairs(reference, pad, rows)
    pol_s, ref_s = score_pairs(tiny, pad, swapped), score_pairs(reference, pad, swapped)
    for a, b in zip(
        (per_pair(p, r) for p, r in zip(pol, ref, strict=True)),
        (per_pair(p, r) for p, r in zip(pol_s, ref_s, strict=True)),
        strict=True,
    ):
        assert b["reward_margin"] == pytest.approx(-a["reward_margin"], abs=1e-9)
        assert b["ln_margin"] == pytest.approx(-a["ln_margin"], abs=1e-9)
        assert a["reward_margin"] != 0 and a["ln_margin"] != 0  # no ties here
        for key in ("ln_accuracy", "reward_accuracy", "sum_accuracy"):
            assert b[key] == 1 - a[key]
    s, s_swapped = preference_summary(pol, ref), preference_summary(pol_s, ref_s)
    for key in ("ln_accuracy", "reward_accuracy", "sum_accuracy"):
        got = s_swapped["measures"][key]["model"]["value"]
        assert got == pytest.approx(1 - s["measures"][key]["model"]["value"], abs=1e-6)


def test_a_model_against_itself_has_margins_exactly_zero(tiny, tokenizer, rows):
    records = score_pairs(tiny, tokenizer.pad_token_id, rows)
    s = preference_summary(records, records)
    assert [per_pair(r, r)["reward_margin"] for r in records] == [0.0, 0.0, 0.0]
    m = s["measures"]
    assert m["reward_margin"]["model"] == {"value": 0.0, "ci95": [0.0, 0.0]}
    assert m["reward_accuracy"]["model"]["value"] == 0.0  # ties count 0, as the note says
    assert "ties count 0" in s["note"]
    assert "reward_margin" not in preference_summary(records)["measures"]  # no reference


def test_the_change_from_the_start_is_paired(tiny, tokenizer, rows):
    other = build_tiny(tokenizer, seed=1)
    pad = tokenizer.pad_token_id
    after, before = score_pairs(tiny, pad, rows), score_pairs(other, pad, rows)
    s = preference_summary(after, before, before)
    m = s["measures"]["ln_margin"]
    assert m["delta"]["value"] == pytest.approx(m["model"]["value"] - m["start"]["value"], abs=2e-6)
    # the start is the reference: its margins are 0 by definition, so the implicit reward
    # measures have no start side and no change (any movement would read as a gain)
    assert set(s["measures"]["reward_margin"]) == set(s["measures"]["reward_accuracy"]) == {"model"}
    lengths = s["lengths"]
    ct = [r["chosen_tokens"] for r in after]
    rt = [r["rejected_tokens"] for r in after]
    assert lengths["chosen_tokens"] == pytest.approx(sum(ct) / 3, abs=1e-3)
    longer = sum(c > r for c, r in zip(ct, rt, strict=True))
    assert lengths["chosen_longer"]["value"] == pytest.approx(longer / 3, abs=1e-6)
    assert s["by_length"]["chosen_longer"]["n"] == longer
    assert (s["n"], s["prompts"]) == (3, 2)
    with pytest.raises(InstillError, match="not of the same pairs"):
        preference_summary(after, before[:2])


def test_clustered_interval_is_no_narrower_on_duplicated_prompts():
    scores = [float(i % 3 == 0) for i in range(40)]
    dup = [s for s in scores for _ in range(3)]  # each prompt's pairs agree: 3 copies
    clusters = [i for i in range(40) for _ in range(3)]
    naive, clustered = bootstrap_ci(dup), bootstrap_clustered_ci(dup, clusters)
    assert clustered[1] - clustered[0] >= naive[1] - naive[0]
    assert clustered[1] - clustered[0] > 1.3 * (naive[1] - naive[0])  # about sqrt(3)
    # one pair per prompt: the same draws as the plain bootstrap
    assert bootstrap_clustered_ci(scores, list(range(40))) == bootstrap_ci(scores)


def test_results_on_other_rows_refuse_to_pair(tiny, tokenizer, rows, tmp_path):
    pad = tokenizer.pad_token_id
    records = score_pairs(tiny, pad, rows)
    summary = preference_summary(records)
    write_preference(tmp_path / "a", summary, pair_records(records), {"rows_sha256": "x"})
    got = read_preference(tmp_path / "a")
    assert got is not None and got[0]["n"] == 3 and got[1][0]["source"] == "pairs.jsonl:1"
    assert result_stems(tmp_path / "a") == []  # not a suite: compare and reports skip it
    cut = max(len(r.prompt_ids) for r in rows) + 3  # replies cut to fit: other rows
    short = tokenize_preferences(tokenizer, _pairs(), cut)[0]
    assert rows_sha256(short) != rows_sha256(rows)
    other = score_pairs(tiny, pad, short)
    write_preference(tmp_path / "b", preference_summary(other), pair_records(other),
                     {"rows_sha256": rows_sha256(short)})  # fmt: skip
    with pytest.raises(InstillError, match="rows_sha256"):
        pair_preference(tmp_path / "a", tmp_path / "b")
    paired = pair_preference(tmp_path / "a", tmp_path / "a")
    assert paired["measures"]["ln_accuracy"]["delta"]["value"] == 0.0


def _pair_file(path: Path) -> Path:
    lines = [json.dumps({"prompt": p, "chosen": c, "rejected": r}) for p, c, r in PAIRS]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_scores_a_model_and_writes_the_summary(tiny_dir, tmp_path, capsys, monkeypatch):
    pairs, out = _pair_file(tmp_path / "held.jsonl"), tmp_path / "out"
    succeed(["eval-pairs", str(tiny_dir), "--pairs", str(pairs), "--output", str(out),
             "--max-length", "128"], monkeypatch)  # fmt: skip
    stdout = capsys.readouterr().out
    summary, records = read_preference(out)
    assert (summary["n"], summary["prompts"], summary["reference"]) == (3, 2, None)
    assert summary["split"]["rows_sha256"]
    assert [r["source"] for r in records] == [f"{pairs}:{i}" for i in (1, 2, 3)]
    assert "length-normalised accuracy" in stdout and "reference: none" in stdout
    code, _, err = run(["eval-pairs", str(tiny_dir), "--pairs", str(tmp_path / "none.jsonl")],
                       capsys, monkeypatch)  # fmt: skip
    assert_user_error(code, err, "--pairs", "not found")
    kto = tmp_path / "kto.jsonl"
    kto.write_text(json.dumps({"prompt": "Hi", "completion": "Hello", "label": True}) + "\n")
    code, _, err = run(["eval-pairs", str(tiny_dir), "--pairs", str(kto)], capsys, monkeypatch)
    assert_user_error(code, err, str(kto), "needs pairs", "kto rows")


@pytest.fixture
def tuned_run(tmp_path, tiny_dir, tokenizer):
    """The recorded fixture run started from the tiny model, its final/ another tiny model."""
    run_dir = Path(shutil.copytree(FIXTURE, tmp_path / "run"))
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"]["name"] = str(tiny_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    build_tiny(tokenizer, seed=1).save_pretrained(run_dir / "final")
    tokenizer.save_pretrained(run_dir / "final")
    return run_dir


def test_cli_on_a_run_takes_its_start_as_reference_and_the_report_shows_it(
    tuned_run, tiny_dir, tmp_path, capsys, monkeypatch
):
    pairs = _pair_file(tmp_path / "held.jsonl")
    succeed(["eval-pairs", str(tuned_run), "--pairs", str(pairs)], monkeypatch)
    stdout = capsys.readouterr().out
    folder = tuned_run / "evals" / "pairs-held"
    summary, records = read_preference(folder)
    assert summary["reference"] == summary["start"] == str(tiny_dir)
    assert set(records[0]) >= {"model", "reference", "start"}
    assert records[0]["reference"] == records[0]["start"]
    assert set(summary["measures"]["reward_accuracy"]) == {"model"}  # no trivial start side
    assert f"reference:{tiny_dir}" in "".join(stdout.split())
    # the report shows it once it is the run's own (RUN/eval/preference.json)
    from instill.report.preference import preference_block
    from instill.report.run_report import build_run_report

    assert preference_block(tuned_run) == []
    for name in ("preference.json", "preference.jsonl"):
        shutil.copy(folder / name, tuned_run / "eval" / name)
    blocks = build_run_report(tuned_run).blocks
    texts = [getattr(b, "text", "") for b in blocks]
    assert "Preference on held-out pairs" in texts
    table = blocks[texts.index("Preference on held-out pairs") + 2]
    assert table.header == ["measure", "before", "after", "change", "change 95% CI"]
    assert table.rows[0][0] == "**length-normalised accuracy** (%)"
    assert any(f"against **{tiny_dir}**" in t for t in texts)


def _summary_with(gain_longer: float, gain_others: float) -> dict:
    """A summary whose ln_accuracy gained `gain_longer` on pairs whose chosen reply is longer
    and `gain_others` on the rest (accuracies only, intervals +-0.05)."""
    stat = lambda v: {"value": v, "ci95": [v - 0.05, v + 0.05]}  # noqa: E731
    entry = lambda d: {"model": stat(0.5 + d), "start": stat(0.5), "delta": stat(d)}  # noqa: E731
    total = (gain_longer + gain_others) / 2
    return {
        "measures": {"ln_accuracy": entry(total)},
        "by_length": {
            "chosen_longer": {"n": 10, "measures": {"ln_accuracy": entry(gain_longer)}},
            "chosen_not_longer": {"n": 10, "measures": {"ln_accuracy": entry(gain_others)}},
        },
    }


def test_the_report_says_when_a_gain_came_with_longer_chosen_replies():
    from instill.report.preference import length_note

    note = length_note(_summary_with(0.3, 0.0))
    assert "came with longer chosen replies" in note and "+30.0 points" in note
    note = length_note(_summary_with(0.2, 0.2))
    assert "holds where the chosen reply is not the longer one too" in note
    assert length_note(_summary_with(0.0, 0.0)).startswith("No gain in preference accuracy")


def test_compare_pairs_two_eval_pairs_results_pair_by_pair(
    tuned_run, tiny_dir, tmp_path, capsys, monkeypatch
):
    """`instill compare A B` on two eval-pairs results: A's model before, B's after, against
    B's reference, each change the mean of the per-pair changes; other rows refuse to pair."""
    pairs = _pair_file(tmp_path / "held.jsonl")
    before = tmp_path / "before"  # the tuned run's start, alone (as `eval-pairs BASE` writes it)
    succeed(["eval-pairs", str(tiny_dir), "--pairs", str(pairs), "--output", str(before)],
            monkeypatch)  # fmt: skip
    succeed(["eval-pairs", str(tuned_run), "--pairs", str(pairs)], monkeypatch)
    after = tuned_run / "evals" / "pairs-held"
    capsys.readouterr()
    succeed(["compare", str(before), str(after), "--json"], monkeypatch)
    got = json.loads(capsys.readouterr().out)["preference"]
    (_, ra), (_, rb) = read_preference(before), read_preference(after)
    ln_margin = lambda r, side: (r[side]["chosen_logp"] / r["chosen_tokens"]  # noqa: E731
                                 - r[side]["rejected_logp"] / r["rejected_tokens"])  # fmt: skip
    by_hand = [ln_margin(b, "model") - ln_margin(a, "model") for a, b in zip(ra, rb, strict=True)]
    ln = got["measures"]["ln_margin"]
    assert ln["delta"]["value"] == pytest.approx(sum(by_hand) / 3, abs=1e-6)
    alone = read_preference(before)[0]["measures"]["ln_margin"]["model"]["value"]
    assert ln["start"]["value"] == pytest.approx(alone, abs=1e-6)
    assert any(abs(d) > 1e-4 for d in by_hand)  # two different models: the change is not 0
    # the start is B's reference: its implicit reward is trivial and has no before side
    assert set(got["measures"]["reward_accuracy"]) == {"model"}
    assert got["start"].endswith(f"({before})") and got["reference"] == str(tiny_dir)
    succeed(["compare", str(before), str(after)], monkeypatch)
    stdout = capsys.readouterr().out
    assert "start (before)" in stdout and "change" in stdout
    copy = tmp_path / "copy.jsonl"  # the same pairs under another file name still pair
    copy.write_bytes(pairs.read_bytes())
    succeed(["eval-pairs", str(tiny_dir), "--pairs", str(copy), "--output", str(tmp_path / "c")],
            monkeypatch)  # fmt: skip
    capsys.readouterr()
    succeed(["compare", str(tmp_path / "c"), str(after), "--json"], monkeypatch)
    assert json.loads(capsys.readouterr().out)["preference"]["measures"] == got["measures"]
    short = tmp_path / "short"
    succeed(["eval-pairs", str(tiny_dir), "--pairs", str(pairs), "--output", str(short),
             "--max-length", "40"], monkeypatch)  # fmt: skip
    code, _, err = run(["compare", str(short), str(after)], capsys, monkeypatch)
    assert_user_error(code, err, "different tokenised pairs", "--max-length")
    (tmp_path / "empty").mkdir()
    code, _, err = run(["compare", str(tmp_path / "empty"), str(after)], capsys, monkeypatch)
    assert_user_error(code, err, f"{after} holds held-out pair results", "eval-pairs MODEL")


def test_compare_pairs_a_chain_against_one_reference(
    tuned_run, tiny_dir, tokenizer, tmp_path, capsys, monkeypatch
):
    """The README's chain: a first stage and a second each scored against the same reference
    (neither of them it); the implicit reward then has a before side, and its change is the
    mean of the per-pair changes, which pair_records' sides give by hand."""
    pairs, first = _pair_file(tmp_path / "held.jsonl"), tmp_path / "first"
    build_tiny(tokenizer, seed=2).save_pretrained(first)
    tokenizer.save_pretrained(first)
    folders = [tmp_path / "a", tmp_path / "b"]
    for model, folder in zip((first, tuned_run / "final"), folders, strict=True):
        succeed(["eval-pairs", str(model), "--pairs", str(pairs), "--reference", str(tiny_dir),
                 "--output", str(folder)], monkeypatch)  # fmt: skip
    capsys.readouterr()
    succeed(["compare", *map(str, folders), "--json"], monkeypatch)
    got = json.loads(capsys.readouterr().out)["preference"]["measures"]["reward_margin"]
    (_, ra), (_, rb) = (read_preference(f) for f in folders)

    def margin(r: dict) -> float:
        m, ref = r["model"], r["reference"]
        return (m["chosen_logp"] - ref["chosen_logp"]) - (m["rejected_logp"] - ref["rejected_logp"])

    by_hand = [margin(b) - margin(a) for a, b in zip(ra, rb, strict=True)]
    assert set(got) == {"start", "model", "delta"}
    assert got["start"]["value"] == pytest.approx(sum(map(margin, ra)) / 3, abs=1e-5)
    assert got["delta"]["value"] == pytest.approx(sum(by_hand) / 3, abs=1e-5)
    assert min(abs(d) for d in by_hand) > 1e-3  # three different models: every pair moved


def test_two_runs_whose_pairs_differ_still_compare_their_suites(
    tuned_run, tiny, tokenizer, rows, tmp_path, capsys, monkeypatch
):
    """Pairs on other rows refuse to pair, but two runs' suites still compare, with a line
    saying why their pairs were left out (not an error that hides the suites)."""
    other = Path(shutil.copytree(tuned_run, tmp_path / "other"))
    records = score_pairs(tiny, tokenizer.pad_token_id, rows)
    for run_dir, digest in ((tuned_run, "x"), (other, "y")):
        write_preference(run_dir / "eval", preference_summary(records), pair_records(records),
                         {"rows_sha256": digest})  # fmt: skip
    succeed(["compare", str(tuned_run), str(other)], monkeypatch)
    stdout = " ".join(capsys.readouterr().out.split())
    assert "held-out pairs not compared" in stdout and "different tokenised pairs" in stdout
    assert "No forgetting" in stdout  # the suites' comparison and verdict are printed
