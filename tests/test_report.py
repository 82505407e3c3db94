"""Reports built from a recorded run directory (tests/fixtures/run: the files of a real 6-step
quickstart-style run on the default model, final/ left out), checked against its own records."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from instill.eval.metrics import bootstrap_ci
from instill.report import training_curves, write_run_report
from instill.report.experiment_report import steps_saved, val_curve, write_transfer_report
from instill.report.plots import read_metrics

FIXTURE = Path(__file__).parent / "fixtures" / "run"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run(tmp_path):
    return Path(shutil.copytree(FIXTURE, tmp_path / "run"))


def records(run, stem):
    return [json.loads(x) for x in (run / "eval" / f"{stem}.jsonl").read_text().splitlines()]


def mean(rs):
    return sum(r["score"] for r in rs) / len(rs)


def test_report_figures_match_the_recorded_run(run):
    md, page = write_run_report(run, price_per_hour=2.0)
    text = md.read_text()
    recorded = json.loads((run / "run.json").read_text())
    for suite in ("builtin", "general", "data"):
        base, tuned = records(run, f"base-{suite}"), records(run, suite)
        a, b = mean(base), mean(tuned)
        row = f"| **overall** | {100 * a:.1f} | {100 * b:.1f} | {100 * (b - a):+.1f}"
        assert row in text, (suite, row)
    # per-cluster rows of the built-in suite, held-out cluster marked
    tuned = records(run, "builtin")
    for cluster in {r["cluster"] for r in tuned}:
        rs = [r for r in tuned if r["cluster"] == cluster]
        label = cluster + (" (unseen)" if rs[0]["seen"] is False else "")
        assert f"| {label} | " in text and f"| {100 * mean(rs):.1f} |" in text
    # time and cost from run.json
    cost = recorded["wall_s"] / 3600 * 2.0
    assert f"cost at 2 USD per device-hour | {cost:.4f} USD" in text
    assert f"{recorded['train']['tokens']:,} (" in text
    # data section
    assert f"| = rows trained on | {recorded['data']['rows']:,} |" in text
    # plots exist, are PNGs, and the HTML carries them inline (self-contained)
    for name in ("performance.png", "generalisation.png", "loss_curve.png"):
        assert (run / name).read_bytes()[:8] == PNG
        assert f"]({name})" in text
    html = page.read_text()
    assert html.count("src='data:image/png;base64,") == 3
    assert not re.search(r"src='(?!data:)", html)  # nothing loaded from elsewhere


def test_verdicts_follow_the_intervals(run):
    text = write_run_report(run)[0].read_text()
    supported = True
    for suite in ("builtin", "data"):  # the task suites (general is the forgetting guard)
        base, tuned = records(run, f"base-{suite}"), records(run, suite)
        by_id = {r["id"]: r["score"] for r in tuned}
        diffs = [by_id[r["id"]] - r["score"] for r in base]  # paired, in base order
        lo, _ = bootstrap_ci(diffs)
        supported &= lo > 0 and sum(diffs) > 0
    verdict = "supported" if supported else "not supported"
    assert f"**Better answers to prompts: {verdict}.**" in text


def test_no_gain_is_said_plainly(run):
    # negative control: make the tuned results a copy of the base ones
    for suite in ("builtin", "data", "general"):
        shutil.copy(run / "eval" / f"base-{suite}.jsonl", run / "eval" / f"{suite}.jsonl")
    text = write_run_report(run)[0].read_text()
    assert "**Better answers to prompts: not supported.**" in text
    assert "does not show an improvement" in text
    assert "**Generalisation to unseen task kinds: not supported.**" in text
    assert "**No forgetting: supported.**" in text


def test_forgetting_larger_than_the_gain_is_flagged(run):
    general = records(run, "base-general")
    for r in general:
        r["score"] = 1.0
    (run / "eval" / "base-general.jsonl").write_text("".join(json.dumps(r) + "\n" for r in general))
    worse = [{**r, "score": 0.0} for r in general]
    (run / "eval" / "general.jsonl").write_text("".join(json.dumps(r) + "\n" for r in worse))
    text = write_run_report(run)[0].read_text()
    assert "**No forgetting: not supported.**" in text
    assert "larger than the gain on the tuned tasks" in text


def test_metrics_split_into_training_and_validation(run):
    train, val = read_metrics(run / "metrics.jsonl")
    assert train and val and all("val_loss" in r for r in val)
    assert val[0]["step"] == 0  # the base model's validation loss starts the curve
    assert training_curves(run).read_bytes()[:8] == PNG


def test_transfer_report_counts_the_steps_saved(run, tmp_path):
    folder = tmp_path / "exp-transfer"
    pre = Path(shutil.copytree(run, folder / "pretrained"))
    scratch = Path(shutil.copytree(run, folder / "scratch"))
    # the scratch start: validation loss 9, 8, 7, ... falling below nothing the pretrained run saw
    train, val = read_metrics(scratch / "metrics.jsonl")
    val = [{**v, "val_loss": 9.0 - i} for i, v in enumerate(val)]
    (scratch / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train + val))
    for p in (scratch / "eval").glob("base-*"):
        p.unlink()
    pre_curve, scratch_curve = val_curve(pre), val_curve(scratch)
    best = min(scratch_curve, key=lambda p: p[3])
    reached = next(p for p in pre_curve if p[3] <= best[3])
    saved = steps_saved(pre_curve, scratch_curve)
    assert saved["steps_saved"] == best[0] - reached[0]
    page = write_transfer_report(folder)
    text = (folder / "report.md").read_text()
    assert f"**{best[0] - reached[0]} steps, {best[1] - reached[1]:,} tokens" in text
    for name in ("transfer_performance.png", "transfer_curves.png", "transfer_cost.png"):
        assert (folder / name).read_bytes()[:8] == PNG
    assert page.read_text().count("data:image/png;base64,") >= 3
    for claim in ("1. Tuning a pretrained", "2. It takes less", "3. It generalises", "4. It costs"):
        assert claim in text


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def _edit_yaml(path: Path, edit) -> None:
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data))


def _two_starts(run, folder: Path) -> tuple[Path, Path]:
    """The recorded run as both starts of a transfer experiment (the scratch start has no
    untuned results), recorded with every data figure today's runs write."""
    pre = Path(shutil.copytree(run, folder / "pretrained"))
    scratch = Path(shutil.copytree(run, folder / "scratch"))
    for p in (scratch / "eval").glob("base-*"):
        p.unlink()
    for r in (pre, scratch):
        _edit_json(r / "data_stats.json", lambda d: d.update(replay_rows=0, replay_tokens=0))
        _edit_json(r / "run.json", lambda d: d["data"].update(replay_rows=0, replay_tokens=0))
    return pre, scratch


