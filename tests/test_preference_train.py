"""Preference objectives in the training loop (train/objective.py): the batch layout, the
reference model's three sources, the losses at the start, resume, and the recipe's refusals."""

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import build_tiny
from dist import assert_same_weights
from dist_worker import make_pairs, run

from instill.config import AdapterConfig, PreferenceConfig, TrainConfig
from instill.errors import InstillError
from instill.models import attach_adapter
from instill.train import train
from instill.train.loss import IGNORE
from instill.train.objective import PreferenceLM, make_objective, precompute_reference


def objective(name="dpo", **knobs):
    return make_objective(TrainConfig(objective=name, preference=PreferenceConfig(**knobs)))


def lora(tokenizer, seed=0, moved=True):
    """The tiny model with LoRA adapters; `moved`: adapters given random B weights, so the
    policy differs from its base."""
    model, _ = attach_adapter(build_tiny(tokenizer), AdapterConfig(r=4, alpha=8), seed=seed)
    if moved:
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=gen) * 0.3
    return model


def device_batch(batch):
    return {k: v for k, v in batch.items() if k != "real_tokens"}


def per_pair(lm, obj, rows, pad=0):
    """Each pair's figures, scored one pair per batch."""
    out = []
    for row in rows:
        lm(**device_batch(obj.collate([row], pad)))
        out.append({k: s / n for k, (s, n) in lm.last_figures.items()})
    return out


def test_pair_batch_puts_the_loss_on_reply_tokens_only(tokenizer):
    rows = make_pairs(3, seed=1)
    batch = objective().collate(rows, pad_id=0)
    assert batch["input_ids"].shape[0] == 6  # chosen rows, then rejected rows
    seqs = [r.chosen() for r in rows] + [r.rejected() for r in rows]
    for i, (ids, _) in enumerate(seqs):
        n, prompt = len(ids), len(rows[i % 3].prompt_ids)
        assert batch["input_ids"][i, :n].tolist() == ids
        labels = batch["labels"][i].tolist()
        assert labels[:prompt] == [IGNORE] * prompt  # the prompt's positions carry no loss
        assert labels[prompt:n] == ids[prompt:]
        assert labels[n:] == [IGNORE] * (len(labels) - n)  # nor does padding
    assert objective().units(batch) == 3
    assert int(batch["real_tokens"]) == sum(len(ids) for ids, _ in seqs)


def test_dpo_starts_at_log_2_with_zero_margins(tokenizer):
    """Fresh LoRA adapters (B = 0): the policy is its reference, so every pair's loss is log 2
    and every margin and reward exactly 0."""
    model, obj = lora(tokenizer, moved=False), objective()
    lm = PreferenceLM(model, obj)
    loss_sum, pairs = lm(**device_batch(obj.collate(make_pairs(4, seed=2), 0)))
    assert int(pairs) == 4
    assert float(loss_sum.detach()) / 4 == pytest.approx(math.log(2), abs=1e-6)
    for name in ("margin", "chosen_reward", "rejected_reward", "accuracy"):
        assert lm.last_figures[name][0] == 0.0, name


def test_swapping_chosen_and_rejected_flips_every_margin(tokenizer):
    from dataclasses import replace

    model, obj = lora(tokenizer), objective()
    lm = PreferenceLM(model, obj)
    rows = make_pairs(4, seed=3)
    swapped = [
        replace(r, chosen_ids=r.rejected_ids, chosen_mask=r.rejected_mask,
                rejected_ids=r.chosen_ids, rejected_mask=r.chosen_mask)
        for r in rows
    ]  # fmt: skip
    a, b = per_pair(lm, obj, rows), per_pair(lm, obj, swapped)
    for x, y in zip(a, b, strict=True):
        assert abs(x["margin"]) > 1e-4  # the adapters moved the policy
        assert y["margin"] == pytest.approx(-x["margin"], abs=1e-5)
        assert x["accuracy"] + y["accuracy"] == 1.0


