"""Training throughput: instill against TRL's SFTTrainer, same model, data, LoRA, batch, length.

    pip install trl   # the peer, not an instill dependency
    python bench/train_throughput.py --data ../shared/data/t0-train-mix.jsonl [--rows 256]
        [--only NAME ...] [--list]

Each configuration runs in its own process, one after another (so peak RSS is its own). The
instill names say what differs from the defaults: -pk packed rows (`data.packing`), -ckpt every
decoder layer recomputed in backward (`train.gradient_checkpointing`), -ckpt2/3 two layers in
three, -16M / -32M freed activations reused from the heap (`train.mmap_threshold_mb`),
-compile decoder layers compiled (`train.compile`; each such run starts from an empty inductor
cache, so it pays a first compile, as a user's first run does). TRL runs padded and packed. All
in fp32 on the CPU, SmolLM2-135M-Instruct, LoRA r=16 alpha=32 on all linear layers, batch 8, max
length 512, lr 2e-4 linear, one epoch over the same rows (the first --rows rows whose rendered
conversation fits max_length, so neither tool truncates).

Prints, per configuration: real (non-padding) tokens per wall second of the whole training run,
the same after the first optimiser step (steady state: without the first step's compile or
warm-up, measured the same way for both tools), the first step's seconds, peak RSS, the last
logged loss (each tool's own definition), the loss after training on the same rows measured the
same way for both, model FLOPs utilisation against a measured fp32 matmul peak, and the ratios
to TRL packed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, MAX_LEN, LR, R, ALPHA = 8, 512, 2e-4, 16, 32


def _setup():
    import transformers

    transformers.logging.set_verbosity_error()
    from instill.config import ModelConfig
    from instill.models import load_model

    return load_model(ModelConfig(dtype="float32", device="cpu"))


def pick_rows(data: Path, n: int, out: Path) -> int:
    """Write the first n rows whose rendered conversation fits MAX_LEN; return their tokens."""
    from instill.data.render import render

    loaded = _setup()
    kept, tokens = [], 0
    for line in data.read_text().split("\n"):
        if not line.strip():
            continue
        row = json.loads(line)
        msgs = [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ]
        ids, _ = render(loaded.tokenizer, msgs)
        if len(ids) <= MAX_LEN:
            kept.append({"prompt": row["prompt"], "completion": row["completion"]})
            tokens += len(ids)
        if len(kept) == n:
            break
    out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return tokens


def after_loss(model, tokenizer, rows_file: Path) -> float:
    """The tuned model's loss on the same rows, measured the same way for both tools (per reply
    token through <|im_end|>; TRL's own logged loss also counts the newline after it)."""
    from instill.config import DataConfig, SourceConfig
    from instill.data.dataset import build_data
    from instill.train.loop import validation_loss

    rows = build_data(
        tokenizer,
        DataConfig(sources=[SourceConfig(path=str(rows_file))], max_length=MAX_LEN),
        cache=False,
    ).train
    return validation_loss(model, rows, BATCH, tokenizer.pad_token_id)


def steady(times: list[float], tokens: list[int]) -> dict:
    """Throughput after the first optimiser step, from per-step end times (seconds since the
    start of training) and cumulative real tokens."""
    if len(times) < 2:
        return {"first_step_s": times[0] if times else None, "steady_tokens_per_s": None}
    return {
        "first_step_s": times[0],
        "steady_tokens_per_s": (tokens[-1] - tokens[0]) / (times[-1] - times[0]),
    }


