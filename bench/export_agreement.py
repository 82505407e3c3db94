"""Answer the same held-out questions with a run's tuned model and with its GGUF export.

Reports how many greedy answers are identical, and both models' scores on those questions (the
built-in suite's own checkers), so a 4-bit export that words answers differently but keeps the
tuning shows it. Not timed. Usage:

    python bench/export_agreement.py runs/quickstart runs/quickstart/export/gguf-q4_1/*.gguf \\
        --per-family 12 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from instill.data.builtin import score
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
    examples = builtin_task(args.per_family, seed).examples
    prompts = [list(ex.prompt) for ex in examples]
    params = GenParams(max_new_tokens=args.max_new_tokens)
    tuned = load_for_inference(str(args.run))
    ref = generate(tuned.model, tuned.tokenizer, prompts, params)
    model, _ = load_gguf(args.gguf)
    # the tuned tokenizer renders prompts for both: the template check is the export's job
    got = generate(model, tuned.tokenizer, prompts, params)
    same = sum(a.text == b.text for a, b in zip(ref, got, strict=True))

    def task_score(gens):  # the built-in suite's own scorers: does the tuning survive?
        pairs = zip(examples, gens, strict=True)
        hits = [score(ex.scorer, g.text, ex.reference) for ex, g in pairs]
        return round(sum(hits) / len(hits), 4)

    print(
        json.dumps(
            {
                "examples": len(prompts),
                "identical_answers": same,
                "identical_share": round(same / len(prompts), 4),
                "tuned_score": task_score(ref),
                "export_score": task_score(got),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