def _replayed(run_dir: Path, rows: int = 9, steps: int = 7) -> None:
    """As if the run had replayed `rows` rows of the base model's replies."""

    def more(d):
        d.update(rows=d["rows"] + rows, tokens=d["tokens"] + 910, replay_rows=rows)
        d.update(replay_tokens=910)

    _edit_json(run_dir / "data_stats.json", more)
    _edit_json(run_dir / "run.json", lambda r: (more(r["data"]), r["train"].update(steps=steps)))
    _edit_yaml(run_dir / "config.yaml", lambda c: c["data"].update(replay={"fraction": 0.1}))


def _first_paragraph(md: str) -> str:
    return md.split("\n\n")[1]


def test_transfer_report_names_every_setting_that_differed(run, tmp_path):
    """Issue 29: the report said the scratch model was tuned 'with the same data, steps, batch
    and learning rate' while the pretrained run had replayed rows and trained more steps. Its
    first paragraph now lists what differed, read from the two runs' records."""
    folder = tmp_path / "exp-transfer"
    pre, scratch = _two_starts(run, folder)
    _replayed(pre)
    total = json.loads((run / "run.json").read_text())["params"]["total"]

    def scratch_run(r):
        r["params"]["trainable"] = total
        r["eval_after"].pop("general")
        r["eval_before"] = {}

    _edit_json(scratch / "run.json", scratch_run)
    for p in (scratch / "eval").glob("general.*"):
        p.unlink()

    def scratch_config(c):
        c["model"]["init"] = "scratch"
        c["adapter"]["method"] = "full"
        c["eval"].update(before=False, suites=["builtin", "data"])

    _edit_yaml(scratch / "config.yaml", scratch_config)
    write_transfer_report(folder)
    md = (folder / "report.md").read_text()
    first = _first_paragraph(md)
    for named in (
        "training rows 94 vs 85",
        "replay rows 9 vs 0",
        "data tokens 6,000 vs 5,090",
        "steps 7 vs 6",
        f"trainable parameters 4,884,480 vs {total:,}",
        "frozen modules: every base weight (only the LoRA adapters train) vs none",
        "suites evaluated after tuning: builtin, data, general vs builtin, data",
        "suites evaluated before tuning: builtin, data, general vs none",
        "model.init pretrained vs scratch",
        "adapter.method lora vs full",
        "data.replay {fraction: 0.1, prompts: null, max_new_tokens: 64} vs null",
        "eval.before true vs false",
    ):
        assert named in first, (named, first)
    assert "supervised tokens 537" in first  # the same in both, and said so
    assert "same data" not in md  # no sentence written in advance