def run_instill(
    rows_file: Path,
    packing: bool,
    checkpointing: bool | float = False,
    mmap_mb: float = 0.0625,
    compile: bool = False,
) -> dict:
    from instill.config import AdapterConfig, DataConfig, SourceConfig, TrainConfig
    from instill.data.dataset import build_data
    from instill.models import attach_adapter
    from instill.train import train

    loaded = _setup()
    data = build_data(
        loaded.tokenizer,
        DataConfig(
            sources=[SourceConfig(path=str(rows_file))], max_length=MAX_LEN, packing=packing
        ),
        cache=False,
    )
    model, _ = attach_adapter(loaded.model, AdapterConfig(r=R, alpha=ALPHA))
    cfg = TrainConfig(
        lr=LR,
        epochs=1,
        batch_size=BATCH,
        warmup_ratio=0,
        schedule="linear",
        log_every=1,
        gradient_checkpointing=checkpointing,
        mmap_threshold_mb=mmap_mb,
        compile=compile,
    )
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(
            model,
            loaded.tokenizer,
            data.train,
            cfg,
            Path(run_dir),
            pack_length=MAX_LEN if packing else None,
        )
        log = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    log = [r for r in log if "loss" in r]
    return {
        **steady([r["elapsed_s"] for r in log], [r["tokens"] for r in log]),
        "tokens": result.tokens,
        "wall_s": result.wall_s,
        "final_loss": result.losses[-1],
        "mean_loss": sum(result.losses) / len(result.losses),
        "steps": result.steps,
        "after_loss": after_loss(model, loaded.tokenizer, rows_file),
    }


def run_trl(rows_file: Path, packing: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    loaded = _setup()
    rows = [json.loads(x) for x in rows_file.read_text().splitlines() if x]
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
            for r in rows
        ]
    )
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=BATCH,
            max_length=MAX_LEN,
            num_train_epochs=1,
            learning_rate=LR,
            lr_scheduler_type="linear",
            warmup_steps=0,
            bf16=False,
            fp16=False,
            use_cpu=True,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            packing=packing,
            dataloader_num_workers=0,
        )
        trainer = SFTTrainer(
            model=loaded.model,
            args=args,
            train_dataset=dataset,
            processing_class=loaded.tokenizer,
            peft_config=LoraConfig(
                r=R, lora_alpha=ALPHA, target_modules="all-linear", task_type="CAUSAL_LM"
            ),
            callbacks=[StepClock()],
        )
        real = sum(len(x) for x in trainer.train_dataset["input_ids"])
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    logged = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in logged]
    # TRL logs tokens per step counting packing's padding; real tokens are shared out in the
    # same proportions
    counted = [h["num_tokens"] for h in logged]
    return {
        **steady([t - start for t in step_ends], [round(real * c / counted[-1]) for c in counted]),
        "tokens": real,
        "wall_s": wall,
        "final_loss": losses[-1],
        "mean_loss": sum(losses) / len(losses),
        "steps": trainer.state.global_step,
        "after_loss": after_loss(trainer.model, loaded.tokenizer, rows_file),
    }


def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


CONFIGS = {
    "instill": lambda f: run_instill(f, False),
    "instill-pk": lambda f: run_instill(f, True),
    "instill-ckpt": lambda f: run_instill(f, False, True),
    "instill-pk-ckpt": lambda f: run_instill(f, True, True),
    "instill-pk-ckpt2/3": lambda f: run_instill(f, True, 2 / 3),
    "instill-pk-ckpt-16M": lambda f: run_instill(f, True, True, 16),
    "instill-pk-32M": lambda f: run_instill(f, True, False, 32),
    "instill-pk-compile": lambda f: run_instill(f, True, compile=True),
    "instill-pk-compile-ckpt": lambda f: run_instill(f, True, True, compile=True),
    "instill-pk-compile-ckpt-32M": lambda f: run_instill(f, True, True, 32, compile=True),
    "instill-pk-compile-32M": lambda f: run_instill(f, True, False, 32, compile=True),
    "trl-padded": lambda f: run_trl(f, False),
    "trl-packed": lambda f: run_trl(f, True),
}
DEFAULT = [
    "instill",
    "instill-pk",
    "instill-pk-32M",
    "instill-pk-compile",
    "instill-pk-compile-ckpt",
    "instill-pk-compile-ckpt-32M",
    "trl-padded",
    "trl-packed",
]


