"""The training loop on a tiny Llama in N CPU processes (gloo): run by test_ddp.py and test_fsdp.py
under torchrun (tests/dist.py), and in-process for the one-process reference.

    python dist_worker.py TOKENIZER '[{"out": ..., **run() keywords}, ...]'

Records the losses, the first step's gradients (full tensors: after DDP's all-reduce, or gathered
from FSDP's shards), the final parameters of the caller's model (gathered back by the loop), the
share of every parameter one process held (FSDP), and the KL to base that metrics.jsonl logged;
and each process its own decisions (validation losses, best step, early stop) in OUT.rankN.
`broken` drops the process-count factor from the loss scale: the negative control the tests must
catch. `stop_at` asks the loop to stop after that step (as a signal would), which writes a
checkpoint; `resume` continues from one."""

import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator
from conftest import build_tiny
from safetensors.torch import save_file
from test_loss import make_rows


def make_pairs(n: int, seed: int = 0, vocab: int = 49152) -> list:
    """Random preference pairs of different lengths (each reply trained on every token)."""
    import random

    from instill.data.preference_tokens import PairRow

    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, vocab) for _ in range(k)]  # noqa: E731
    rows = []
    for i in range(n):
        chosen, rejected = ids(rng.randint(2, 12)), ids(rng.randint(2, 12))
        prompt = ids(rng.randint(3, 16))
        rows.append(
            PairRow(prompt, chosen, [1] * len(chosen), rejected, [1] * len(rejected), f"p:{i}")
        )
    return rows


def replay_rows(rows: list, global_batch: int, seed: int) -> list:
    """`rows` with some marked as replay (train.kl_to_base): with 2 processes at batch 1 (or 1 at
    batch 2), step 1's replay row goes to rank 1 alone, step 2 has one on each rank, step 3 one
    on rank 0 alone, and step 4 none (the Batcher deals global batch b out as b[rank::world])."""
    from instill.data.dataset import length_grouped_batches

    assert global_batch == 2
    b = length_grouped_batches(rows, global_batch, seed)
    marked = {b[0][1], b[1][0], b[1][1], b[2][0]}
    return [replace(row, replay=i in marked) for i, row in enumerate(rows)]