def test_transfer_report_of_like_runs_names_no_difference(run, tmp_path):
    folder = tmp_path / "exp-transfer"
    _two_starts(run, folder)
    write_transfer_report(folder)
    first = _first_paragraph((folder / "report.md").read_text())
    assert "differed in nothing" in first and " vs " not in first
    assert "training rows 85" in first and "steps 6" in first


def test_transfer_report_shows_the_recipe_as_shipped_beside_the_comparison(run, tmp_path):
    """A recipe with replay: the comparison is pretrained vs scratch on the same rows, and the
    recipe as shipped (its replay rows, more steps) is a fourth column, its differences from
    the pretrained run named."""
    folder = tmp_path / "exp-transfer"
    pre, _ = _two_starts(run, folder)
    shipped = Path(shutil.copytree(pre, folder / "shipped"))
    for p in (shipped / "eval").glob("base-*"):
        p.unlink()
    _replayed(shipped, rows=9, steps=7)
    write_transfer_report(folder)
    md = (folder / "report.md").read_text()
    first = _first_paragraph(md)
    assert "The pretrained and the scratch run differed in nothing" in first
    assert "The recipe as shipped (its own column) differed from the pretrained run in" in first
    assert "replay rows 9 vs 0" in first and "steps 7 vs 6" in first
    assert (
        "| suite | pretrained, untuned | scratch, tuned | pretrained, tuned | "
        "pretrained, tuned as shipped |"
    ) in md
    rec = json.loads((shipped / "run.json").read_text())
    assert f"| pretrained, tuned as shipped | {rec['train']['wall_s']:.0f} | 7 |" in md


def test_report_of_a_directory_without_a_run_is_a_clear_error(tmp_path):
    from instill.errors import InstillError

    with pytest.raises(InstillError, match="no run.json"):
        write_run_report(tmp_path)


def test_constraints_table_reads_the_summaries(run):
    from instill.eval.runner import SuiteResult

    def summary_with(stem, oks):  # the runner's own summary of records with constraint results
        recs = [
            {"cluster": "constraints", "family": "f", "score": float(all(ok.values())),
             "constraints": ok}
            for ok in oks
        ]  # fmt: skip
        path = run / "eval" / f"{stem}.json"
        data = json.loads(path.read_text())
        data["constraints"] = SuiteResult(stem, "m", recs, 1.0).summary()["constraints"]
        path.write_text(json.dumps(data))

    summary_with("base-builtin", [{"lowercase": False}, {"bullets(n=2)": True, "lowercase": False}])
    summary_with("builtin", [{"lowercase": True}, {"bullets(n=2)": True, "lowercase": True}])
    text = write_run_report(run)[0].read_text()
    assert "| constraint obeyed (%) | base | tuned | n |" in text
    assert "| **every constraint** | 33.3 | 100.0 | 3 |" in text
    assert "| lowercase | 0.0 | 100.0 | 2 |" in text and "| bullets | 100.0 | 100.0 | 1 |" in text


# --- a report a user can check (issue 27 item 3) -----------------------------------------------

GUARDS = Path(__file__).parent / "fixtures" / "forgetting" / "eval"  # a real general_gen pair


def with_general_gen(run, shrink: float | None = None):
    """The run with the forgetting fixture's general_gen results beside its own suites; with
    `shrink`, the tuned replies are the base's own, each `shrink` times as many tokens long."""
    for name in ("base-general_gen.json", "base-general_gen.jsonl", "general_gen.json",
                 "general_gen.jsonl"):  # fmt: skip
        shutil.copy(GUARDS / name, run / "eval" / name)
    if shrink is not None:
        base = records(run, "base-general_gen")
        tuned = [{**r, "tokens": round(r["base_tokens"] * shrink), "score": 0.0} for r in base]
        (run / "eval" / "general_gen.jsonl").write_text(
            "".join(json.dumps({**r, "model": "tuned"}) + "\n" for r in tuned)
        )
    return run


def lines_of(text: str) -> list[str]:
    return [x for x in text.splitlines() if x.strip()]


