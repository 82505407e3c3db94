"""Answer the same held-out questions with a run's tuned model and with its GGUF export.

Reports how many greedy answers are identical. Not timed. Usage:

    python bench/export_agreement.py runs/quickstart runs/quickstart/export/gguf-q4_1/*.gguf \\
        --per-family 12 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from instill.eval.tasks import builtin_task
from instill.export.gguf_file import load_gguf
from instill.infer import GenParams, generate
from instill.models import load_for_inference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--per-family", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    cfg = yaml.safe_load((args.run / "config.yaml").read_text())
    seed = ((cfg.get("data") or {}).get("builtin") or {}).get("seed", 0)
    prompts = [list(ex.prompt) for ex in builtin_task(args.per_family, seed).examples]
    params = GenParams(max_new_tokens=args.max_new_tokens)
    tuned = load_for_inference(str(args.run))
    ref = generate(tuned.model, tuned.tokenizer, prompts, params)
    model, _ = load_gguf(args.gguf)
    # the tuned tokenizer renders prompts for both: the template check is the export's job
    got = generate(model, tuned.tokenizer, prompts, params)
    same = sum(a.text == b.text for a, b in zip(ref, got, strict=True))
    print(json.dumps({"examples": len(prompts), "identical_answers": same,
                      "identical_share": same / len(prompts)}, indent=2))


if __name__ == "__main__":
    main()