def test_disabled_adapter_reference_equals_a_frozen_copy(tokenizer):
    base = build_tiny(tokenizer)
    frozen = copy.deepcopy(base).eval()
    model, _ = attach_adapter(base, AdapterConfig(r=4, alpha=8), seed=0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    obj = objective()
    batch = device_batch(obj.collate(make_pairs(4, seed=4), 0))
    args = (batch["input_ids"], batch["labels"], batch["attention_mask"])
    off = PreferenceLM(model, obj).reference_logps(*args)
    copied = PreferenceLM(model, obj, reference=frozen).reference_logps(*args)
    policy = PreferenceLM(model, obj, reference=model).reference_logps(*args)
    assert torch.allclose(off, copied, atol=1e-5, rtol=0)
    assert not torch.allclose(off, policy, atol=1e-3)  # the control: adapters on differ


def test_full_fine_tuning_reference_is_a_frozen_copy_or_refused_naming_the_key(
    tokenizer, monkeypatch
):
    import instill.models.load as load
    from instill.train.loop import kl_reference

    full = build_tiny(tokenizer)
    cfg = TrainConfig(objective="dpo")
    monkeypatch.setattr(load, "available_memory", lambda device: 1000)
    with pytest.raises(InstillError, match=r"precompute_reference: true"):
        kl_reference(full, cfg)
    precomputed = TrainConfig(
        objective="dpo", preference=PreferenceConfig(precompute_reference=True)
    )
    assert kl_reference(full, precomputed) is None  # no copy: the reference is scored up front
    assert kl_reference(full, TrainConfig(objective="simpo")) is None  # reference-free
    monkeypatch.setattr(load, "available_memory", lambda device: 2**40)
    ref = kl_reference(full, cfg)
    assert ref is not full and not any(p.requires_grad for p in ref.parameters())
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), full.parameters(), strict=True))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_precomputed_reference_equals_the_live_one(tokenizer, method):
    """Scored before training (the adapters off, or the full model before its first step),
    the rows' reference log-probs give the same losses as the live reference does."""
    obj = objective()
    rows = make_pairs(5, seed=6)
    if method == "lora":
        model, live_ref = lora(tokenizer), None
        pre = precompute_reference(model, obj, rows, 0, 2)
    else:
        start = build_tiny(tokenizer)
        pre = precompute_reference(start, obj, rows, 0, 2)
        live_ref = copy.deepcopy(start)
        model = start
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    assert all(r.reference is not None for r in pre)
    live = PreferenceLM(model, obj, reference=live_ref)
    lo, ln = live(**device_batch(obj.collate(rows, 0)))
    batch = device_batch(obj.collate(pre, 0))
    assert "reference_logps" in batch
    po, pn = live(**batch)
    assert int(ln) == int(pn) == 5
    assert float(po.detach()) == pytest.approx(float(lo.detach()), abs=1e-5)
    assert live.last_figures["margin"][0] != 0.0


def test_pairs_without_precomputed_log_probs_still_get_a_live_reference(tokenizer):
    """Under precompute_reference a batch of pairs whose rows carry no cached reference (the
    cache not applied to them) is scored against the live reference, as without the setting:
    only a batch of replay rows alone skips the reference forward."""
    model, rows = lora(tokenizer), make_pairs(3, seed=8)
    batch = objective(precompute_reference=True).collate(rows, 0)
    assert "reference_logps" not in batch
    pre = PreferenceLM(model, objective(precompute_reference=True))
    live = PreferenceLM(model, objective())
    got, _ = pre(**device_batch(batch))
    want, _ = live(**device_batch(objective().collate(rows, 0)))
    assert float(got.detach()) == pytest.approx(float(want.detach()), abs=1e-6)
    assert pre.last_figures["margin"] == live.last_figures["margin"]
    assert any(m != 0.0 for m in pre.last_figures["margin"])


def replay_rows_for(seed: int, n: int = 2) -> list:
    """Supervised replay rows (data.replay): random ids, the last tokens trained."""
    import random

    from instill.data.dataset import Row

    rng = random.Random(seed)
    out = []
    for i in range(n):
        ids = [rng.randrange(3, 49152) for _ in range(rng.randint(6, 14))]
        out.append(Row(ids, [0] * 3 + [1] * (len(ids) - 3), f"replay:{i}", replay=True))
    return out


