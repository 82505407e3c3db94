"""train.compile: compiled decoder layers give the eager run's losses and weights, and leave an
eager model behind."""

import pytest
import torch
import torch._dynamo

from instill.config import AdapterConfig, TrainConfig
from instill.errors import InstillError
from instill.models import attach_adapter
from instill.train import train
from instill.train.compiled import decoder_layers
from tests.conftest import build_tiny
from tests.dist import assert_same_weights


@pytest.fixture(scope="module")
def rows(builtin_data):
    return builtin_data(4).train


def _run(tokenizer, rows, validation=None, dropout=0.0, **train_kw):
    model, _ = attach_adapter(build_tiny(tokenizer), AdapterConfig(r=8, dropout=dropout))
    model.start = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    cfg = TrainConfig(lr=1e-2, max_steps=4, batch_size=3, warmup_ratio=0, seed=3, **train_kw)
    result = train(model, tokenizer, rows, cfg, None, validation=validation)
    return model, result


def test_compiled_training_matches_eager(tokenizer, rows):
    """Same losses (per step), same validation loss and same adapter weights to fp32 rounding;
    length-grouped batches of several shapes share one graph; the layers are eager after."""

    validation = rows[:3]
    eager_model, eager = _run(tokenizer, rows, validation)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, compiled = _run(tokenizer, rows, validation, compile=True, gradient_checkpointing=True)
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4, abs=1e-5)
    assert compiled.val_losses[-1][1] == pytest.approx(eager.val_losses[-1][1], rel=1e-4)
    # per tensor, to 1e-3 of its movement (tests/dist.py says why not element by element: the
    # eager run shares its batches' start, train/loss.py shared_start, the compiled one cannot)
    assert all(torch.equal(v, eager_model.start[k]) for k, v in model.start.items())
    trained = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    theirs = {k: p.detach() for k, p in eager_model.named_parameters() if k in trained}
    assert_same_weights(trained, theirs, eager_model.start)
    # the batches had different lengths, yet one forward graph served every layer and step
    # (a frame compiled more than once would count more)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert len({tuple(b) for b in _batch_shapes(rows, 3)}) > 1
    # eager again after training: no compiled call left on any layer
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))


def test_compiled_dropout_replays_in_recomputation(tokenizer, rows):
    """Inductor draws its own dropout masks (so dropout runs cannot match eager), but gradient
    checkpointing must recompute a layer with the masks of its forward: the checkpointed
    compiled run equals the plain compiled run."""
    _, plain = _run(tokenizer, rows, dropout=0.1, compile=True)
    _, ckpt = _run(tokenizer, rows, dropout=0.1, compile=True, gradient_checkpointing=True)
    assert ckpt.losses == plain.losses
    _, no_dropout = _run(tokenizer, rows, compile=True)
    assert ckpt.losses[1:] != no_dropout.losses[1:]  # the masks did something


def test_eager_block_compiles_nothing(tokenizer):
    """Validation and in-training evaluation run under eager(): no graph is compiled for their
    no_grad calls (negative control: the same call outside the block compiles, and with a KV
    cache, as generation would use, more than once)."""
    from instill.train.compiled import compiled_layers, eager

    model = build_tiny(tokenizer)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with compiled_layers(model, True), torch.no_grad():
        with eager():
            model(input_ids=ids)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
        model(input_ids=ids)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


def _batch_shapes(rows, batch_size):
    from instill.data.dataset import length_grouped_batches

    for idx in length_grouped_batches(rows, batch_size, seed=3):
        yield (len(idx), max(len(rows[i].input_ids) for i in idx))


def test_compile_without_a_compiler_is_a_clear_error(tokenizer, rows):
    import torch._inductor.config as inductor_config

    model, _ = attach_adapter(build_tiny(tokenizer), AdapterConfig(r=4))
    with (
        inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",)}),
        pytest.raises(InstillError, match=r"train\.compile: .*C\+\+ compiler.*compile: false"),
    ):
        train(model, tokenizer, rows, TrainConfig(max_steps=1, compile=True), None)
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))


@pytest.mark.slow  # a whole run compiled by inductor (its worker processes): 11 min loaded
def test_shipped_lora_recipe_runs_compiled(tiny_recipe, tmp_path):
    """recipes/lora.yaml trains compiled and checkpointed, with validation and an in-training
    score between steps, and the run evaluates and saves as usual."""
    import json

    from instill.recipe import run_recipe

    recipe = tiny_recipe(
        tmp_path,
        "data.validation=0.25",
        "train.max_steps=3",
        "train.batch_size=2",
        "train.grad_accum=1",
        "train.eval_every=2",
        "eval.during_training=builtin",
        "eval.during_training_sample=2",
        "eval.max_new_tokens=4",
        "eval.general_gen_per_kind=1",
        "eval.gen_max_new_tokens=4",
        "data.replay.max_new_tokens=4",
        recipe="lora.yaml",  # recipes/ is a link to the packaged folder
    )
    assert recipe.train.compile and recipe.train.gradient_checkpointing is True
    summary = run_recipe(recipe)
    logged = [json.loads(x) for x in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval_score" in r] == [2, 3]
    assert [r["step"] for r in logged if "val_loss" in r] == [0, 2, 3]
    assert (summary.run_dir / "final" / "adapter_model.safetensors").is_file()
    assert json.loads((summary.run_dir / "eval" / "builtin.json").read_text())["n"] == 4
