"""The loop on a tiny model: it learns, logs, checkpoints atomically, saves a reloadable final/."""

import json
import math

import pytest
import torch

from instill.config import AdapterConfig, TrainConfig
from instill.errors import InstillError
from instill.models import attach_adapter
from instill.train import train
from instill.train.checkpoint import complete_checkpoints, save_model_dir


@pytest.fixture(scope="module")
def rows(builtin_data):
    data = builtin_data(2)
    rows, stats = data.train, data.stats
    assert stats.rows == 4 and stats.trained_tokens > 0
    return rows


# A random tiny model: full fine-tuning memorises 4 rows fast; rank-8 adapters on a 64-dim
# model with random embeddings move the loss less, but steadily.
@pytest.mark.parametrize(("method", "lr", "ratio"), [("lora", 1e-2, 0.97), ("full", 3e-2, 0.5)])
def test_loss_falls_and_metrics_are_written(tiny, tokenizer, rows, tmp_path, method, lr, ratio):
    model, report = attach_adapter(tiny, AdapterConfig(method=method, r=8))
    assert 0 < report.trainable <= report.total
    assert (report.trainable == report.total) == (method == "full")
    cfg = TrainConfig(lr=lr, max_steps=12, batch_size=4, log_every=4, warmup_ratio=0)
    result = train(model, tokenizer, rows, cfg, tmp_path)
    assert result.steps == 12
    assert result.losses[-1] < ratio * result.losses[0]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    assert records[-1]["tokens"] == result.tokens > 0
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in records)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))  # tensorboard installed


def test_lora_final_reloads_with_plain_peft(tiny, tokenizer, rows, tmp_path, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from instill.models import load_for_inference

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model, _ = attach_adapter(base, AdapterConfig(r=4))
    train(model, tokenizer, rows, TrainConfig(lr=1e-2, max_steps=3, batch_size=2), None)
    save_model_dir(model, tokenizer, tmp_path / "final")
    ids = torch.tensor([rows[0].input_ids])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "final"
        ).eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        merged = load_for_inference(str(tmp_path / "final")).model  # instill's own loader merges
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "final" / "chat_template.jinja").is_file()


def test_periodic_checkpoints_are_complete_and_pruned(tiny, tokenizer, rows, tmp_path):
    model, _ = attach_adapter(tiny, AdapterConfig(r=4))
    cfg = TrainConfig(max_steps=7, batch_size=2, save_every=2, keep_checkpoints=2)
    train(model, tokenizer, rows, cfg, tmp_path)
    kept = complete_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in kept] == ["step-4", "step-6"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    state = torch.load(kept[-1] / "trainer_state.pt", weights_only=True)
    assert state["step"] == 6 and "optimizer" in state


def test_interrupted_checkpoint_write_leaves_nothing_complete(tiny, tokenizer, tmp_path):
    class Boom(RuntimeError):
        pass

    class BadTokenizer:
        def save_pretrained(self, path):
            raise Boom("disk full")

    with pytest.raises(Boom):
        save_model_dir(tiny, BadTokenizer(), tmp_path / "checkpoints" / "step-1")
    assert complete_checkpoints(tmp_path / "checkpoints") == []
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_target_module_that_matches_nothing_lists_real_names(tiny):
    with pytest.raises(InstillError, match=r"\['qkv'\] match no linear module.*q_proj"):
        attach_adapter(tiny, AdapterConfig(target_modules=["qkv"]))


def test_validation_loss_is_logged_every_n_steps_and_at_the_end(tiny, tokenizer, rows, tmp_path):
    from instill.train.loop import validation_loss

    model, _ = attach_adapter(tiny, AdapterConfig(method="full"))
    before = validation_loss(model, rows[:2], 2, tokenizer.pad_token_id)
    cfg = TrainConfig(lr=3e-2, max_steps=5, batch_size=2, eval_every=2, warmup_ratio=0)
    result = train(model, tokenizer, rows, cfg, tmp_path, validation=rows[:2])
    assert [s for s, _ in result.val_losses] == [2, 4, 5]
    assert result.val_losses[-1][1] < before
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "val_loss" in r] == [2, 4, 5]


