"""Run by tests/test_ddp.py under torchrun: the training loop in N CPU processes (gloo)."""

import json
import sys

from accelerate import Accelerator
from conftest import build_tiny
from test_loss import make_rows


def run(tokenizer_path: str, per_device: int, out: str | None, compile: bool = False) -> dict:
    from instill.config import AdapterConfig, ModelConfig, TrainConfig
    from instill.models import attach_adapter, load_tokenizer
    from instill.train import train

    tokenizer = load_tokenizer(tokenizer_path, ModelConfig(name=tokenizer_path))
    model, _ = attach_adapter(build_tiny(tokenizer), AdapterConfig(method="full"))
    cfg = TrainConfig(lr=1e-2, max_steps=3, batch_size=per_device, warmup_ratio=0, compile=compile)
    acc = Accelerator(cpu=True)
    result = train(model, tokenizer, make_rows(12, seed=5), cfg, None, accelerator=acc)
    params = {n: p.detach().double().sum().item() for n, p in model.named_parameters()}
    record = {
        "world": acc.num_processes,
        "losses": result.losses,
        "tokens": result.tokens,
        "params": params,
    }
    if out and acc.is_main_process:
        with open(out, "w") as f:
            json.dump(record, f)
    return record


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), sys.argv[3], compile=sys.argv[4:] == ["compile"])