def test_every_verdict_line_shows_its_limits(run):
    from instill.eval.drift import DRIFT_LIMIT, LENGTH_CEILING, LENGTH_FLOOR, NO_DROP, SHORT_RISE

    text = write_run_report(with_general_gen(run))[0].read_text()
    verdicts = [x for x in text.splitlines() if x.startswith("- **")]
    assert len(verdicts) == 3
    for line in verdicts[:2]:  # the gains: the rule they are held to
        assert "a gain counts when its 95% interval lies above 0" in line, line
    forgetting = verdicts[2]
    assert re.search(rf"general knowledge \(choice\) [^;]*; limit: {NO_DROP}\)", forgetting)
    assert re.search(
        r"drift [+-]\d\.\d{3} nats/token \(limit " + re.escape(f"{DRIFT_LIMIT:+g}"), forgetting
    )
    assert f"(limits {LENGTH_FLOOR:g}x to {LENGTH_CEILING:g}x" in forgetting
    assert f"(limit a rise of {100 * SHORT_RISE:g} points)" in forgetting
    # every guard's table carries a limit column, filled on the row the verdict weighs
    general = text.split("### General knowledge")[1].split("\n\n")[1]
    assert general.splitlines()[0].endswith("| limit |")
    assert "| **overall** |" in general and general.splitlines()[2].endswith(f"| {NO_DROP} |")


def test_wording_follows_the_intervals(run):
    # replies 0.9x the base's length: a real change (the interval excludes 1x), within the 0.8x
    # limit; the verdict must not call that "no significant" change
    text = write_run_report(with_general_gen(run, shrink=0.9))[0].read_text()
    line = next(x for x in text.splitlines() if x.startswith("- **No forgetting"))
    assert line.startswith("- **No forgetting: supported.**")
    assert "No significant" not in line
    assert re.search(r"Within its limit but a real change[^.]*reply length 0\.9\dx", line), line
    # a copy of the base is no change at all, and is said so
    shutil.copy(run / "eval" / "base-general_gen.jsonl", run / "eval" / "general_gen.jsonl")
    text = write_run_report(run)[0].read_text()
    line = next(x for x in text.splitlines() if x.startswith("- **No forgetting"))
    assert "No guard is past its limit" in line and "real change" not in line


def test_terms_are_explained_where_they_first_appear(run):
    lines = lines_of(write_run_report(with_general_gen(run))[0].read_text())
    first = next(i for i, x in enumerate(lines) if "drift" in x)
    explained = " ".join(lines[first : first + 2])
    assert "Drift:" in explained and "nats per token" in explained.replace("nats/token", "")
    assert "negative" in explained


def test_recipe_summary_at_the_top(run):
    lines = lines_of(write_run_report(run)[0].read_text())
    assert lines[2] == "## Recipe"  # title, one line on the base model, then the recipe
    table = "\n".join(lines[3:20])
    for row in (
        "| base model | smollm2-135m-instruct (gguf) |",
        "| method | LoRA r=16, alpha 32, all-linear; objective sft |",
        "| learning rate | 0.001 (cosine, warmup 5%) |",
        "| steps | 6 of at most 6 (batch 8 x 1 accumulation, max_length 256) |",
        "| replay | none |",
        "| data | builtin: 120 rows |",
    ):
        assert row in table, row


def data_table(text: str) -> list[tuple[str, str]]:
    block = text.split("## Data\n\n")[1].split("\n\n")[0].splitlines()[2:]
    return [tuple(c.strip() for c in x.strip("|").split("|")) for x in block]


def check_sums(rows: list[tuple[str, str]]) -> int:
    """Walk the table's running total: '+'/'-' rows move it, '=' rows must equal it."""
    total, checked = None, 0
    for label, value in rows:
        n = int(value.replace(",", ""))
        if label.startswith("="):
            assert n == total, (label, n, total)
            checked += 1
        elif label[:2] in ("+ ", "- "):
            total += n
        elif total is None:
            total = n
    return checked


def test_data_table_adds_up(run):
    recorded = json.loads((run / "run.json").read_text())
    rows = data_table(write_run_report(run)[0].read_text())
    assert check_sums(rows) == 1 and rows[-1] == ("= rows trained on", "85")
    # a run that records the whole path, with replay rows and dropped ones
    d = recorded["data"]
    d |= {"read": 120, "held_out": 24, "held_out_read": 24, "validation_split": 11,
          "weighted": 3, "rows_in": 88, "dropped": {"no trained tokens": 2},
          "replay_rows": 9, "replay_tokens": 400, "rows": 95}  # fmt: skip
    (run / "run.json").write_text(json.dumps(recorded))
    rows = data_table(write_run_report(run)[0].read_text())
    assert check_sums(rows) == 2
    assert ("+ replay rows (the base model's own replies, data.replay)", "+9") in rows
    assert rows[0] == ("rows read from the training sources", "120")
    assert rows[-1] == ("= rows trained on", "95")


