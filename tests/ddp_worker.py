"""Run by tests/test_ddp.py under torchrun: the training loop in N CPU processes (gloo).

Records the losses, the first step's gradients (the full tensors, after DDP's all-reduce) and
the final parameters (full tensors). `broken` drops the process-count factor from the loss
scale: the negative control the test must catch."""

import json
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
    compile: bool = False,
    broken: bool = False,
) -> dict:
    from instill.config import AdapterConfig, ModelConfig, TrainConfig
    from instill.models import attach_adapter, load_tokenizer
    from instill.train import loop, train

    tokenizer = load_tokenizer(tokenizer_path, ModelConfig(name=tokenizer_path))
    model, _ = attach_adapter(build_tiny(tokenizer), AdapterConfig(method="full"))
    names = {id(p): n for n, p in model.named_parameters()}
    grads: dict[str, torch.Tensor] = {}

    def first_grads(optimizer, args, kwargs):
        if not grads:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    grads[names[id(p)]] = p.grad.detach().clone()

    make = loop.make_optimizer

    def recording(*args, **kwargs):
        optimizer = make(*args, **kwargs)
        optimizer.register_step_pre_hook(first_grads)
        return optimizer

    loop.make_optimizer = recording
    if broken:
        loop.loss_scale = lambda acc, tokens: 1 / max(tokens, 1)
    cfg = TrainConfig(
        lr=1e-2, max_steps=3, batch_size=per_device, warmup_ratio=0, compile=compile,
        max_grad_norm=None,  # the recorded gradients are the raw ones
    )  # fmt: skip
    acc = Accelerator(cpu=True)
    try:
        result = train(model, tokenizer, make_rows(12, seed=5), cfg, None, accelerator=acc)
    finally:
        loop.make_optimizer = make
    params = {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}
    record = {"world": acc.num_processes, "losses": result.losses, "tokens": result.tokens}
    if out and acc.is_main_process:
        with open(out, "w") as f:
            json.dump(record, f)
        save_file(params, out + ".params.safetensors")
        save_file(grads, out + ".grads.safetensors")
    return {**record, "params": params, "grads": grads}


if __name__ == "__main__":
    flags = sys.argv[4:]
    run(sys.argv[1], int(sys.argv[2]), sys.argv[3], "compile" in flags, "broken" in flags)
