"""Each GGUF kind of a run's tuned model, answered by llama.cpp on the run's held-out built-in
prompts: file size, answers identical to the tuned model's in memory, task score, decode rate.

The in-memory answers are the run's own (RUN/eval/builtin.jsonl, written by `instill train`),
so the prompts are the same held-out split (the recipe's eval_per_family, seed and holdout).
Exports go to --out (never into the run), and an existing export there is reused. Needs the
llamacpp extra. Usage:

    python bench/gguf_deploy.py runs/quickstart --out /tmp/gguf-bench
    python bench/gguf_deploy.py runs/quickstart --kinds lora-f16 auto auto:87
    python bench/gguf_deploy.py runs/quickstart --kinds lora-f16 auto q4_k_m q5_k_m
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from instill.config import EvalConfig
from instill.eval.gguf import run_llamacpp
from instill.eval.tasks import builtin_task
from instill.export import export_run

KINDS = {  # name -> export_run arguments
    "f32": dict(fmt="gguf", quant="f32"),
    "f16": dict(fmt="gguf", quant="f16"),
    "q8_0": dict(fmt="gguf", quant="q8_0"),
    "q4_1": dict(fmt="gguf", quant="q4_1", min_agreement=0.0),
    "auto": dict(fmt="gguf", quant="auto"),
    # llama.cpp's own quantizer (the K-quants users download): Ollama's default and its step up
    "q4_k_m": dict(fmt="gguf", quant="q4_k_m"),
    "q5_k_m": dict(fmt="gguf", quant="q5_k_m"),
    "q6_k": dict(fmt="gguf", quant="q6_k"),
    "lora-f16": dict(fmt="gguf-lora", quant="f16"),
    "lora-q8_0": dict(fmt="gguf-lora", quant="q8_0"),
}


def _kind(name: str) -> dict:
    """Export arguments of a kind. The verification's floor is not applied (it is reported in
    the table): a kind below it is measured, not skipped."""
    if name.startswith("auto:"):  # auto with a size budget in MB
        kind = dict(fmt="gguf", quant="auto", max_size_mb=float(name.split(":", 1)[1]))
    else:
        kind = dict(KINDS[name])
    return {"min_agreement": 0.0, **kind}


def _export(run: Path, out: Path, name: str) -> tuple[Path, dict]:
    folder = out / name.replace(":", "-")
    if not (folder / "instill.json").is_file():
        export_run(run, output=folder, **_kind(name))
    manifest = json.loads((folder / "instill.json").read_text())
    return folder, manifest


def _size(manifest: dict) -> str:
    e = manifest["export"]
    if e["format"] == "gguf-lora":
        b = e["base_gguf"]
        return f"{b['size_bytes'] / 1e6:.0f} + {e['size_bytes'] / 1e6:.1f}"
    return f"{e['size_bytes'] / 1e6:.0f}"


def _torch_rate(run: Path, task, n: int, max_new: int) -> float:
    """instill's own greedy decode, one prompt at a time, timed as llama.cpp's is: from the
    first generated token to the last."""
    import time

    from instill.infer import GenParams, generate
    from instill.models import load_for_inference

    loaded = load_for_inference(str(run))
    tokens, seconds = 0, 0.0
    for ex in task.examples[:n]:
        first: list[float] = []
        [g] = generate(
            loaded.model,
            loaded.tokenizer,
            [list(ex.prompt)],
            GenParams(max_new_tokens=max_new),
            on_text=lambda _t, first=first: first or first.append(time.perf_counter()),
        )
        if first and g.completion_tokens > 1:
            tokens += g.completion_tokens - 1
            seconds += time.perf_counter() - first[0]
    return round(tokens / seconds, 1) if seconds else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gguf-bench"))
    ap.add_argument("--kinds", nargs="+", default=["q8_0", "q4_1", "auto", "lora-f16"])
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument(
        "--torch-rate",
        type=int,
        default=40,
        help="time instill's own decoding on the first N prompts (0: skip)",
    )
    args = ap.parse_args()
    cfg = yaml.safe_load((args.run / "config.yaml").read_text())
    b = cfg["data"]["builtin"]
    holdout = (cfg.get("eval") or {}).get("holdout_clusters") or []
    task = builtin_task(b["eval_per_family"], b["seed"], b.get("families"), holdout)
    memory = {r["id"]: r for r in map(json.loads, (args.run / "eval" / "builtin.jsonl").open())}
    if [ex.id for ex in task.examples] != list(memory):
        raise SystemExit(f"{args.run}/eval/builtin.jsonl does not hold the recipe's eval split")
    max_new = args.max_new_tokens or (cfg.get("eval") or {}).get("max_new_tokens", 32)
    mem_score = sum(r["score"] for r in memory.values()) / len(memory)
    rate = _torch_rate(args.run, task, args.torch_rate, max_new) if args.torch_rate else ""
    rows = [
        ("tuned model in memory (instill)", "", "1.000", f"{100 * mem_score:.1f}%", "", f"{rate}")
    ]
    for name in args.kinds:
        folder, manifest = _export(args.run, args.out, name)
        v = manifest["verification"]
        result = run_llamacpp(
            str(folder), None, [task], EvalConfig(max_new_tokens=max_new), args.out / "eval" / name
        )["builtin"]
        same = sum(r["prediction"] == memory[r["id"]]["prediction"] for r in result.records)
        s = result.summary()
        rows.append(
            (
                f"{name} ({manifest['export']['format']})",
                _size(manifest),
                f"{same / len(result.records):.3f}",
                f"{100 * s['score']:.1f}%",
                f"{v['greedy_agreement']:.3f}",
                f"{s['decode_tokens_per_s']}",
            )
        )
        print(
            json.dumps(
                {
                    "kind": name,
                    "identical": same,
                    "n": len(result.records),
                    "score": s["score"],
                    "verify": v,
                    "decode_tokens_per_s": s["decode_tokens_per_s"],
                }
            ),
            flush=True,
        )
    head = (
        "artifact",
        "size MB",
        "answers identical",
        "task score",
        "verify agreement",
        "decode tok/s",
    )
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(
        f"\n{len(task.examples)} held-out prompts, greedy, max {max_new} new tokens; "
        "llama.cpp on the CPU (llama-cpp-python, in-process)"
    )


if __name__ == "__main__":
    main()
