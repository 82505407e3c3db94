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
    assert f"| rows trained on | {recorded['data']['rows']:,} |" in text
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
        "data.replay {fraction: 0.1, max_new_tokens: 64, prompts: null} vs null",
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
