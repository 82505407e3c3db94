"""Where instill's training peak RSS comes from: one LoRA training step at the bench's largest
batch shape, in a fresh process per variant (peak RSS is per process and never goes down).

    python bench/peak_memory.py [--batch 8] [--length 512] [--variants plain checkpointing]
        [--dynamic-heap]

Prints RSS after loading the model, after attaching LoRA, and the peak over forward + backward +
optimiser step, for each variant. RSS does not depend on CPU load, so this can run anywhere.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step(variant: str, batch: int, length: int, dynamic_heap: bool) -> dict:
    import torch

    from instill.train.memory import enable_checkpointing, fix_mmap_threshold

    if not dynamic_heap:
        fix_mmap_threshold()  # as instill.train.train does
    import transformers

    transformers.logging.set_verbosity_error()
    from instill.config import AdapterConfig, ModelConfig
    from instill.models import attach_adapter, load_model
    from instill.train.loss import SupervisedLM

    out = {"variant": variant, "dynamic_heap": dynamic_heap, "start_mb": rss_mb()}
    loaded = load_model(ModelConfig(dtype="float32", device="cpu"))
    out["loaded_mb"] = rss_mb()
    model, _ = attach_adapter(loaded.model, AdapterConfig(r=16, alpha=32))
    # ckpt-2of3: two decoder layers in three recompute, as train.gradient_checkpointing: 0.67
    enable_checkpointing(model, {"checkpointing": True, "ckpt-2of3": 2 / 3}.get(variant, False))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    out["adapter_mb"] = rss_mb()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, loaded.tokenizer.vocab_size, (batch, length), generator=g)
    attn = torch.ones_like(ids)
    attn[-1, length // 2 :] = 0  # one right-padded row, as in a length-grouped batch
    labels = torch.where(attn.bool(), ids, -100)
    wrapped = SupervisedLM(model)
    loss, n = wrapped(input_ids=ids, labels=labels, attention_mask=attn)
    out["forward_peak_mb"] = rss_mb()
    (loss / n).backward()
    opt.step()
    out["peak_mb"] = rss_mb()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--variants", nargs="*", default=["plain", "checkpointing"])
    parser.add_argument(
        "--dynamic-heap", action="store_true", help="leave glibc's mmap threshold dynamic"
    )
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        result = step(args.worker, args.batch, args.length, args.dynamic_heap)
        print("RESULT " + json.dumps(result), flush=True)
        return
    for v in args.variants:
        cmd = [sys.executable, __file__, "--worker", v]
        cmd += ["--batch", str(args.batch), "--length", str(args.length)]
        cmd += ["--dynamic-heap"] if args.dynamic_heap else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        print(line[7:] if line else f"{v}: failed\n{proc.stderr[-2000:]}", flush=True)


if __name__ == "__main__":
    main()