def mean_token_nll(model, row) -> float:
    """A row's mean negative log-likelihood over its trained tokens, from the model's logits."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row.input_ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    picked = [-float(logp[t - 1, row.input_ids[t]]) for t in range(1, len(row.input_ids))
              if row.mask[t]]  # fmt: skip
    return sum(picked) / len(picked)


@pytest.mark.parametrize("name,packed", [("dpo", False), ("dpo", True), ("kto", False)])
def test_replay_rows_add_their_mean_token_loss_beside_the_pairs(tokenizer, name, packed):
    """data.replay in a preference run: each replay row is one more unit whose loss is its mean
    token NLL; the pairs' (or kto rows') losses and figures are those of a batch without them,
    and no reference is scored for the replay rows."""
    from instill.data.preference_tokens import LabelledRow

    prefs = make_pairs(3, seed=11)
    if name == "kto":
        prefs = [LabelledRow(r.prompt_ids, r.chosen_ids, r.chosen_mask, i % 2 == 0, r.source)
                 for i, r in enumerate(prefs)]  # fmt: skip
    replay = replay_rows_for(seed=12)
    mixed = [prefs[0], replay[0], prefs[1], prefs[2], replay[1]]
    obj = objective(name)
    if packed:
        obj.pack_length = 64
    model = lora(tokenizer)
    lm = PreferenceLM(model, obj)
    batch = obj.collate(mixed, 0)
    assert obj.units(batch) == 5 and int(batch["n_replay"]) == 2
    total, units = lm(**device_batch(batch))
    assert int(units) == 5
    figures = lm.last_figures
    alone, _ = lm(**device_batch(obj.collate(prefs, 0)))
    nll = [mean_token_nll(model, r) for r in replay]
    assert float(total.detach()) == pytest.approx(float(alone.detach()) + sum(nll), abs=1e-4)
    assert figures["replay_nll"][1] == 2
    assert figures["replay_nll"][0] == pytest.approx(sum(nll), abs=1e-4)
    for key, (s, n) in lm.last_figures.items():  # the pairs' own figures: unchanged
        assert figures[key][1] == n and figures[key][0] == pytest.approx(s, abs=1e-5), key
    if name == "dpo":  # precomputed: the replay rows are passed through, never scored
        from instill.train.objective import cached_reference

        pre = cached_reference(model, obj, mixed, 0, 2)
        assert [r is m for r, m in zip(pre, mixed, strict=True)] == [False, True, False, False,
                                                                       True]  # fmt: skip
        again, _ = lm(**device_batch(obj.collate(pre, 0)))
        assert float(again.detach()) == pytest.approx(float(total.detach()), abs=1e-4)


@pytest.mark.parametrize("precomputed", [True, False])
def test_a_batch_of_replay_rows_alone_trains_their_nll(tokenizer, precomputed):
    """A micro-batch may hold replay rows only. Precomputed: no reference forward runs (full
    fine-tuning has no adapters to switch off and no frozen copy). Live: the reference forward
    runs all the same, once, so that processes holding a sharded model gather weights together
    whatever rows each one drew."""
    model = build_tiny(tokenizer) if precomputed else lora(tokenizer)
    obj = objective(precompute_reference=precomputed)
    replay = replay_rows_for(seed=15)
    batch = obj.collate(replay, 0)
    assert "reference_logps" not in batch and obj.units(batch) == 2
    lm = PreferenceLM(model, obj)
    calls = []
    real = lm.reference_logps
    lm.reference_logps = lambda *a, **k: calls.append(1) or real(*a, **k)
    total, units = lm(**device_batch(batch))
    assert calls == ([] if precomputed else [1])
    assert int(units) == 2 and set(lm.last_figures) == {"replay_nll"}
    nll = [mean_token_nll(model, r) for r in replay]
    assert float(total.detach()) == pytest.approx(sum(nll), abs=1e-4)


def test_a_dpo_run_trains_its_replay_rows_and_logs_their_loss(tokenizer, tmp_path):
    cfg = TrainConfig(objective="dpo", max_steps=4, batch_size=4, lr=1e-2, log_every=1)
    rows = make_pairs(6, seed=13) + replay_rows_for(seed=14, n=2)
    result = train(lora(tokenizer, moved=False), tokenizer, rows, cfg, tmp_path)
    assert all(math.isfinite(x) for x in result.losses)
    steps = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert steps[-1]["pairs"] == 16  # units: pairs and replay rows, 4 a step
    assert any("replay_nll" in r for r in steps)


def test_pairs_are_length_grouped_by_their_padded_width():
    """A pair's two sequences are padded to its prompt plus its longer reply, so pairs are
    grouped by that width, not by their total tokens: two pairs of 110 tokens (one with a
    90-token reply, one with two of 50) do not share a batch when two narrower pairs exist."""
    from instill.data.dataset import length_grouped_batches
    from instill.data.preference_tokens import PairRow

    def pair(chosen: int, rejected: int, name: str) -> PairRow:
        return PairRow([1] * 10, [2] * chosen, [1] * chosen, [3] * rejected, [1] * rejected, name)

    rows = [pair(10, 90, "a"), pair(50, 50, "b"), pair(55, 55, "c"), pair(10, 100, "d")]
    assert [r.tokens for r in rows] == [110, 110, 120, 120]
    assert [r.width for r in rows] == [100, 60, 65, 110]
    for seed in range(4):
        batches = length_grouped_batches(rows, 2, seed)
        grouped = sorted(sorted(rows[i].source for i in b) for b in batches)
        assert grouped == [["a", "d"], ["b", "c"]]
    widths = [max(rows[i].width for i in b) for b in length_grouped_batches(rows, 2, 0)]
    # 4 sequences a batch: 4 x (65 + 110) positions, where grouping by tokens gave 4 x (100 + 110)
    assert 4 * sum(widths) == 700


def test_precomputed_reference_is_scored_under_the_training_autocast(tokenizer, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    """With train.autocast: bf16, the reference log-probs precomputed before training are the
    ones the policy computes under that autocast before its first step (so DPO's margins start
    at 0), not the float32 ones."""
    from types import SimpleNamespace

    from instill.train.loop import _precompute

    monkeypatch.setenv("INSTILL_HOME", str(tmp_path))  # an empty reference cache
    rows = make_pairs(4, seed=3)
    model = lora(tokenizer, moved=False)  # B = 0: the policy is its reference
    process = SimpleNamespace(is_main_process=False, device=torch.device("cpu"))
    scored = {}
    for mode in ("fp32", "bf16"):
        cfg = TrainConfig(objective="dpo", batch_size=4, autocast=mode)
        pre, _ = _precompute(model, make_objective(cfg), rows, None,
                             SimpleNamespace(pad_token_id=0), cfg, process)  # fmt: skip
        scored[mode] = torch.tensor([r.reference for r in pre], dtype=torch.float64)
    obj = objective()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        batch = device_batch(obj.collate(rows, 0))
        live = PreferenceLM(model, obj).reference_logps(
            batch["input_ids"], batch["labels"], batch["attention_mask"]
        )
    live = torch.stack([live[:4], live[4:]], dim=1).double()
    assert torch.allclose(scored["bf16"], live, atol=1e-5, rtol=0)
    assert not torch.allclose(scored["fp32"], live, atol=1e-3, rtol=0)  # the control


@pytest.mark.parametrize(
    "name,knobs",
    [("dpo", {}), ("dpo", {"loss_type": "ipo"}), ("dpo", {"loss_type": "hinge"}),
     ("dpo", {"sft_weight": 1.0, "label_smoothing": 0.1}), ("simpo", {}), ("orpo", {}),
     ("kto", {})],
)  # fmt: skip
def test_every_method_trains_and_logs_its_figures(tokenizer, tmp_path, name, knobs):
    from instill.data.preference_tokens import LabelledRow

    rows = make_pairs(8, seed=7)
    if name == "kto":
        rows = [
            LabelledRow(r.prompt_ids, ids, mask, good, r.source)
            for r in rows
            for ids, mask, good in ((r.chosen_ids, r.chosen_mask, True),
                                    (r.rejected_ids, r.rejected_mask, False))
        ]  # fmt: skip
    cfg = TrainConfig(objective=name, preference=PreferenceConfig(**knobs), max_steps=3,
                      batch_size=4, lr=1e-2, log_every=1)  # fmt: skip
    model = lora(tokenizer, moved=False)
    result = train(model, tokenizer, rows, cfg, tmp_path, validation=rows[:4])
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    units = "rows" if name == "kto" else "pairs"
    assert [r[units] for r in steps] == [4, 8, 12]
    for key in ("chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp"):
        assert all(key in r for r in steps), key
    assert "val_chosen_logp" in records[-1]
    if name == "dpo" and not knobs:
        assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert steps[-1]["margin"] > 0  # it learnt to prefer the chosen replies


@pytest.mark.parametrize("name", ["dpo", "simpo", "kto"])
def test_packed_pairs_score_and_train_as_padded_ones(tokenizer, name):
    """data.packing for a preference objective: a micro-batch's sequences share rows with no
    padding between them, and the loss, figures and gradients equal the padded batch's."""
    from instill.data.preference_tokens import LabelledRow

    rows = make_pairs(6, seed=5)
    if name == "kto":
        rows = [LabelledRow(r.prompt_ids, r.chosen_ids, r.chosen_mask, i % 2 == 0, r.source)
                for i, r in enumerate(rows)]  # fmt: skip
    padded, packed = objective(name), objective(name)
    packed.pack_length = 40
    a, b = padded.collate(rows, 0), packed.collate(rows, 0)
    assert b["input_ids"].shape[0] < a["input_ids"].shape[0] and b["input_ids"].shape[1] <= 40
    assert int(b["real_tokens"]) == int(a["real_tokens"])
    assert (b["sequence_index"] >= 0).sum() == a["attention_mask"].sum()  # padding: the end only
    assert packed.units(b) == padded.units(a) == 6
    out = []
    for obj, batch in ((padded, a), (packed, b)):
        model = lora(tokenizer)
        lm = PreferenceLM(model, obj)
        loss, _ = lm(**device_batch(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out.append((float(loss.detach()), lm.last_figures, grads))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-5)
    for key, (total, n) in out[0][1].items():
        assert out[1][1][key][1] == n and out[1][1][key][0] == pytest.approx(total, abs=1e-4), key
    for n, g in out[0][2].items():
        torch.testing.assert_close(out[1][2][n], g, rtol=1e-4, atol=1e-6)


def test_a_packed_dpo_run_equals_a_padded_one(tokenizer, tmp_path):
    cfg = TrainConfig(objective="dpo", max_steps=3, batch_size=4, lr=1e-2, log_every=1)
    results, starts = [], []
    for pack in (None, 48):
        model = lora(tokenizer, moved=False)
        starts.append({n: p.detach().clone() for n, p in model.named_parameters()
                       if p.requires_grad})  # fmt: skip
        run = tmp_path / str(pack)
        results.append(train(model, tokenizer, make_pairs(12, seed=3), cfg, run, pack_length=pack))
        results[-1].params = {n: p.detach().clone() for n, p in model.named_parameters()
                              if p.requires_grad}  # fmt: skip
    padded, packed = results
    assert packed.losses == pytest.approx(padded.losses, rel=1e-5)
    assert packed.tokens == padded.tokens
    assert all(torch.equal(starts[1][n], p) for n, p in starts[0].items())  # one start
    assert_same_weights(packed.params, padded.params, starts[0])


def test_a_nan_loss_stops_the_run_naming_step_and_rows(tokenizer, tmp_path, monkeypatch):
    from instill.train.objective import Preference

    calls = [0]
    real = Preference.loss

    def poisoned(self, *args):
        losses, figures = real(self, *args)
        calls[0] += 1
        return (losses * float("nan") if calls[0] == 2 else losses), figures

    monkeypatch.setattr(Preference, "loss", poisoned)
    cfg = TrainConfig(objective="dpo", max_steps=4, batch_size=2, save_every=1, lr=1e-2)
    with pytest.raises(InstillError, match=r"loss is nan at step 2 \(rows: p:\d+, p:\d+\)") as e:
        train(lora(tokenizer, moved=False), tokenizer, make_pairs(8), cfg, tmp_path)
    assert "checkpoints" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1"]


def test_resume_of_a_dpo_run_is_exact(default_source, tmp_path):
    common = dict(method="lora", objective="dpo", steps=4, validation=True, eval_every=2)
    whole = run(default_source.path, 2, run_dir=str(tmp_path / "whole"), **common)
    cut = run(default_source.path, 2, run_dir=str(tmp_path / "cut"), stop_at=2, **common)
    assert cut["interrupted"] and cut["steps"] == 2
    step = str(tmp_path / "cut" / "checkpoints" / "step-2")
    resumed = run(default_source.path, 2, run_dir=str(tmp_path / "cut"), resume=step, **common)
    assert resumed["losses"] == whole["losses"]
    for name, value in whole["params"].items():
        assert torch.equal(resumed["params"][name], value), name


@pytest.mark.slow
@pytest.mark.parametrize(
    "shard,method", [("none", "lora"), ("fsdp", "lora"), ("fsdp", "full")],
    ids=["ddp-lora", "fsdp-lora", "fsdp-full"],
)  # fmt: skip
def test_two_processes_train_dpo_as_one(default_source, tmp_path, shard, method):
    """The loss divided by the global pair count: 2 processes at 2 pairs each train as 1 at 4,
    with validation pairs scored in shares; FSDP runs the reference forward (adapters off, or
    the frozen copy) on every process, every micro-batch."""
    from dist import assert_same_training, load, run_worker

    out = tmp_path / "dpo.json"
    options = {"method": method, "objective": "dpo", "shard": shard, "steps": 3,
               "validation": True, "eval_every": 3}  # fmt: skip
    run_worker(default_source.path, out, [{"out": str(out), **options}])
    two, one = load(out), run(default_source.path, 4, **options)
    assert_same_training(two, one, min_tensors=8)
    assert two["val_losses"][0][1] == pytest.approx(one["val_losses"][0][1], abs=1e-5)


# --- recipes ---------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pair_file(path: Path, prompts: int = 6, per_prompt: int = 3) -> Path:
    rows = [
        {"prompt": f"Name a colour, please ({p}).", "chosen": f"Blue {k}.",
         "rejected": f"I am not sure, maybe green {k} or something else entirely."}
        for p in range(prompts)
        for k in range(per_prompt)
    ]  # fmt: skip
    return write_jsonl(path, rows)


def preference_recipe(tiny_dir, out, *extra):
    from instill.config import load_recipe

    return load_recipe(
        None,
        [
            "name=pref", f"model.name={tiny_dir}", f"train.output_dir={out}",
            "train.objective=dpo", "train.max_steps=2", "train.batch_size=2",
            "data.max_length=64", "eval.suites=[]", *extra,
        ],
    )  # fmt: skip


def test_validation_holds_out_whole_prompts(tokenizer, tmp_path):
    from instill.config import DataConfig
    from instill.data.preference_data import build_preference_data

    path = pair_file(tmp_path / "p.jsonl", prompts=10, per_prompt=3)
    cfg = DataConfig(sources=[{"path": str(path)}], validation=0.2, max_length=64)
    data = build_preference_data(tokenizer, cfg, "dpo")
    assert len(data.validation) == 6 and len(data.train) == 24  # 2 prompts of 10, 3 pairs each
    held = {tuple(r.prompt_ids) for r in data.validation}
    assert len(held) == 2 and not held & {tuple(r.prompt_ids) for r in data.train}
    kto = build_preference_data(tokenizer, cfg, "kto")  # each pair: two labelled rows
    assert len(kto.train) == 48 and sum(r.desirable for r in kto.train) == 24


@pytest.mark.parametrize("validation", ["fraction", "file"])
def test_kto_from_pairs_keeps_its_held_out_prompts_pairs(tokenizer, tmp_path, validation):
    """kto trains on each pair as two labelled rows; its validation prompts' pairs are kept as
    pairs too (Data.validation_pairs), on the same prompts as its labelled validation rows and
    on none of its training rows'. A pair method's are its validation rows themselves."""
    from instill.config import DataConfig
    from instill.data.preference_data import build_preference_data
    from instill.data.preference_tokens import PairRow

    path = pair_file(tmp_path / "p.jsonl", prompts=10, per_prompt=3)
    held = 0.2
    if validation == "file":
        held = str(pair_file(tmp_path / "v.jsonl", prompts=2, per_prompt=3))
    cfg = DataConfig(sources=[{"path": str(path)}], validation=held, max_length=64)
    data = build_preference_data(tokenizer, cfg, "kto")
    pairs = data.validation_pairs
    assert len(pairs) == 6 and all(isinstance(r, PairRow) for r in pairs)
    assert len(data.validation) == 12  # the same pairs' replies, labelled: kto's validation loss
    prompts = {tuple(r.prompt_ids) for r in pairs}
    assert prompts == {tuple(r.prompt_ids) for r in data.validation} and len(prompts) == 2
    if validation == "fraction":
        assert len(data.train) == 48 and not prompts & {tuple(r.prompt_ids) for r in data.train}
        for pair in pairs:  # each pair's replies are among the labelled validation rows
            assert any(r.completion_ids == pair.chosen_ids and r.desirable
                       for r in data.validation)  # fmt: skip
            assert any(r.completion_ids == pair.rejected_ids and not r.desirable
                       for r in data.validation)  # fmt: skip
    dpo = build_preference_data(tokenizer, cfg, "dpo")
    assert dpo.validation_pairs is dpo.validation
    assert [r.prompt_ids for r in dpo.validation] == [r.prompt_ids for r in pairs]
    labelled = [{"prompt": f"Hi {p}", "completion": "Hello", "label": True} for p in range(5)]
    path = write_jsonl(tmp_path / "kto.jsonl", labelled)
    cfg = DataConfig(sources=[{"path": str(path)}], validation=0.4, max_length=64)
    data = build_preference_data(tokenizer, cfg, "kto")
    assert len(data.validation) == 2 and data.validation_pairs == []  # no pairs to score


@pytest.mark.parametrize(
    "extra,message",
    [
        (["data.builtin.train_per_family=4"], "data.builtin gives supervised rows"),
        (["data.replay=0.1", "train.kl_to_base=0.1"], "kl_to_base is a supervised run's"),
        (["train.kl_to_base=0.1"], "kl_to_base is a supervised run's"),
        (["train.objective=kto", "train.preference.precompute_reference=true"], "kto"),
        (["train.objective=simpo", "train.preference.loss_type=ipo"], "dpo only"),
    ],
)
def test_a_preference_recipe_refuses_what_it_cannot_train(tiny_dir, tmp_path, extra, message):
    path = pair_file(tmp_path / "p.jsonl")
    with pytest.raises(InstillError, match=message):
        preference_recipe(tiny_dir, tmp_path, f"data.sources=[{{path: {path}}}]", *extra)


def test_supervised_rows_in_a_preference_run_say_how_to_combine(tiny_dir, tmp_path):
    from instill.recipe import run_recipe

    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Hi", "completion": "Hello"}] * 4)
    recipe = preference_recipe(tiny_dir, tmp_path, f"data.sources=[{{path: {sft}}}]")
    with pytest.raises(InstillError, match=r"sft.jsonl:1: .*supervised row.*model.name: runs/"):
        run_recipe(recipe)
    assert not (tmp_path / "pref").exists()  # nothing half-made left behind


def test_labelled_rows_need_kto(tiny_dir, tmp_path):
    from instill.recipe import run_recipe

    rows = [{"prompt": "Hi", "completion": "Hello", "label": True}] * 4
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    recipe = preference_recipe(tiny_dir, tmp_path, f"data.sources=[{{path: {path}}}]")
    with pytest.raises(InstillError, match=r"kto.jsonl:1: a labelled row .* train.objective: kto"):
        run_recipe(recipe)


def test_dpo_from_a_supervised_run_chains_both_stages(tiny_recipe, tiny_dir, tmp_path):
    """Stage 2 starts from stage 1's tuned weights; its adapter names the stage-1 run as its
    base, and loads back (through that run) to the model that finished training."""
    from instill.models.load import load_for_inference
    from instill.recipe import run_recipe

    first = run_recipe(tiny_recipe(tmp_path, "name=sft", "train.max_steps=2", "eval.suites=[]",
                                   "eval.holdout_clusters=[]",
                                   "data.replay=null"))  # fmt: skip
    pairs = pair_file(tmp_path / "p.jsonl")
    recipe = preference_recipe(tmp_path / "sft", tmp_path, f"data.sources=[{{path: {pairs}}}]",
                               "train.lr=0.05")  # fmt: skip
    recipe = recipe.model_copy(
        update={"model": recipe.model.model_copy(update={"name": str(first.run_dir)})}
    )
    second = run_recipe(recipe)
    adapter = json.loads((second.run_dir / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(first.run_dir.resolve())
    record = json.loads((second.run_dir / "run.json").read_text())
    assert record["model"]["kind"] == "run"
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    reloaded = load_for_inference(str(second.run_dir)).model
    with torch.no_grad():
        expected = second.model.eval()(input_ids=ids).logits
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-4)
        stage1 = load_for_inference(str(first.run_dir)).model(input_ids=ids).logits
    assert not torch.allclose(stage1, expected, atol=1e-4)  # the second stage moved it


def test_data_inspect_reads_a_pair_file_as_pairs(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from instill.cli import app

    rows = [
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Hello there, how are you today?"},
        {"prompt": "Say bye.", "chosen": "Goodbye, and see you tomorrow!", "rejected": "Bye."},
        {"prompt": "Count.", "chosen": "1 2 3", "rejected": "one"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    result = CliRunner().invoke(
        app, ["data", "inspect", str(path), "--model", str(tiny_dir), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["objective"] == "dpo" and report["pairs"] == 3
    assert report["formats"] == {"pairs": 3}
    assert report["chosen_longer_share"] == pytest.approx(2 / 3, abs=1e-4)


def test_a_dpo_run_measures_its_held_out_pairs_before_and_after(tiny_dir, tmp_path):
    """eval/preference.json: the validation pairs (whole prompts) scored by the starting model
    and the tuned one, the implicit reward against the start; the report names the objective
    and the reference."""
    from instill.recipe import run_recipe

    pairs = pair_file(tmp_path / "p.jsonl", prompts=6, per_prompt=2)
    source = f"data.sources=[{{path: {pairs}}}]"
    recipe = preference_recipe(
        tiny_dir, tmp_path, source, "data.validation=0.34", "train.lr=0.05", "train.max_steps=4"
    )
    run = run_recipe(recipe)
    summary = json.loads((run.run_dir / "eval" / "preference.json").read_text())
    assert summary["n"] == 4 and summary["prompts"] == 2
    reward = summary["measures"]["reward_accuracy"]
    assert "start" not in reward and "delta" not in reward  # the start is the reference
    assert reward["model"]["value"] == 1.0  # 4 steps at a high rate learnt these prompts' style
    assert (run.run_dir / "eval" / "base" / "preference.json").is_file()
    report = (run.run_dir / "report.md").read_text()
    assert "Objective **dpo** (beta 0.1, loss sigmoid); reference: the starting model" in report
    assert "## Preference on held-out pairs" in report
    assert re.search(r"\| tokens trained on \| [\d,]+ \(8 pairs\) \|", report)  # 4 steps of 2
    from typer.testing import CliRunner

    from instill.cli import app

    shown = CliRunner().invoke(app, ["compare", str(run.run_dir), "--json"])
    assert shown.exit_code == 0, shown.output  # no suites: the pairs are the comparison
    assert json.loads(shown.output)["preference"]["measures"] == summary["measures"]


def _run_keeping_data(recipe, monkeypatch):
    """run_recipe(recipe), and the Data it built."""
    from instill import recipe as recipe_module

    built, real = [], recipe_module._build_data
    monkeypatch.setattr(recipe_module, "_build_data", lambda *a: built.append(real(*a)) or built[0])
    return recipe_module.run_recipe(recipe), built[0]


def test_a_kto_run_from_pairs_measures_its_held_out_pairs(tiny_dir, tmp_path, monkeypatch):
    """kto trained from a pair file: its held-out prompts' pairs are scored as a dpo run's are
    (eval/preference.json, the reference the starting model), in the report and compare; none
    of their prompts is trained on."""
    from typer.testing import CliRunner

    from instill.cli import app
    from instill.eval.preference import _prompt_key, read_preference

    pairs = pair_file(tmp_path / "p.jsonl", prompts=6, per_prompt=2)
    recipe = preference_recipe(
        tiny_dir, tmp_path, f"data.sources=[{{path: {pairs}}}]", "train.objective=kto",
        "data.validation=0.34", "train.lr=0.05", "train.max_steps=4",
    )  # fmt: skip
    run, data = _run_keeping_data(recipe, monkeypatch)
    summary, records = read_preference(run.run_dir / "eval")
    assert summary["n"] == len(records) == 4 and summary["prompts"] == 2  # 2 prompts of 6, 2 each
    assert len(data.validation) == 8  # kto's validation loss: the same pairs' replies, labelled
    lines = {int(r["source"].rsplit(":", 1)[1]) for r in records}
    held = {(line - 1) // 2 for line in lines}  # pair_file: prompt p on lines 2p+1, 2p+2
    assert len(held) == 2 and lines == {2 * p + k for p in held for k in (1, 2)}
    trained = {_prompt_key(r) for r in data.train}
    assert {r["prompt"] for r in records} == {_prompt_key(r) for r in data.validation}
    assert not {r["prompt"] for r in records} & trained and len(trained) == 4
    assert summary["reference"].startswith("the starting model")
    reward = summary["measures"]["reward_accuracy"]
    assert "start" not in reward and "delta" not in reward  # the start is the reference
    assert "start" in summary["measures"]["ln_accuracy"]  # before and after
    assert (run.run_dir / "eval" / "base" / "preference.json").is_file()
    report = (run.run_dir / "report.md").read_text()
    assert "Objective **kto**" in report and "## Preference on held-out pairs" in report
    shown = CliRunner().invoke(app, ["compare", str(run.run_dir), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["preference"]["measures"] == summary["measures"]


def test_a_kto_run_from_labelled_rows_claims_no_held_out_pairs(tiny_dir, tmp_path):
    from instill.recipe import run_recipe

    rows = [{"prompt": f"Say a word ({p}).", "completion": w, "label": w == "Blue."}
            for p in range(6) for w in ("Blue.", "I do not know any words at all.")]  # fmt: skip
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    recipe = preference_recipe(
        tiny_dir, tmp_path, f"data.sources=[{{path: {path}}}]", "train.objective=kto",
        "data.validation=0.34",
    )  # fmt: skip
    run = run_recipe(recipe)
    assert list((run.run_dir / "eval").rglob("preference.json*")) == []
    assert json.loads((run.run_dir / "data_stats.json").read_text())["validation_rows"] == 4
    report = (run.run_dir / "report.md").read_text()
    assert "Objective **kto**" in report and "held-out pairs" not in report


def test_a_packed_preference_recipe_runs_and_records_its_packing(tiny_dir, tmp_path):
    from instill.recipe import run_recipe

    pairs = pair_file(tmp_path / "p.jsonl", prompts=4, per_prompt=2)
    recipe = preference_recipe(
        tiny_dir, tmp_path, f"data.sources=[{{path: {pairs}}}]", "data.packing=true"
    )
    run = run_recipe(recipe)
    record = json.loads((run.run_dir / "run.json").read_text())
    assert record["train"]["steps"] == 2
    # packing is per micro-batch for pairs: no whole-data efficiency to report
    assert record["packing_efficiency"] is None


def test_a_dpo_recipe_with_replay_mixes_the_starts_replies_into_its_pairs(
    tiny_dir, tmp_path, tokenizer, monkeypatch
):
    from instill.infer.generate import Generation
    from instill.recipe import run_recipe

    # the random tiny model writes only newlines (no replay row); every reply is these words
    words = tokenizer("A reply of a few words.", add_special_tokens=False)["input_ids"]
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    monkeypatch.setattr(
        "instill.infer.generate",
        lambda model, tok, convs, *a, **k: [
            Generation("A reply of a few words.", 1, len(words), "stop", (*words, eot))
            for _ in convs
        ],
    )
    monkeypatch.setenv("INSTILL_HOME", str(tmp_path / "home"))
    pairs = pair_file(tmp_path / "p.jsonl", prompts=4, per_prompt=2)
    recipe = preference_recipe(
        tiny_dir, tmp_path, f"data.sources=[{{path: {pairs}}}]", "data.max_length=256",
        "data.replay={fraction: 0.25, max_new_tokens: 8}", "train.max_steps=3",
        "train.log_every=1",
    )  # fmt: skip
    run = run_recipe(recipe)
    stats = json.loads((run.run_dir / "data_stats.json").read_text())
    assert stats["replay_rows"] == 3  # 0.25 of 8 pairs + 3 replay rows
    records = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("replay_nll" in r for r in records if "loss" in r)
    report = (run.run_dir / "report.md").read_text()
    assert re.search(r"\| tokens trained on \| [\d,]+ \(6 pairs, a replay row counted as one\)",
                     report)  # fmt: skip


def test_precomputed_reference_is_cached_by_model_and_pairs(tokenizer, tmp_path, monkeypatch):
    """A second run on the same start and pairs reads the reference log-probs instead of
    scoring them, and trains the same; other weights miss the cache."""
    from instill.train import objective as objective_module

    monkeypatch.setenv("INSTILL_HOME", str(tmp_path / "home"))
    cfg = TrainConfig(objective="dpo", max_steps=2, batch_size=2, lr=1e-2,
                      preference=PreferenceConfig(precompute_reference=True))  # fmt: skip
    rows = make_pairs(4, seed=8)
    first = train(lora(tokenizer, moved=False), tokenizer, rows, cfg, None)
    assert len(list((tmp_path / "home" / "reference-cache").glob("*.npy"))) == 1
    scored = []
    real = objective_module.precompute_reference
    monkeypatch.setattr(objective_module, "precompute_reference",
                        lambda *a, **k: scored.append(1) or real(*a, **k))  # fmt: skip
    second = train(lora(tokenizer, moved=False), tokenizer, rows, cfg, None)
    assert scored == [] and second.losses == first.losses
    train(lora(tokenizer, seed=3, moved=False), tokenizer, rows, cfg, None)  # other weights
    assert scored == [1]


def test_same_weights_allows_adams_isolated_flips_not_a_moved_tensor():
    """assert_same_weights' own check: a few elements off by an AdamW-sized step pass, a whole
    tensor off by a small fraction of its movement does not (the weight comparison above
    depends on it)."""
    g = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(32, 32, generator=g)}
    b = {"w": start["w"] + 0.01 * torch.randn(32, 32, generator=g)}  # trained: moved ~0.32
    flips = b["w"].clone()
    flips.view(-1)[[3, 200, 511, 700, 1000]] += 1.6e-4  # five elements of 1024, as seen
    assert_same_weights({"w": flips}, b, start)
    whole = {"w": b["w"] + 1e-2 * (b["w"] - start["w"])}  # every element, 1% of its movement
    with pytest.raises(AssertionError):
        assert_same_weights(whole, b, start)
    many = b["w"].clone()
    many.view(-1)[:100] += 1e-3  # ~10% of the elements off: not rounding flips
    with pytest.raises(AssertionError):
        assert_same_weights({"w": many}, b, start)
