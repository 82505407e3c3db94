"""bench/pairs_folds.py: folds split by prompt, and per-fold pair results pooled pair by pair
(no model: the results are written from fixed log-probabilities)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from instill.errors import InstillError
from instill.eval.preference import pair_records, preference_summary, write_preference

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("pairs_folds", ROOT / "bench" / "pairs_folds.py")
folds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(folds)


def _side(logps: list[tuple[float, float]]) -> list[dict]:
    return [{"chosen_logp": c, "rejected_logp": r} for c, r in logps]


def _result(folder: Path, prompts: list[str], model, reference, name: str) -> Path:
    """An eval-pairs result of `model` against `reference` on pairs of `prompts`."""
    base = [{"id": i, "source": f"f.jsonl:{i + 1}", "prompt": p, "chosen_tokens": 10,
             "rejected_tokens": 5} for i, p in enumerate(prompts)]  # fmt: skip
    m = [b | s for b, s in zip(base, _side(model), strict=True)]
    ref = [b | s for b, s in zip(base, _side(reference), strict=True)]
    summary = preference_summary(m, ref) | {"model": name, "reference": "base"}
    write_preference(folder, summary, pair_records(m, ref), {"rows_sha256": "x" + prompts[0]})
    return folder


def test_pool_is_the_pair_by_pair_change_over_every_fold(tmp_path):
    """Two folds, each a start and a tuned model against one base: the pooled implicit-reward
    change is the mean of the per-pair changes over both folds; a fold alone equals compare's
    pairing; folds sharing a prompt, or measured against another model, are refused."""
    base = [(-20.0, -20.0)] * 3
    # fold 0: start ranks 1 of 3 right against the base, tuned 3 of 3; fold 1: 0 -> 1 of 3
    f0 = [_result(tmp_path / "s0", ["a", "a", "b"], [(-21, -20), (-19, -20), (-22, -20)], base,
                  "start"),
          _result(tmp_path / "t0", ["a", "a", "b"], [(-19, -20), (-18, -20), (-19, -20)], base,
                  "tuned")]  # fmt: skip
    f1 = [_result(tmp_path / "s1", ["c", "d", "d"], [(-21, -20), (-25, -20), (-20, -20)], base,
                  "start"),
          _result(tmp_path / "t1", ["c", "d", "d"], [(-19, -20), (-25, -20), (-21, -20)], base,
                  "tuned")]  # fmt: skip
    got = folds.pool([f"{f0[0]},{f0[1]}", f"{f1[0]},{f1[1]}"])
    acc = got["measures"]["reward_accuracy"]
    assert acc["start"]["value"] == pytest.approx(1 / 6, abs=1e-6)
    assert acc["model"]["value"] == pytest.approx(4 / 6, abs=1e-6)
    assert acc["delta"]["value"] == pytest.approx(3 / 6, abs=1e-6)
    margin = got["measures"]["reward_margin"]["delta"]["value"]
    assert margin == pytest.approx((2 + 1 + 3 + 2 + 0 - 1) / 6, abs=1e-6)
    assert got["n"] == 6 and got["prompts"] == 4 and got["reference"] == "base"
    alone = folds.pool([f"{f0[0]},{f0[1]}"])["measures"]["reward_accuracy"]["delta"]["value"]
    assert alone == pytest.approx(2 / 3, abs=1e-6)
    with pytest.raises(InstillError, match="shares 2 prompts with fold 0"):
        folds.pool([f"{f0[0]},{f0[1]}", f"{f0[0]},{f0[1]}"])
    other = _result(tmp_path / "o", ["e"], [(-1, -2)], [(-1, -1)], "tuned")
    json_path = other / "preference.json"
    data = json.loads(json_path.read_text())
    json_path.write_text(json.dumps(data | {"reference": "another"}))
    with pytest.raises(InstillError, match="reference 'another'"):
        folds.pool([f"{f0[0]},{f0[1]}", str(other)])


def test_split_holds_each_prompt_out_once(tmp_path):
    """Every prompt is in exactly one held-out fold with all its pairs, and in every other
    fold's training file; --first keeps a given held-out file as fold 0."""
    rows = [{"prompt": f"p{i // 2}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(20)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = tmp_path / "first.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in rows if r["prompt"] in ("p3", "p7")))
    folds.split(pairs, 3, tmp_path / "f", first)
    read = lambda p: [json.loads(x) for x in p.read_text().splitlines()]  # noqa: E731
    held = [read(tmp_path / "f" / f"heldout{k}.jsonl") for k in range(3)]
    train = [read(tmp_path / "f" / f"train{k}.jsonl") for k in range(3)]
    assert {r["prompt"] for r in held[0]} == {"p3", "p7"}
    assert sorted(r["chosen"] for h in held for r in h) == sorted(r["chosen"] for r in rows)
    for h, t in zip(held, train, strict=True):
        assert len(h) + len(t) == 20 and not {r["prompt"] for r in h} & {r["prompt"] for r in t}
    assert [len(h) for h in held] == [4, 8, 8]
