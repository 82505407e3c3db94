"""Training throughput: instill against TRL's SFTTrainer, same model, data, LoRA, batch, length.

    pip install trl   # the peer, not an instill dependency
    python bench/train_throughput.py --data ../shared/data/t0-train-mix.jsonl [--rows 64]

Each configuration runs in its own process, one after another (so peak RSS is its own):
instill with length-grouped batches, instill with packing, both again with gradient
checkpointing (-ckpt: recomputes the decoder's forward in backward, for memory), packed with
two layers in three checkpointed (-ckpt2/3, `train.gradient_checkpointing: 0.67`), packed and
checkpointed with freed activations reused from the heap (-ckpt-16M,
`train.mmap_threshold_mb: 16`), packed with the largest heap reuse (-32M), TRL padded, TRL
packed. All in fp32
on the CPU, SmolLM2-135M-Instruct, LoRA r=16 alpha=32 on all linear layers, batch 8, max length
512, lr 2e-4 linear, one epoch over the same rows (the first --rows rows whose rendered
conversation fits max_length, so neither tool truncates). Prints real (non-padding) tokens per
wall second of training, peak RSS, the last logged loss (each tool's own definition), the loss
after training on the same rows measured the same way for both, the ratios to TRL packed, and
model FLOPs utilisation against a measured fp32 matmul peak.
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


def run_instill(
    rows_file: Path, packing: bool, checkpointing: bool | float = False, mmap_mb: float = 0.0625
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
    )
    result = train(
        model, loaded.tokenizer, data.train, cfg, None, pack_length=MAX_LEN if packing else None
    )
    return {
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
    from trl import SFTConfig, SFTTrainer

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
        )
        real = sum(len(x) for x in trainer.train_dataset["input_ids"])
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
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


def worker(which: str, rows_file: Path) -> None:
    fn = {
        "instill": lambda: run_instill(rows_file, False),
        "instill-packed": lambda: run_instill(rows_file, True),
        "instill-ckpt": lambda: run_instill(rows_file, False, True),
        "instill-pk-ckpt": lambda: run_instill(rows_file, True, True),
        "instill-pk-ckpt2/3": lambda: run_instill(rows_file, True, 2 / 3),
        "instill-pk-ckpt-16M": lambda: run_instill(rows_file, True, True, 16),
        "instill-pk-32M": lambda: run_instill(rows_file, True, False, 32),
        "trl-padded": lambda: run_trl(rows_file, False),
        "trl-packed": lambda: run_trl(rows_file, True),
    }[which]
    result = fn()
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument(
        "--only",
        nargs="*",
        default=[
            "instill",
            "instill-packed",
            "instill-ckpt",
            "instill-pk-ckpt",
            "instill-pk-ckpt2/3",
            "instill-pk-ckpt-16M",
            "instill-pk-32M",
            "trl-padded",
            "trl-packed",
        ],
    )
    parser.add_argument("--worker")
    parser.add_argument("--rows-file", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.rows_file)
        return
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
        f"{'config':<20}{'tokens/s':>10}{'peak RSS MB':>13}{'logged loss':>12}{'loss after':>11}"
        f"{'MFU':>7}{'x TRL packed':>14}{'RSS / TRL packed':>18}"
    )
    for name, r in results.items():
        mfu = r["tokens_per_s"] * flops_per_token / (peak * 1e9)
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        mem = f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}" if ref else "-"
        print(
            f"{name:<20}{r['tokens_per_s']:>10.1f}{r['peak_rss_mb']:>13.0f}"
            f"{r['final_loss']:>12.4f}{r['after_loss']:>11.4f}{100 * mfu:>6.1f}%"
            f"{speed:>14}{mem:>18}"
        )


if __name__ == "__main__":
    main()
