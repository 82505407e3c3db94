"""The CUDA paths, checked on one GPU in a few minutes: does each way of training learn, how fast,
in how much memory, against TRL's SFTTrainer on the same rows.

    pip install trl          # the peer (optional: its rows are skipped without it)
    python bench/gpu_check.py [--model smollm2-135m-instruct] [--steps 30] [--only NAME ...]
    python bench/gpu_check.py --smoke   # CPU, float32, 2 steps: checks the script itself

Configurations (each in its own process, so peak memory is its own):
    lora-bf16        LoRA r=16 on a bf16 base                      (adapters float32)
    lora-bf16-compile  the same with train.compile
    qlora            LoRA on an NF4 base (bitsandbytes)
    full-bf16        full fine-tuning, bf16 compute over float32 master weights
    full-bf16-compile  the same with train.compile
    trl-lora-bf16    TRL SFTTrainer, LoRA r=16, bf16, same rows, batch and length
    lora-bf16-fsdp   lora-bf16 with train.shard: fsdp in 2 processes  (needs 2 GPUs)
    full-bf16-fsdp   full-bf16 with train.shard: fsdp in 2 processes  (needs 2 GPUs)

The fsdp rows run under torchrun with the batch per process, so they see twice the rows per
step; their tok/s and peak memory are those of process 0. With one GPU they are skipped.

Prints one row per configuration: tokens/s (real tokens per wall second of the whole run),
peak GPU memory, first and last loss over the steps (each must fall: "learns" is yes only when
the mean of the last five losses is below the mean of the first five), wall seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CONFIGS = {
    "lora-bf16": dict(method="lora", dtype="bfloat16"),
    "lora-bf16-compile": dict(method="lora", dtype="bfloat16", compile=True),
    "qlora": dict(method="lora", dtype="bfloat16", quantize="4bit"),
    "full-bf16": dict(method="full", dtype="bfloat16"),
    "full-bf16-compile": dict(method="full", dtype="bfloat16", compile=True),
    "trl-lora-bf16": dict(method="trl", dtype="bfloat16"),
    "lora-bf16-fsdp": dict(method="lora", dtype="bfloat16", shard="fsdp"),
    "full-bf16-fsdp": dict(method="full", dtype="bfloat16", shard="fsdp"),
}
PROCESSES = 2  # for the fsdp rows
BATCH, MAX_LEN = 8, 512
LR = {"lora": 2e-4, "full": 2e-5, "trl": 2e-4}


def _rows(model: str, device: str, n: int):
    """The built-in tasks' training rows (no ../shared needed), as instill renders them."""
    from instill.config import BuiltinDataConfig, DataConfig, ModelConfig
    from instill.data.dataset import build_data
    from instill.models.load import load_tokenizer
    from instill.models.resolve import resolve_model

    source = resolve_model(model)
    tokenizer = load_tokenizer(source.path, ModelConfig(name=model))
    data = build_data(
        tokenizer,
        DataConfig(builtin=BuiltinDataConfig(train_per_family=max(4, n // 16)), max_length=MAX_LEN),
    )
    return tokenizer, data.train[:n]


def run_instill(name: str, spec: dict, model: str, steps: int, device: str) -> dict:
    import torch

    from instill.config import AdapterConfig, ModelConfig, TrainConfig
    from instill.models import attach_adapter, load_model
    from instill.train import train

    acc = None
    if "shard" in spec:  # one of PROCESSES: the Accelerator picks this process's GPU first
        from accelerate import Accelerator

        acc = Accelerator(cpu=device == "cpu")
    dtype = spec["dtype"] if device == "cuda" else "float32"
    cfg = ModelConfig(name=model, dtype=dtype, device=device, quantize=spec.get("quantize", "none"))
    loaded = load_model(cfg)
    tokenizer, rows = _rows(model, device, steps * BATCH)
    adapter = AdapterConfig(method=spec["method"], r=16, alpha=32)
    model_, _ = attach_adapter(loaded.model, adapter, 0)
    train_cfg = TrainConfig(
        lr=LR[spec["method"]], max_steps=steps, batch_size=BATCH, warmup_ratio=0.1,
        compile=spec.get("compile", False), log_every=1, shard=spec.get("shard", "none"),
    )  # fmt: skip
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = train(model_, tokenizer, rows, train_cfg, None, accelerator=acc)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else result.peak_mem_mb
    return {
        "name": name, "losses": result.losses, "tokens": result.tokens,
        "tps": result.tokens / max(result.wall_s, 1e-9), "peak_mb": peak, "wall_s": wall,
        "main": acc is None or acc.is_main_process,
    }  # fmt: skip


def run_trl(name: str, model: str, steps: int, device: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from instill.models.resolve import resolve_model

    tokenizer, rows = _rows(model, device, steps * BATCH)
    texts = [{"input_ids": r.input_ids, "completion_mask": r.mask} for r in rows]
    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    from transformers import AutoModelForCausalLM

    source = resolve_model(model)  # (a GGUF model's path is its cached transformers conversion)
    net = AutoModelForCausalLM.from_pretrained(
        source.path, dtype=torch.bfloat16 if device == "cuda" else torch.float32
    )
    args = SFTConfig(
        output_dir="/tmp/gpu-check-trl", max_steps=steps, per_device_train_batch_size=BATCH,
        learning_rate=LR["trl"], logging_steps=1, report_to=[], bf16=device == "cuda",
        use_cpu=device == "cpu", max_length=MAX_LEN, save_strategy="no",
        warmup_steps=max(1, steps // 10),
    )  # fmt: skip
    trainer = SFTTrainer(
        model=net, args=args, train_dataset=Dataset.from_list(texts),
        processing_class=tokenizer, peft_config=LoraConfig(r=16, lora_alpha=32,
        target_modules="all-linear", task_type="CAUSAL_LM"), callbacks=[Losses()],
    )  # fmt: skip
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    tokens = sum(len(r.input_ids) for r in rows[: steps * BATCH])
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    return {"name": name, "losses": losses, "tokens": tokens, "tps": tokens / wall,
            "peak_mb": peak, "wall_s": wall}  # fmt: skip


def worker(name: str, model: str, steps: int, device: str) -> None:
    spec = CONFIGS[name]
    if spec["method"] == "trl":
        out = run_trl(name, model, steps, device)
    else:
        out = run_instill(name, spec, model, steps, device)
    if out.pop("main", True):
        print("RESULT " + json.dumps(out))


def learns(losses: list[float]) -> str:
    if len(losses) < 2:
        return "?"
    k = max(1, min(5, len(losses) // 2))
    return "yes" if sum(losses[-k:]) / k < sum(losses[:k]) / k else "NO"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--only", nargs="*", default=None, choices=sorted(CONFIGS))
    ap.add_argument("--smoke", action="store_true", help="CPU, float32, 2 steps, no QLoRA")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.model, a.steps, a.device)
        return
    import torch

    device = "cpu" if a.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (use --smoke to check the script on a CPU)")
    steps = 2 if a.smoke else a.steps
    names = a.only or [n for n in CONFIGS if not (a.smoke and n in ("qlora",) or
                                                 a.smoke and n.endswith("compile"))]  # fmt: skip
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}; model {a.model}; {steps} steps at batch "
              f"{BATCH}, max length {MAX_LEN}")  # fmt: skip
    rows = []
    for name in names:
        cmd = [sys.executable, __file__, "--worker", name, "--model", a.model, "--steps",
               str(steps), "--device", device]  # fmt: skip
        if "shard" in CONFIGS[name]:
            if device == "cuda" and torch.cuda.device_count() < PROCESSES:
                rows.append({"name": name, "error": f"skipped: needs {PROCESSES} GPUs"})
                continue
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc_per_node", str(PROCESSES)]  # fmt: skip
            cmd = [*launch, *cmd[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            rows.append({"name": name, "error": tail[:120]})
            continue
        rows.append(json.loads(line[7:]))
    print(f"{'configuration':<20} {'tok/s':>9} {'peak MiB':>9} {'loss first':>10} "
          f"{'loss last':>10} {'learns':>6} {'wall s':>7}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<20} failed: {r['error']}")
            continue
        losses = r["losses"]
        print(f"{r['name']:<20} {r['tps']:>9.0f} {r['peak_mb']:>9.0f} {losses[0]:>10.3f} "
              f"{losses[-1]:>10.3f} {learns(losses):>6} {r['wall_s']:>7.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
