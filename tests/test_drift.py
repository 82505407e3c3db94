"""General behaviour by generation (eval/drift.py): drift, reply length, the base-reply cache, the
forgetting verdict, replay rows and the KL term."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from instill.anchors import Anchor, BaseReply, base_replies, prompt_file, shipped_prompts
from instill.config import load_recipe
from instill.data.dataset import collate, replay_conversations, replay_picks, tokenize
from instill.errors import InstillError
from instill.eval import drift
from instill.eval.compare import Side, compare_suite, generation_change
from instill.eval.drift import drift_records, generation_summary
from instill.models.load import model_digest
from instill.report.run_report import forgetting_verdict

FIXTURE = Path(__file__).parent / "fixtures" / "forgetting"
RECIPES = Path(__file__).resolve().parent.parent / "src" / "instill" / "recipes"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTILL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_the_prompt_pool_ships_eval_and_replay_splits_apart():
    ev, rp = shipped_prompts("eval"), shipped_prompts("replay")
    assert len(ev) >= 120 and len(rp) >= 64
    kinds = {p.family for p in ev}
    assert kinds == {
        "explain",
        "advise",
        "write",
        "rewrite",
        "plan",
        "code",
        "compare",
        "summarise",
    }
    texts = lambda ps: {p.prompt[-1]["content"] for p in ps}  # noqa: E731
    assert not texts(ev) & texts(rp)  # replay never trains on an evaluated prompt
    assert len({p.id for p in ev + rp}) == len(ev) + len(rp)


def test_drift_is_zero_for_the_base_itself_and_positive_for_a_perturbed_model(
    tiny, tokenizer, home
):
    prompts = shipped_prompts("eval")[:8]
    anchor = base_replies(tiny, tokenizer, prompts, 6, batch_size=4)
    same = drift_records(tiny, tokenizer, prompts, anchor, 4)
    assert [r["score"] for r in same] == [0.0] * 8
    assert [r["prediction"] for r in same] == [anchor.replies[p.id].text for p in prompts]
    # the same weights through the scoring path (not the shortcut): drift 0 up to float noise
    other = Anchor("not-this-model", anchor.max_new_tokens, anchor.replies)
    scored = drift_records(tiny, tokenizer, prompts, other, 4)
    assert max(abs(r["score"]) for r in scored) < 1e-4
    assert [r["prediction"] for r in scored] == [r["prediction"] for r in same]
    # a perturbed model moves away from the base's replies: positive drift, interval above 0
    moved = copy.deepcopy(tiny)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in moved.model.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    records = drift_records(moved, tokenizer, prompts, anchor, 4)
    summary = generation_summary(records)
    assert summary["drift"]["value"] > 0 and summary["drift"]["ci95"][0] > 0
    for r in records:  # drift = NLL of the base reply under the model - under the base
        assert r["score"] == pytest.approx(r["nll"] - r["base_nll"], abs=2e-6)


def _rec(i, tokens, base_tokens, words, base_words, score=0.0, **extra):
    return {
        "id": f"p{i}",
        "prompt": f"prompt {i}",
        "prediction": "x " * words,
        "base_reply": "y " * base_words,
        "tokens": tokens,
        "base_tokens": base_tokens,
        "words": words,
        "base_words": base_words,
        "score": score,
        "anchor": "a",
        "scores": {"drift": score, **extra},
    }


def test_length_measures_on_hand_made_replies():
    # four prompts; the tuned model answers two of them in a few words
    tuned = [
        _rec(0, 60, 60, 40, 40),
        _rec(1, 30, 60, 20, 40),
        _rec(2, 5, 60, 3, 40),
        _rec(3, 5, 60, 4, 9),
    ]
    s = generation_summary(tuned)
    assert s["tokens"] == 25.0 and s["base_tokens"] == 60.0
    assert s["length_ratio"]["value"] == pytest.approx(100 / 240)
    assert s["short_share"] == 0.5 and s["base_short_share"] == 0.25
    assert s["short_delta"]["value"] == 0.25
    # the same, as a comparison of the base's records with the tuned model's
    base = [_rec(i, r["base_tokens"], r["base_tokens"], r["base_words"], r["base_words"])
            for i, r in enumerate(tuned)]  # fmt: skip
    gen = generation_change(base, tuned)
    assert gen["tokens"][:3] == (60.0, 25.0, pytest.approx(100 / 240))
    assert gen["short"][:3] == (0.25, 0.5, 0.25)
    assert gen["rouge_l"] is None  # no references, no ROUGE-L


def test_base_reply_cache_is_keyed_by_model_and_prompts(tiny, tokenizer, home, monkeypatch):
    prompts = shipped_prompts("replay")[:4]
    first = base_replies(tiny, tokenizer, prompts, 5, batch_size=4)
    files = list((home / "base-replies").glob("*.jsonl"))
    assert len(files) == 1

    def no_generation(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr("instill.infer.generate", no_generation)
    again = base_replies(tiny, tokenizer, prompts, 5, batch_size=4)  # all cached
    assert again == first
    # another prompt is generated (and only it); another model gets another cache file
    calls = []

    def count(model, tok, convs, *a, **k):
        calls.append(len(convs))
        from instill.infer.generate import Generation

        return [Generation("hi", 1, 1, "stop") for _ in convs]

    monkeypatch.setattr("instill.infer.generate", count)
    more = shipped_prompts("replay")[:5]
    base_replies(tiny, tokenizer, more, 5, batch_size=4)
    assert calls == [1]
    moved = copy.deepcopy(tiny)
    with torch.no_grad():
        moved.lm_head.weight[0, 0] += 1.0
    assert model_digest(moved) != model_digest(tiny)
    base_replies(moved, tokenizer, prompts, 5, batch_size=4)
    assert calls == [1, 4]
    assert len(list((home / "base-replies").glob("*.jsonl"))) == 2
    # other generation settings: another cache file too
    base_replies(tiny, tokenizer, prompts, 7, batch_size=4)
    assert calls == [1, 4, 4]


def test_replies_cached_without_nll_are_scored_when_a_drift_suite_asks(
    tiny, tokenizer, home, monkeypatch
):
    prompts = shipped_prompts("replay")[:4]

    def no_generation(*a, **k):
        raise AssertionError("generated again")

    with monkeypatch.context() as m:  # new replies are scored while decoding, not after
        m.setattr("instill.anchors.reply_nll", no_generation)
        scored = base_replies(tiny, tokenizer, prompts, 5, batch_size=4, cache=False)
    bare = base_replies(tiny, tokenizer, prompts, 5, batch_size=4, nll=False)
    assert [r.nll for r in bare.replies.values()] == [None] * 4  # replay: no forward pass
    assert [r.ids for r in bare.replies.values()] == [r.ids for r in scored.replies.values()]

    monkeypatch.setattr("instill.infer.generate", no_generation)
    again = base_replies(tiny, tokenizer, prompts, 5, batch_size=4)  # scored, not generated
    assert [r.nll for r in again.replies.values()] == pytest.approx(
        [r.nll for r in scored.replies.values()], abs=1e-5
    )  # the forward pass over the replies gives the NLL summed while decoding them
    assert [(r.text, r.ids) for r in again.replies.values()] == [
        (r.text, r.ids) for r in scored.replies.values()
    ]
    monkeypatch.setattr("instill.anchors.reply_nll", no_generation)
    cached = base_replies(tiny, tokenizer, prompts, 5, batch_size=4)
    assert cached == again  # NLL cached too


def test_a_suite_file_without_prompts_is_a_clear_error(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"prompt": "Tell me about tea.", "reference": "Tea is..."}) + "\n"
                 + json.dumps({"answer": "no prompt here"}) + "\n")  # fmt: skip
    with pytest.raises(InstillError, match=r"mine.jsonl:2: no prompt \(suite mine\)"):
        prompt_file(f, "suite mine")
    f.write_text("")
    with pytest.raises(InstillError, match="mine.jsonl: file is empty"):
        prompt_file(f, "suite mine")
    f.write_text("[]")
    with pytest.raises(InstillError, match=r"mine.json: the file holds no prompts \(suite mine\)"):
        f.rename(f.with_suffix(".json"))
        prompt_file(f.with_suffix(".json"), "suite mine")
    f.write_text(json.dumps({"prompt": "Tell me about tea.", "reference": "Tea is..."}) + "\n")
    (ex,) = prompt_file(f, "suite mine")
    assert ex.reference == ("Tea is...",)


def test_replay_and_kl_settings_are_checked(tmp_path):
    for bad in ("0", "1", "1.5", "-0.1"):
        with pytest.raises(InstillError, match=r"data\.replay\.fraction"):
            load_recipe(RECIPES / "quickstart.yaml", [f"data.replay={bad}"])
    with pytest.raises(InstillError, match=r"train\.kl_to_base.*data\.replay"):
        load_recipe(RECIPES / "quickstart.yaml", ["data.replay=null", "train.kl_to_base=0.5"])
    recipe = load_recipe(RECIPES / "quickstart.yaml", ["data.replay=0.2"])
    assert recipe.data.replay.fraction == 0.2 and recipe.data.replay.prompts is None


def test_kl_to_base_with_full_fine_tuning_refuses_a_model_too_large(tiny, monkeypatch):
    import instill.models.load as load
    from instill.config import TrainConfig
    from instill.train import loop

    cfg = TrainConfig(kl_to_base=0.5)
    monkeypatch.setattr(load, "available_memory", lambda device: 1000)
    with pytest.raises(InstillError, match=r"train\.kl_to_base: full fine-tuning needs a frozen"):
        loop.kl_reference(tiny, cfg)
    monkeypatch.setattr(load, "available_memory", lambda device: 2**40)
    ref = loop.kl_reference(tiny, cfg)
    assert ref is not tiny and not any(p.requires_grad for p in ref.parameters())


def test_replay_rows_mix_at_the_fraction_and_cut_replies_do_not_learn_to_end(tokenizer):
    from instill.config import DataConfig

    prompts = shipped_prompts("replay")[:3]
    replies = {
        prompts[0].id: BaseReply("A full answer.", 4, True, 1.0),
        prompts[1].id: BaseReply("An answer cut off in the", 6, False, 1.0),
        prompts[2].id: BaseReply("Another answer.", 3, True, 1.0),
    }
    picks = replay_picks(prompts, 0.2, 40, seed=0)
    assert len(picks) == 10  # 10 of 50 rows, the 3 prompts repeated
    assert {p.id for p in picks} == set(replies)
    convs = replay_conversations(picks, replies)
    cfg = DataConfig(builtin=None, sources=[{"path": "x.jsonl"}])
    rows, _ = tokenize(tokenizer, convs, cfg)
    assert all(r.replay for r in rows)
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for conv, row in zip(convs, rows, strict=True):
        trained = [t for t, m in zip(row.input_ids, row.mask, strict=True) if m]
        assert (trained[-1] == eot) is (not conv.meta["cut"]), conv.messages[-1]
    batch = collate(rows[:2], tokenizer.pad_token_id)
    assert batch["replay_mask"].sum() == batch["attention_mask"].sum()


def _lora(tiny):
    from instill.config import AdapterConfig
    from instill.models import attach_adapter

    model, _ = attach_adapter(copy.deepcopy(tiny), AdapterConfig(r=4, alpha=8))
    return model


def test_kl_term_is_zero_with_zero_adapters_and_has_a_gradient_otherwise(tiny, tokenizer):
    from instill.train.loss import SupervisedLM

    prompts = shipped_prompts("replay")[:2]
    replies = {p.id: BaseReply("Here is a short reply.", 6, True, 1.0) for p in prompts}
    rows, _ = tokenize(
        tokenizer,
        replay_conversations(replay_picks(prompts, 0.5, 2, 0), replies),
        load_recipe(RECIPES / "quickstart.yaml").data,
    )
    batch = collate(rows, tokenizer.pad_token_id)
    del batch["real_tokens"]
    model = _lora(tiny)
    plain, _ = SupervisedLM(model)(**batch)
    lm = SupervisedLM(model, kl_weight=1.0)
    with_kl, _ = lm(**batch)
    assert lm.last_kl[0] == pytest.approx(0.0, abs=1e-5)  # lora_B is 0: tuned == base
    assert float(with_kl.detach()) == pytest.approx(float(plain.detach()), abs=1e-4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.zero_grad()
    loss, _ = SupervisedLM(model, kl_weight=0.0)(**batch)
    lm = SupervisedLM(model, kl_weight=2.0)
    loss_kl, _ = lm(**batch)
    kl, positions = lm.last_kl
    assert kl > 0 and positions == int((batch["labels"][:, 1:] != -100).sum())
    assert float(loss_kl) == pytest.approx(float(loss) + 2.0 * kl, rel=1e-5)
    loss_kl.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    # the base distribution came from the same weights with adapters off: nothing was copied
    assert lm._reference == [None]


def _side(folder: Path, prefix: str) -> Side:
    return Side(prefix.rstrip("-") or "tuned", folder, prefix)


@pytest.fixture
def recorded(tmp_path):
    """Eval records of a real quickstart run without preservation (lr 1e-3, no replay)."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "forgetting"))