@pytest.mark.parametrize("method", ["lora", "full", "full-bf16"])
def test_resume_mid_epoch_reproduces_the_uninterrupted_run(tokenizer, rows, tmp_path, method):
    """full-bf16: the checkpoint holds the float32 master weights, so resuming a mixed-precision
    run is exact too."""
    from conftest import build_tiny as tiny_fp32

    dtype = torch.bfloat16 if method.endswith("bf16") else torch.float32
    method = method.removesuffix("-bf16")

    def build_tiny(tokenizer, seed=0):
        return tiny_fp32(tokenizer, seed).to(dtype)

    # 4 rows at batch 1 x 1: 4 steps an epoch; the checkpoint at step 3 is mid-epoch.
    cfg = TrainConfig(lr=1e-2, max_steps=6, batch_size=1, save_every=3, warmup_ratio=0.2)
    adapter = AdapterConfig(method=method, r=4, dropout=0.1)  # dropout: RNG state matters
    fingerprint = {"adapter": adapter.model_dump()}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole, _ = attach_adapter(build_tiny(tokenizer), adapter)
    uninterrupted = train(whole, tokenizer, rows, cfg, tmp_path / "a", fingerprint=fingerprint)
    checkpoint = tmp_path / "a" / "checkpoints" / "step-3"
    assert (checkpoint / ".complete").is_file()

    # Start from other weights wherever the checkpoint holds them: the whole model for full
    # fine-tuning; for LoRA the adapter (the base is the same pretrained model by definition).
    base = build_tiny(tokenizer, seed=1 if method == "full" else 0)
    torch.manual_seed(99)
    resumed_model, _ = attach_adapter(base, adapter)
    resumed = train(
        resumed_model,
        tokenizer,
        rows,
        cfg,
        tmp_path / "b",
        resume_from=checkpoint,
        fingerprint=fingerprint,
    )
    assert resumed.losses == uninterrupted.losses  # steps 1-3 restored, 4-6 recomputed
    assert resumed.tokens == uninterrupted.tokens
    for (name, a), (_, b) in zip(
        whole.named_parameters(), resumed_model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name


def test_resume_with_a_different_adapter_names_the_field(tokenizer, rows, tmp_path):
    from conftest import build_tiny

    cfg = TrainConfig(max_steps=2, batch_size=2, save_every=1)
    a = AdapterConfig(r=4)
    model, _ = attach_adapter(build_tiny(tokenizer), a)
    train(model, tokenizer, rows, cfg, tmp_path, fingerprint={"adapter": a.model_dump()})
    b = AdapterConfig(r=8)
    other, _ = attach_adapter(build_tiny(tokenizer), b)
    with pytest.raises(InstillError, match=r"adapter\.r: checkpoint has 4, this run has 8"):
        train(
            other,
            tokenizer,
            rows,
            cfg,
            None,
            resume_from=tmp_path / "checkpoints" / "step-1",
            fingerprint={"adapter": b.model_dump()},
        )


def test_early_stopping_and_best_selection(tiny, tokenizer, rows, tmp_path, monkeypatch):
    from instill.train import loop

    scripted = iter([5.0, 4.0, 4.5, 4.6, 4.7, 4.8])  # best at step 2, then worse
    snapshots = {}

    def fake_validation_loss(model, rows, batch_size, pad_id, acc=None, *rest):
        step = len(snapshots) + 1
        snapshots[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return next(scripted)

    monkeypatch.setattr(loop, "validation_loss", fake_validation_loss)
    model, _ = attach_adapter(tiny, AdapterConfig(method="full"))
    cfg = TrainConfig(
        lr=1e-2,
        max_steps=6,
        batch_size=2,
        eval_every=1,
        early_stopping_patience=2,
        select_best=True,
    )
    result = train(model, tokenizer, rows, cfg, tmp_path, validation=rows[:1])
    assert result.stopped_early and result.steps == 4
    assert result.best == (2, 4.0)
    assert (tmp_path / "checkpoints" / "best" / ".complete").is_file()
    for name, p in model.named_parameters():  # final weights are the step-2 weights
        assert torch.equal(p, snapshots[2][name]), name
    assert not all(torch.equal(p, snapshots[4][n]) for n, p in model.named_parameters())


def test_early_stopping_needs_a_validation_split():
    from instill.config import load_recipe

    with pytest.raises(InstillError, match="need a validation split: set data.validation"):
        load_recipe(None, ["train.early_stopping_patience=2"])


def test_sigkill_during_a_checkpoint_write_leaves_the_last_complete_one(tmp_path, tiny_dir):
    """A process killed (SIGKILL) half way through writing step-2 leaves step-1 as the last
    complete checkpoint, which is what resume=auto picks."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from instill.train.checkpoint import save_model_dir
        model = AutoModelForCausalLM.from_pretrained({str(tiny_dir)!r})
        tok = AutoTokenizer.from_pretrained({str(tiny_dir)!r})
        folder = Path({str(tmp_path)!r}) / "checkpoints"
        save_model_dir(model, tok, folder / "step-1")
        tok.save_pretrained = lambda path: os.kill(os.getpid(), signal.SIGKILL)  # mid-write
        save_model_dir(model, tok, folder / "step-2")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == -9
    folder = tmp_path / "checkpoints"
    assert not (folder / "step-2").exists()
    assert [p.name for p in complete_checkpoints(folder)] == ["step-1"]
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".step-2.tmp-")]
    assert len(leftovers) == 1  # the half-written folder is hidden and never counted


def test_an_evaluator_score_chooses_the_best_checkpoint(tiny, tokenizer, rows, tmp_path):
    """eval.during_training: the best checkpoint follows the score (higher is better), not the
    validation loss, which keeps falling here."""
    scripted = iter([0.2, 0.9, 0.4, 0.3, 0.1])  # best score at step 2
    snapshots = {}

    def evaluator(model):
        snapshots[len(snapshots) + 1] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return next(scripted)

    model, _ = attach_adapter(tiny, AdapterConfig(method="full"))
    cfg = TrainConfig(
        lr=3e-2, max_steps=5, batch_size=2, eval_every=1, select_best=True, warmup_ratio=0
    )
    result = train(model, tokenizer, rows, cfg, tmp_path, validation=rows[:2], evaluator=evaluator)
    assert result.best_score == (2, 0.9)
    assert result.best[0] != 2  # the validation loss alone would have chosen another step
    for name, p in model.named_parameters():  # final weights are the step-2 weights
        assert torch.equal(p, snapshots[2][name]), name
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_score"] for r in logged if "eval_score" in r] == [0.2, 0.9, 0.4, 0.3, 0.1]


def test_during_training_suite_must_be_evaluated_and_needs_eval_every():
    from instill.config import load_recipe

    with pytest.raises(InstillError, match="'general' is not one of eval.suites"):
        load_recipe(None, ["eval.during_training=general"])
    with pytest.raises(InstillError, match="set train.eval_every"):
        load_recipe(
            None,
            ["eval.during_training=builtin", "data.validation=0.1", "data.builtin.seed=0"],
        )


def test_partial_gradient_checkpointing_recomputes_only_chosen_layers(tokenizer, rows):
    from conftest import build_tiny

    from instill.train.loss import SupervisedLM
    from instill.train.memory import checkpointed_layers, enable_checkpointing

    assert checkpointed_layers(30, 1.0) == list(range(30))
    assert len(checkpointed_layers(30, 2 / 3)) == 20 and checkpointed_layers(3, 2 / 3) == [1, 2]
    assert checkpointed_layers(2, 0.5) == [1]
    assert TrainConfig(gradient_checkpointing="0.67").gradient_checkpointing == 0.67
    assert TrainConfig(gradient_checkpointing=1).gradient_checkpointing is True
    assert TrainConfig(gradient_checkpointing=0).gradient_checkpointing is False
    with pytest.raises(ValueError, match=r"fraction of layers must be in \(0, 1\]"):
        TrainConfig(gradient_checkpointing=1.5)
    losses, grads = {}, {}
    for setting in (False, True, 0.5):
        model, _ = attach_adapter(build_tiny(tokenizer), AdapterConfig(r=8, dropout=0.0))
        assert enable_checkpointing(model, setting) == {False: [], True: [0, 1], 0.5: [1]}[setting]
        model.train()
        layers = model.get_base_model().model.layers
        calls = [0] * len(layers)
        for i, layer in enumerate(layers):  # a recomputed layer runs its MLP twice per step
            layer.mlp.register_forward_hook(lambda *a, i=i, c=calls: c.__setitem__(i, c[i] + 1))
        ids = torch.tensor([rows[0].input_ids])
        labels = torch.where(torch.tensor([rows[0].mask]).bool(), ids, -100)
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):  # recompute whole layers
            loss, n = SupervisedLM(model)(input_ids=ids, labels=labels)
            (loss / n).backward()
        assert calls == {False: [1, 1], True: [2, 2], 0.5: [1, 2]}[setting]
        losses[setting] = loss.item()
        grads[setting] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    for setting in (True, 0.5):  # the same numbers, only memory and time differ
        assert losses[setting] == pytest.approx(losses[False], rel=1e-6)
        for a, b in zip(grads[setting], grads[False], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_mmap_threshold_is_the_configured_one(tiny, tokenizer, rows, monkeypatch):
    import instill.train.loop as loop

    seen = []
    monkeypatch.setattr(loop, "fix_mmap_threshold", lambda n: seen.append(n) or True)
    model, _ = attach_adapter(tiny, AdapterConfig(r=4))
    train(model, tokenizer, rows, TrainConfig(max_steps=1, mmap_threshold_mb=16), None)
    assert seen == [16 * 2**20]
    assert TrainConfig().mmap_threshold_mb * 2**20 == 64 * 1024  # the lean default
    with pytest.raises(ValueError, match="32"):
        TrainConfig(mmap_threshold_mb=64)  # above glibc's ceiling


def _bf16_full(tokenizer):
    from conftest import build_tiny

    tiny = build_tiny(tokenizer).to(torch.bfloat16)
    return attach_adapter(tiny, AdapterConfig(method="full"))[0]


def test_bf16_full_fine_tuning_keeps_float32_master_weights(tokenizer, rows):
    """A bf16 model, fully fine-tuned at a small learning rate: with float32 master weights
    under bf16 autocast (what train() does) most weights move; AdamW stepping the bf16 weights
    directly (the negative control: train() told the weights are not half precision, so it
    keeps no master copy and uses no autocast) leaves almost all of them where they were,
    since each update is below bf16's resolution. The trained model comes back in bf16."""
    from instill.train import loop

    cfg = TrainConfig(lr=1e-5, max_steps=30, batch_size=4, warmup_ratio=0, schedule="constant")
    moved = {}
    for kind in ("master", "pure"):
        model = _bf16_full(tokenizer)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        if kind == "master":
            result = train(model, tokenizer, rows, cfg, None)
        else:
            find, loop.low_precision = loop.low_precision, lambda model: None
            try:
                result = train(model, tokenizer, rows, cfg, None)
            finally:
                loop.low_precision = find
        assert result.steps == 30
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        changed = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
        moved[kind] = changed / sum(p.numel() for p in model.parameters())
    # (the weights that move without master copies are the few small enough for 1e-5 to count)
    assert moved["master"] > 0.9 and moved["pure"] < 0.3, moved


def test_autocast_bf16_trains_float32_weights_with_bf16_products(tokenizer, rows):
    """train.autocast: bf16 (what auto picks on a CPU with native bf16): training's linear layers
    put out bf16, while the weights and adapters stay float32 and the run records the autocast;
    the losses are near the float32 run's, not equal to them (the products were rounded)."""
    from conftest import build_tiny

    out = {}
    for mode in ("fp32", "bf16"):
        model = attach_adapter(build_tiny(tokenizer), AdapterConfig(r=4, alpha=8), seed=0)[0]
        seen: set = set()
        layer = model.get_base_model().model.layers[0].mlp.down_proj.base_layer
        hook = layer.register_forward_hook(lambda m, args, o, seen=seen: seen.add(o.dtype))
        cfg = TrainConfig(
            lr=1e-3, max_steps=3, batch_size=4, warmup_ratio=0, schedule="constant", autocast=mode
        )
        result = train(model, tokenizer, rows, cfg, None)
        hook.remove()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        out[mode] = (result, seen)
    assert out["fp32"][1] == {torch.float32}, out
    assert out["bf16"][1] == {torch.bfloat16}, out
    assert out["fp32"][0].autocast is None and out["bf16"][0].autocast == "bfloat16"
    assert out["bf16"][0].as_dict()["autocast"] == "bfloat16"
    plain, mixed = out["fp32"][0].losses, out["bf16"][0].losses
    assert plain != mixed
    assert all(abs(a - b) < 0.02 * a for a, b in zip(plain, mixed, strict=True)), (plain, mixed)


def test_autocast_auto_follows_the_cpu_and_half_weights_keep_their_own(tokenizer, monkeypatch):
    """auto: bf16 only on a CPU with native bf16 (INSTILL_CPU_BF16 stands in for the probe);
    weights stored in bf16 train under autocast to it whatever the setting; YAML's bare `off`
    reads as fp32."""
    from conftest import build_tiny

    from instill.config import load_recipe
    from instill.train.loop import autocast_dtype

    cpu = torch.device("cpu")
    model = attach_adapter(build_tiny(tokenizer), AdapterConfig(r=4, alpha=8))[0]
    auto = TrainConfig(autocast="auto")
    monkeypatch.setenv("INSTILL_CPU_BF16", "1")
    assert autocast_dtype(model, auto, cpu) == torch.bfloat16
    assert autocast_dtype(model, TrainConfig(), cpu) is None  # the default: fp32
    monkeypatch.setenv("INSTILL_CPU_BF16", "0")
    assert autocast_dtype(model, auto, cpu) is None
    assert autocast_dtype(model, TrainConfig(autocast="bf16"), cpu) == torch.bfloat16
    assert autocast_dtype(_bf16_full(tokenizer), TrainConfig(), cpu) == torch.bfloat16
    recipe = load_recipe(None, ["data.builtin.seed=0", "train.autocast=off"])
    assert recipe.train.autocast == "fp32"


def test_fp16_full_fine_tuning_trains_with_a_loss_scaler(tokenizer, rows):
    from conftest import build_tiny

    model = attach_adapter(build_tiny(tokenizer).half(), AdapterConfig(method="full"))[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(lr=1e-3, max_steps=6, batch_size=4, warmup_ratio=0, schedule="constant")
    result = train(model, tokenizer, rows, cfg, None)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert all(map(math.isfinite, result.losses)) and result.losses[-1] < result.losses[0]
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_accelerate_mixed_precision_must_agree_with_model_dtype(monkeypatch, tmp_path):
    from instill.config import load_recipe
    from instill.recipe import check_mixed_precision

    recipe = load_recipe(None, ["data.builtin.seed=0", "model.dtype=float32"])
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    check_mixed_precision(recipe)  # "no" leaves it to model.dtype
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(InstillError, match=r"mixed_precision: bf16 but model\.dtype float32 gives "
                       r"float32 weights on cpu; set mixed_precision: no"):  # fmt: skip
        check_mixed_precision(recipe)
    bf16 = load_recipe(None, ["data.builtin.seed=0", "model.dtype=bfloat16"])
    check_mixed_precision(bf16)  # agrees


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_sharded_accelerate_modes_are_refused(tokenizer, rows, kind):
    """Until instill gathers shards for its checkpoints and final/, FSDP and DeepSpeed are
    refused before any step (they would save one process's shard as the model)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from instill.train.loop import check_distributed

    with pytest.raises(InstillError, match=rf"accelerate's {kind} mode is not supported yet.*ddp"):
        check_distributed(SimpleNamespace(distributed_type=getattr(DistributedType, kind)))
    check_distributed(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_mid_training_closes_the_logs(tiny, tokenizer, rows, tmp_path, monkeypatch, error):
    """An exception (or a second Ctrl-C) at step 3: the TensorBoard writer that was open is
    closed, TensorBoard's thread hook is put back, and metrics.jsonl holds whole records of
    steps 1 and 2 only."""
    import threading

    from torch.utils.tensorboard import SummaryWriter

    from instill.jsonl import read_jsonl
    from instill.train import loop

    opened, closed = [], []
    real_init, real_close, real_accumulate = (
        SummaryWriter.__init__,
        SummaryWriter.close,
        loop.accumulate,
    )

    def init(self, *args, **kwargs):
        opened.append(self)
        real_init(self, *args, **kwargs)

    def close(self):
        closed.append(self)
        real_close(self)

    def accumulate(*args, **kwargs):
        if len(steps) == 2:
            raise error("stopped at step 3")
        steps.append(1)
        return real_accumulate(*args, **kwargs)

    steps: list[int] = []
    monkeypatch.setattr(SummaryWriter, "__init__", init)
    monkeypatch.setattr(SummaryWriter, "close", close)
    monkeypatch.setattr(loop, "accumulate", accumulate)
    hook = threading.excepthook
    model, _ = attach_adapter(tiny, AdapterConfig(r=4))
    cfg = TrainConfig(max_steps=5, batch_size=2, log_every=1)
    with pytest.raises(error, match="stopped at step 3"):
        train(model, tokenizer, rows, cfg, tmp_path)
    assert len(opened) == 1 and closed == opened  # the writer was open, and is closed
    assert threading.excepthook is hook
    text = (tmp_path / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