def test_one_table_per_fact_and_footnotes_after_their_tables(run):
    text = write_run_report(with_general_gen(run))[0].read_text()
    assert text.count("| **overall** | 46.9 | 56.2 |") == 1  # the general suite, once
    blocks = text.split("\n\n")
    for i, block in enumerate(blocks):
        if block.startswith("|") and re.search(r"\| [^|]* \* \|", block):
            assert blocks[i + 1].startswith("A * marks"), block[:80]
    assert "A * marks a change in points whose 95% interval" in text
    assert "A * marks a change whose 95% interval excludes no change" in text


def test_cost_names_its_currency_and_the_phases_add_up(run):
    recorded = json.loads((run / "run.json").read_text())
    recorded["phases"] = {
        "load model": 10.5,
        "data": 1.25,
        "evaluate base: builtin": 7.5,
        "train": 17.25,
        "save final model": 0.5,
        "evaluate tuned: builtin": 8.5,
    }
    (run / "run.json").write_text(json.dumps(recorded))  # fmt: skip
    text = write_run_report(run, price_per_hour=2.0)[0].read_text()
    cost = recorded["wall_s"] / 3600 * 2.0
    assert f"| cost at 2 USD per device-hour | {cost:.4f} USD |" in text
    phases = text.split("| phase | seconds | share |")[1].split("\n\n")[0]
    assert "| load model | 10.5 | 12.4% |" in phases
    rest = recorded["wall_s"] - sum(recorded["phases"].values())
    assert f"| not accounted for | {rest:.1f} |" in phases
    assert f"| = whole run | {recorded['wall_s']:.1f} | 100.0% |" in phases


def test_data_stats_record_where_every_row_went(tokenizer, tmp_path):
    """Read, held out, validation, weights, dropped: the counts a run records add up, and the
    report's data table built from them sums."""
    from instill.config import DataConfig
    from instill.data import builtin
    from instill.data.dataset import build_data
    from instill.report.summary import data_flow

    rows = [{"prompt": f"Say {i}.", "completion": str(i)} for i in range(9)]
    rows.append({"prompt": "word " * 300, "completion": "too long"})  # no room: dropped
    src = tmp_path / "own.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = builtin.FAMILIES["addition"].cluster
    cfg = DataConfig(
        builtin={"train_per_family": 4, "eval_per_family": 2},
        sources=[{"path": str(src), "weight": 2.0}],
        validation=0.2,
        max_length=64,
    )
    s = build_data(tokenizer, cfg, holdout=frozenset([held]), cache=False).stats
    assert s.read == 4 * len(builtin.FAMILIES) + len(rows)
    assert s.held_out_read == s.held_out > 0 and s.validation_split > 0 and s.weighted > 0
    assert s.read - s.held_out_read - s.validation_split + s.weighted == s.rows_in
    assert sum(s.dropped.values()) > 0  # rows with no room for a trained token
    assert s.rows_in - sum(s.dropped.values()) == s.rows
    assert check_sums(data_flow(s.as_dict())) == 2


def test_kto_steps_that_log_one_side_only_are_plotted_not_a_crash(tmp_path, monkeypatch):
    """A KTO step whose rows were all undesirable logs no chosen_logp (here the first step too):
    the plot draws each side at the steps that logged it, instead of a KeyError after training."""
    import matplotlib.figure

    rows = [
        {"step": 1, "loss": 0.7, "lr": 1e-4, "tokens": 10, "rows": 8, "rejected_logp": -1.0},
        {"step": 2, "loss": 0.6, "lr": 1e-4, "tokens": 20, "rows": 16, "chosen_logp": -0.5,
         "rejected_logp": -1.5},
        {"step": 3, "loss": 0.5, "lr": 1e-4, "tokens": 30, "rows": 24, "rejected_logp": -2.0},
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = {}

    def keep(fig, *args, **kwargs):
        ax = fig.axes[1]
        drawn["title"] = ax.get_title()
        drawn.update({line.get_label(): list(line.get_xdata()) for line in ax.get_lines()})

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    training_curves(tmp_path)
    assert drawn == {"title": "chosen and rejected replies", "chosen": [2], "rejected": [1, 2, 3]}