def run(
    tokenizer_path: str,
    per_device: int,
    out: str | None = None,
    method: str = "full",
    shard: str = "none",
    steps: int = 3,
    compile: bool = False,
    broken: bool = False,
    validation: bool = False,
    rank_validation: bool = False,
    eval_every: int | None = None,
    patience: int | None = None,
    kl: float = 0.0,
    lr: float = 1e-2,
    run_dir: str | None = None,
    stop_at: int | None = None,
    resume: str | None = None,
    objective: str = "sft",
) -> dict:
    """One training run. `validation`: 4 validation rows (`rank_validation`: different ones on
    each process, as processes whose validation losses disagree); `kl`: train.kl_to_base, with
    the replay rows of replay_rows()."""
    from instill.config import AdapterConfig, ModelConfig, TrainConfig
    from instill.models import attach_adapter, load_tokenizer
    from instill.train import loop, train
    from instill.train import shard as sharding

    tokenizer = load_tokenizer(tokenizer_path, ModelConfig(name=tokenizer_path))
    model, _ = attach_adapter(build_tiny(tokenizer), AdapterConfig(method=method))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    made: list = []  # the Sharded twin, when the loop makes one
    fractions: dict[str, float] = {}
    grads: dict[str, torch.Tensor] = {}

    class Recorded(sharding.Sharded):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)
            fractions.update(self.local_fraction())

    def first_grads(optimizer, args, kwargs):
        if grads:
            return
        source = made[0].twin if made else model
        names = {id(p): n for n, p in source.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                g = p.grad.detach()
                grads[names[id(p)]] = (g.full_tensor() if hasattr(g, "full_tensor") else g).clone()

    make = loop.make_optimizer

    def recording(*args, **kwargs):
        optimizer = make(*args, **kwargs)
        optimizer.register_step_pre_hook(first_grads)
        return optimizer

    original = (loop.make_optimizer, loop.loss_scale, loop._any, sharding.Sharded)
    loop.make_optimizer, sharding.Sharded = recording, Recorded
    if broken:
        loop.loss_scale = lambda acc, tokens: 1 / max(tokens, 1)
    if stop_at is not None:
        any_of = loop._any
        calls = [0]

        def stopping(acc, flag):  # the loop asks once per step whether any process was signalled
            calls[0] += 1
            return any_of(acc, flag or calls[0] == stop_at)

        loop._any = stopping
    cfg = TrainConfig(
        lr=lr, max_steps=steps, batch_size=per_device, warmup_ratio=0, compile=compile,
        shard=shard, eval_every=eval_every, early_stopping_patience=patience, kl_to_base=kl,
        log_every=1, objective=objective,
        max_grad_norm=None if method == "full" else 1.0,  # the recorded gradients are raw; the
        gradient_checkpointing=method == "lora",  # LoRA runs clip, and recompute each layer
    )  # fmt: skip
    acc = Accelerator(cpu=True)
    rows = make_rows(12, seed=5) if objective == "sft" else make_pairs(12, seed=5)
    if kl:
        rows = replay_rows(rows, per_device * acc.num_processes, cfg.seed)
    held_out = None
    if validation:
        seed = 9 + (acc.process_index if rank_validation else 0)
        held_out = make_rows(4, seed=seed) if objective == "sft" else make_pairs(4, seed=seed)
    try:
        result = train(
            model, tokenizer, rows, cfg, Path(run_dir) if run_dir else None, accelerator=acc,
            resume_from=Path(resume) if resume else None, validation=held_out,
        )  # fmt: skip
    finally:
        loop.make_optimizer, loop.loss_scale, loop._any, sharding.Sharded = original
    params = {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}
    decisions = {
        "val_losses": result.val_losses,
        "best": result.best,
        "stopped_early": result.stopped_early,
        "steps": result.steps,
    }
    record = {
        **decisions,
        "world": acc.num_processes,
        "losses": result.losses,
        "tokens": result.tokens,
        "interrupted": result.interrupted,
        "fractions": fractions,
        "kl": logged_kl(run_dir) if run_dir and acc.is_main_process else None,
    }
    if out:
        Path(f"{out}.rank{acc.process_index}").write_text(json.dumps(decisions))
    if out and acc.is_main_process:
        Path(out).write_text(json.dumps(record))
        save_file(params, out + ".params.safetensors")
        if grads:
            save_file(grads, out + ".grads.safetensors")
    return {**record, "params": params, "grads": grads, "start": start}


def logged_kl(run_dir: str) -> dict[int, float]:
    """{step: kl_to_base} of the training records in run_dir's metrics.jsonl."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["kl_to_base"] for r in map(json.loads, lines) if "kl_to_base" in r}


def resume_runs(tokenizer_path: str, out: str) -> None:
    """Sharded: uninterrupted; stopped after step 2; resumed from that stop's checkpoint."""
    common = dict(shard="fsdp", steps=4, validation=True, eval_every=2)
    run(tokenizer_path, 2, out + ".whole", run_dir=out + ".whole.run", **common)
    run(tokenizer_path, 2, out + ".cut", run_dir=out + ".cut.run", stop_at=2, **common)
    if os.environ.get("RANK") == "0":  # best/ as the stop left it (the resumed run goes on)
        shutil.copytree(out + ".cut.run/checkpoints/best", out + ".cut.best")
    step = out + ".cut.run/checkpoints/step-2"
    run(tokenizer_path, 2, out + ".resumed", run_dir=out + ".cut.run", resume=step, **common)


if __name__ == "__main__":
    tokenizer_path, runs = sys.argv[1], json.loads(sys.argv[2])
    for kwargs in runs:
        if kwargs.pop("resume_runs", False):
            resume_runs(tokenizer_path, kwargs["out"])
        else:
            run(tokenizer_path, kwargs.pop("per_device", 2), **kwargs)