def test_the_unpreserved_quickstart_is_flagged_as_forgetting(recorded):
    folder = recorded / "eval"
    base, tuned = _side(folder, "base-"), _side(folder, "")
    tables = [compare_suite(base, tuned, s) for s in ("general", "general_gen")]
    verdict = forgetting_verdict(tables)
    assert verdict.supported is False
    assert verdict.text.startswith("Forgetting found")
    gen = tables[1]["generation"]
    assert gen["tokens"][2] < drift.LENGTH_FLOOR and "replies" in verdict.text
    # the choice suite alone would not have caught it
    assert forgetting_verdict(tables[:1]).supported is True


def test_a_model_compared_with_itself_shows_no_forgetting(recorded):
    folder = recorded / "eval"
    for prefix in ("base-", ""):
        side = _side(folder, prefix)
        tables = [compare_suite(side, side, s) for s in ("general", "general_gen")]
        verdict = forgetting_verdict(tables)
        assert verdict.supported is True, verdict.text
        gen = tables[1]["generation"]
        assert gen["drift"].delta == 0 and gen["tokens"][2] == 1.0 and gen["short"][2] == 0


def test_compare_prints_the_verdict_and_the_replies_that_moved(recorded, capsys, monkeypatch):
    from typer.testing import CliRunner

    from instill.cli import app

    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(app, ["compare", str(recorded)])
    assert result.exit_code == 0, result.output
    assert "No forgetting: not supported" in result.output
    assert "the replies that moved most" in result.output
    assert "reply tokens (mean)" in result.output
    result = CliRunner().invoke(app, ["compare", str(recorded), "--json"])
    data = json.loads(result.output)
    assert data["forgetting"]["supported"] is False
    gen = next(s for s in data["suites"] if s["suite"] == "general_gen")["generation"]
    assert gen["losses"] and len(gen["moved"]) == 3


