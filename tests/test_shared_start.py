"""The batch's shared start run once (train/loss.py: shared_start): the same loss, gradients,
per-row scores and trained weights as running every row whole."""

import pytest
import torch

from instill.data.dataset import Row, collate
from instill.data.render import render_prompt
from instill.train import loss as loss_mod
from instill.train.loss import IGNORE, SupervisedLM, shared_start

QUESTIONS = ["What is 2+2?", "Name a colour.", "Say hi in French, please.", "Count to three."]
REPLIES = ["4", "Blue is a colour.", "Bonjour", "One, two, three."]


def chat_rows(tokenizer, n=4):
    """Rows rendered through the chat template: every one begins with the same system turn."""
    rows = []
    for q, a in zip(QUESTIONS[:n], REPLIES[:n], strict=True):
        head = render_prompt(tokenizer, [{"role": "user", "content": q}])
        reply = tokenizer.encode(a, add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append(Row(head + reply, [0] * len(head) + [1] * len(reply), "t"))
    return rows


def common_start(rows) -> int:
    n = 0
    while all(len(r.input_ids) > n and r.input_ids[n] == rows[0].input_ids[n] for r in rows):
        n += 1
    return n


def lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    m = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in m.named_parameters():  # LoRA's B starts at 0: give it weights to move
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return m.train()


def inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("real_tokens", "rows")}


def loss_and_grads(model, batch, share: bool):
    model.zero_grad()
    loss, n = SupervisedLM(model, share_start=share)(**inputs(batch))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), int(n), grads


def test_the_start_is_the_rows_common_unscored_tokens_less_one(tokenizer):
    rows = chat_rows(tokenizer)
    batch = collate(rows, pad_id=tokenizer.pad_token_id)
    common = common_start(rows)
    assert common > 20  # the system turn and the user header
    n = shared_start(batch["input_ids"], batch["labels"], batch["attention_mask"], None)
    assert n == common - 1  # position n - 1 must not predict a scored token: none does


def test_no_start_is_shared_where_a_row_cannot_share_it(tokenizer):
    rows = chat_rows(tokenizer)
    batch = collate(rows, pad_id=tokenizer.pad_token_id)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    args = (ids, labels, mask)
    other = ids.clone()
    other[2, 0] += 1  # one row begins otherwise
    assert shared_start(other, labels, mask, None) == 0
    assert shared_start(ids[:1], labels[:1], mask[:1], None) == 0  # one row: nothing to share
    assert shared_start(*args, torch.zeros_like(ids)) == 0  # packed rows (position ids)
    left = mask.clone()
    left[1, 0] = 0  # left padding
    assert shared_start(ids, labels, left, None) == 0
    scored = labels.clone()
    scored[0, 12] = ids[0, 12]  # a scored token inside the start cuts it before that token
    assert shared_start(ids, scored, mask, None) == 11
    scored[0, 5] = ids[0, 5]  # ... and below MIN_SHARED_START it is not worth a second call
    assert shared_start(ids, scored, mask, None) == 0
    assert (labels[:, : shared_start(*args, None) + 1] == IGNORE).all()


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_sharing_the_start_gives_the_same_loss_and_gradients(tokenizer, adapter):
    from tests.conftest import build_tiny

    model = build_tiny(tokenizer, tied=False).train()
    model = lora(model) if adapter else model
    batch = collate(chat_rows(tokenizer), pad_id=tokenizer.pad_token_id)
    calls = []
    body = loss_mod._parts(model)[0]
    hook = body.register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True
    )
    whole, n1, g1 = loss_and_grads(model, batch, share=False)
    assert len(calls) == 1 and calls[0] == batch["input_ids"].shape
    shared, n2, g2 = loss_and_grads(model, batch, share=True)
    hook.remove()
    start = shared_start(batch["input_ids"], batch["labels"], batch["attention_mask"], None)
    assert calls[1:] == [(1, start), (4, batch["input_ids"].shape[1] - start)]  # the path ran
    assert n1 == n2
    torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g2.keys() and g1
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6, msg=k)
    # negative control: the same check sees a change of one reply token
    other = collate(chat_rows(tokenizer), pad_id=tokenizer.pad_token_id)
    last = int(other["attention_mask"][0].sum()) - 2
    other["input_ids"][0, last] += 1
    moved, _, _ = loss_and_grads(model, other, share=True)
    assert abs(float(moved) - float(whole)) > 1e-3


def test_per_row_scores_are_the_same_with_the_start_shared(tokenizer):
    from tests.conftest import build_tiny

    model = build_tiny(tokenizer, tied=False)
    batch = collate(chat_rows(tokenizer), pad_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        a, ta = SupervisedLM(model, share_start=False)(**inputs(batch), per_row=True)
        b, tb = SupervisedLM(model, share_start=True)(**inputs(batch), per_row=True)
    assert tb.tolist() == ta.tolist() and min(ta.tolist()) > 0
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
