"""Run by tests/test_fsdp.py under torchrun (and in-process for the one-process reference): the
training loop with train.shard: fsdp on CPU (gloo).

Records the losses, the first step's gradients (full tensors, gathered from the shards), the
final parameters of the caller's model (gathered back by the loop), and the share of every
parameter that one process holds while training. `broken` drops the process-count factor from the
loss scale: the negative control the test must catch. `stop_at` asks the loop to stop after that
step (as a signal would), which writes a checkpoint; `resume` continues from one."""

import json
import os
import shutil
import sys

import torch
from accelerate import Accelerator
from conftest import build_tiny
from safetensors.torch import save_file
from test_loss import make_rows


def run(
    tokenizer_path: str,
    per_device: int,
    out: str | None,
    method: str = "full",
    broken: bool = False,
    run_dir: str | None = None,
    stop_at: int | None = None,
    resume: str | None = None,
) -> dict:
    from pathlib import Path

    from instill.config import AdapterConfig, ModelConfig, TrainConfig
    from instill.models import attach_adapter, load_tokenizer
    from instill.train import loop, shard, train

    tokenizer = load_tokenizer(tokenizer_path, ModelConfig(name=tokenizer_path))
    model, _ = attach_adapter(build_tiny(tokenizer), AdapterConfig(method=method))
    made: list = []  # the Sharded twin, when the loop makes one
    fractions: dict[str, float] = {}
    grads: dict[str, torch.Tensor] = {}

    class Recorded(shard.Sharded):
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

    original = (loop.make_optimizer, loop.loss_scale, loop._any, shard.Sharded)
    loop.make_optimizer, shard.Sharded = recording, Recorded
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
        lr=1e-2, max_steps=4, batch_size=per_device, warmup_ratio=0, shard="fsdp", eval_every=2,
        max_grad_norm=None if method == "full" else 1.0,  # the LoRA runs clip, sharded,
        gradient_checkpointing=method == "lora",  # and recompute each layer inside its shard
    )  # fmt: skip
    acc = Accelerator(cpu=True)
    try:
        result = train(
            model, tokenizer, make_rows(12, seed=5), cfg, Path(run_dir) if run_dir else None,
            accelerator=acc, resume_from=Path(resume) if resume else None,
            validation=make_rows(4, seed=9),  # validation loss (and best/) on the shards
        )  # fmt: skip
    finally:
        loop.make_optimizer, loop.loss_scale, loop._any, shard.Sharded = original
    params = {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}
    record = {
        "world": acc.num_processes,
        "losses": result.losses,
        "val_losses": result.val_losses,
        "tokens": result.tokens,
        "steps": result.steps,
        "interrupted": result.interrupted,
        "fractions": fractions,
    }
    if out and acc.is_main_process:
        with open(out, "w") as f:
            json.dump(record, f)
        save_file(params, out + ".params.safetensors")
        if grads:
            save_file(grads, out + ".grads.safetensors")
    return {**record, "params": params, "grads": grads}


if __name__ == "__main__":
    tokenizer_path, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "resume":  # uninterrupted; stopped after step 2; resumed from its checkpoint
        run(tokenizer_path, 2, out + ".whole", run_dir=out + ".whole.run")
        run(tokenizer_path, 2, out + ".cut", run_dir=out + ".cut.run", stop_at=2)
        if os.environ.get("RANK") == "0":  # best/ as the stop left it (the resumed run goes on)
            shutil.copytree(out + ".cut.run/checkpoints/best", out + ".cut.best")
        step = out + ".cut.run/checkpoints/step-2"
        run(tokenizer_path, 2, out + ".resumed", run_dir=out + ".cut.run", resume=step)
    else:
        run(tokenizer_path, 2, out, method=mode, broken="broken" in sys.argv[4:])