def test_a_run_with_replay_kl_and_general_gen(tiny_recipe, tmp_path, home, tokenizer, monkeypatch):
    from instill.infer.generate import Generation
    from instill.recipe import run_recipe

    # The random tiny model only writes newlines, which make no replay row; every generation
    # answers with the same few words instead (the real model's run is the slow test below).
    words = tokenizer("A reply of a few words.", add_special_tokens=False)["input_ids"]
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def fixed(model, tok, convs, *a, **k):
        return [Generation("A reply of a few words.", 1, len(words), "stop", (*words, eot))
                for _ in convs]  # fmt: skip

    monkeypatch.setattr("instill.infer.generate", fixed)

    recipe = tiny_recipe(
        tmp_path,
        "data.builtin.train_per_family=8",
        "data.replay.fraction=0.2",
        "data.replay.max_new_tokens=6",
        "train.kl_to_base=0.5",
        "train.max_steps=3",
        "train.batch_size=4",
        "train.log_every=1",
        "eval.suites=[general_gen]",
        "eval.general_gen_per_kind=1",
        "eval.gen_max_new_tokens=5",
        "eval.holdout_clusters=[]",
    )
    run = run_recipe(recipe).run_dir
    stats = json.loads((run / "data_stats.json").read_text())
    assert stats["replay_rows"] == 4 and stats["rows"] == 16 + 4  # 4 of 20 rows: 0.2
    base = [
        json.loads(x)
        for x in (run / "eval" / "base-general_gen.jsonl").read_text().split("\n")
        if x
    ]
    tuned = [
        json.loads(x) for x in (run / "eval" / "general_gen.jsonl").read_text().split("\n") if x
    ]
    assert len(base) == len(tuned) == 8  # one prompt of each kind
    assert all(r["score"] == 0.0 and r["prediction"] == r["base_reply"] for r in base)
    assert all(r["base_reply"] == b["base_reply"] for r, b in zip(tuned, base, strict=True))
    summary = json.loads((run / "eval" / "general_gen.json").read_text())
    assert summary["metric"] == "drift" and "length_ratio" in summary["generation"]
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().split("\n") if x]
    assert any("kl_to_base" in r for r in logged)
    text = (run / "report.md").read_text()
    assert "General behaviour: general_gen" in text
    # every reply is the base's own words: the verdict is no forgetting, at a length ratio of 1
    assert (
        "**No forgetting: supported.** No guard is past its limit, and no guard's 95% interval "
        "reaches across one. Measured: general_gen: drift" in text
    )
    assert "reply length 1.00x" in text