def worker(which: str, rows_file: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        # a first run's compile: no kernels cached by an earlier run
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        result = CONFIGS[which](rows_file)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="the T0 mix (required to run)")
    parser.add_argument(
        "--rows",
        type=int,
        default=256,
        help="training rows (256: 11 optimiser steps, so the first step's warm-up, a compile "
        "included, is part of the run but not most of it)",
    )
    parser.add_argument("--only", nargs="*", default=DEFAULT, choices=sorted(CONFIGS))
    parser.add_argument("--list", action="store_true", help="list the configurations and stop")
    parser.add_argument("--worker")
    parser.add_argument("--rows-file", type=Path)
    args = parser.parse_args()
    if args.list:
        print("\n".join(f"{k}{' (default)' if k in DEFAULT else ''}" for k in CONFIGS))
        return
    if args.worker:
        worker(args.worker, args.rows_file)
        return
    if args.data is None:
        parser.error("--data is required")
    rows_file = Path(tempfile.mkdtemp()) / "rows.jsonl"
    tokens = pick_rows(args.data, args.rows, rows_file)
    print(
        f"{args.rows} rows, {tokens} tokens, batch {BATCH}, max length {MAX_LEN}, fp32, "
        f"LoRA r={R} all-linear, {os.cpu_count()} CPUs"
    )
    results = {}
    for which in args.only:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--data",
                str(args.data),
                "--worker",
                which,
                "--rows-file",
                str(rows_file),
            ],
            capture_output=True,
            text=True,
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{which}: failed\n{proc.stderr[-2000:]}")
            continue
        results[which] = json.loads(line[7:])
        results[which]["tokens_per_s"] = results[which]["tokens"] / results[which]["wall_s"]
        print(f"{which}: {json.dumps(results[which])}", flush=True)
    from transformers import AutoConfig

    from instill.models import resolve_model

    cfg = AutoConfig.from_pretrained(resolve_model("smollm2-135m-instruct").path)
    layer = 4 * cfg.hidden_size**2 * (1 + cfg.num_key_value_heads / cfg.num_attention_heads) / 2
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    n_body = cfg.num_hidden_layers * (layer + mlp)
    flops_per_token = 4 * n_body  # forward + input-gradient backward through frozen weights
    peak = matmul_peak_gflops()
    ref = results.get("trl-packed")
    print(
        f"\nfp32 matmul peak {peak:.1f} GFLOP/s; model FLOPs/token {flops_per_token / 1e6:.0f} M "
        "(forward + backward through frozen linear layers, LM head excluded)"
    )
    print(
        f"{'config':<29}{'tokens/s':>9}{'steady':>8}{'1st step s':>11}{'peak RSS MB':>12}"
        f"{'logged loss':>12}{'loss after':>11}{'MFU':>7}{'x TRL packed':>13}{'steady x':>9}"
        f"{'RSS / TRL':>10}"
    )

    def ratio(r: dict, key: str) -> str:
        if not ref or not r.get(key) or not ref.get(key):
            return "-"
        return f"{r[key] / ref[key]:.2f}" + ("" if key == "peak_rss_mb" else "x")

    for name, r in results.items():
        mfu = r["tokens_per_s"] * flops_per_token / (peak * 1e9)
        st = f"{r['steady_tokens_per_s']:.1f}" if r.get("steady_tokens_per_s") else "-"
        print(
            f"{name:<29}{r['tokens_per_s']:>9.1f}{st:>8}{r['first_step_s']:>11.1f}"
            f"{r['peak_rss_mb']:>12.0f}{r['final_loss']:>12.4f}{r['after_loss']:>11.4f}"
            f"{100 * mfu:>6.1f}%{ratio(r, 'tokens_per_s'):>13}"
            f"{ratio(r, 'steady_tokens_per_s'):>9}{ratio(r, 'peak_rss_mb'):>10}"
        )
    if ref:
        print(
            "\nissue 4's goal: >= 2.5x TRL packed's tokens/s, <= 0.5x its peak RSS, loss after "
            "no worse (+0.5% noise allowed)"
        )
        for key, label in (("tokens_per_s", "whole run"), ("steady_tokens_per_s", "steady")):
            if not ref.get(key):
                print(f"  {label}: not measured (a single step)")
                continue
            met = [
                name
                for name, r in results.items()
                if name.startswith("instill")
                and (r.get(key) or 0) >= 2.5 * ref[key]
                and r["peak_rss_mb"] <= 0.5 * ref["peak_rss_mb"]
                and r["after_loss"] <= ref["after_loss"] * 1.005
            ]
            print(f"  met ({label} tokens/s): {', '.join(met) or 'by none'}")


if __name__ == "__main__":
    main()