@pytest.mark.slow
def test_real_model_replay_kl_and_general_gen(default_source, tmp_path):
    """The default model end to end: base replies, replay rows, the KL term and the verdict."""
    from instill.recipe import run_recipe

    recipe = load_recipe(
        RECIPES / "quickstart.yaml",
        [
            f"train.output_dir={tmp_path}",
            "data.builtin.families=[addition]",
            "data.builtin.train_per_family=8",
            "data.builtin.eval_per_family=1",
            "data.replay.fraction=0.2",
            "data.replay.max_new_tokens=8",
            "train.kl_to_base=0.5",
            "train.max_steps=2",
            "train.log_every=1",
            "eval.suites=[general_gen]",
            "eval.general_gen_per_kind=1",
            "eval.gen_max_new_tokens=8",
            "eval.holdout_clusters=[]",
        ],
    )
    summary = run_recipe(recipe)
    run = summary.run_dir
    base = json.loads((run / "eval" / "base-general_gen.json").read_text())["generation"]
    assert base["drift"]["value"] == 0.0 and base["length_ratio"]["value"] == 1.0
    tuned = [
        json.loads(x) for x in (run / "eval" / "general_gen.jsonl").read_text().split("\n") if x
    ]
    assert len(tuned) == 8 and all(r["base_nll"] > 0 and r["nll"] > 0 for r in tuned)
    kl = [json.loads(x) for x in (run / "metrics.jsonl").read_text().split("\n") if x]
    assert all(r["kl_to_base"] >= 0 for r in kl if "kl_to_base" in r)
    assert any("kl_to_base" in r for r in kl)
    # the report states the verdict that the run's own records give, and two steps of LoRA
    # with replay and the KL term cost nothing measurable
    folder = run / "eval"
    tables = [compare_suite(_side(folder, "base-"), _side(folder, ""), "general_gen")]
    verdict = forgetting_verdict(tables)
    assert verdict.supported is True, verdict.text
    assert f"**No forgetting: supported.** {verdict.text}" in (run / "report.md").read_text()


def test_instill_eval_scores_a_drift_suite_file_against_a_base(tiny_dir, tmp_path, home):
    from typer.testing import CliRunner

    from instill.cli import app

    suite = tmp_path / "mine.jsonl"
    rows = [
        {"prompt": "Tell me about tea.", "reference": "Tea is a drink."},
        {"instruction": "Describe a river.", "reference": "A river flows."},
    ]
    suite.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "results"
    args = ["eval", str(tiny_dir), "--suite", str(suite), "--metric", "drift"]
    result = CliRunner().invoke(app, [*args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "mine: drift +0.000 nats/token" in " ".join(result.output.split())
    records = [json.loads(x) for x in (out / "mine.jsonl").read_text().split("\n") if x]
    assert [r["score"] for r in records] == [0.0, 0.0]  # the model is its own base here
    assert all("rouge_l" in r["scores"] for r in records)
    summary = json.loads((out / "mine.json").read_text())
    assert summary["generation"]["rouge_l"]["value"] == pytest.approx(
        sum(r["scores"]["rouge_l"] for r in records) / 2, abs=1e-6
    )
