"""Where a 4-bit GGUF export's logit drift comes from: the writer, or rounding the tuned weights.

For the untuned base and for the run's tuned (merged) model, writes a GGUF at each type, reloads
it with transformers' GGUF reader and prints the export check's figures (max and mean |logit
diff|, greedy agreement) against the model in memory. A base that came in as Q4_1 holds weights
already on the Q4_1 grid, so its Q4_1 re-export measures the writer alone; the tuned model's
adapter moves every weight off that grid, so its Q4_1 export also measures rounding the tuned
weights to 4 bits. Not timed. Usage:

    python bench/export_drift.py runs/quickstart [--quants q4_1 q8_0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from instill.data.render import render_prompt
from instill.export.gguf_file import load_gguf, write_gguf
from instill.export.tuned import load_tuned
from instill.export.verify import PROMPTS, compare, from_transformers


@torch.no_grad()
def mean_abs_diff(a_model, b_model, tokenizer) -> float:
    diffs = []
    for messages in PROMPTS:
        x = torch.tensor([render_prompt(tokenizer, messages)])
        diffs.append((a_model(input_ids=x).logits - b_model(input_ids=x).logits).abs().mean())
    return float(torch.stack(diffs).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--quants", nargs="*", default=["q4_1", "q8_0"])
    args = ap.parse_args()
    tuned = load_tuned(args.run)
    models = {"tuned": tuned.merged}
    if tuned.adapter is not None:  # the base alone, as loaded for the run
        from instill.config import ModelConfig
        from instill.models import load_model

        name = tuned.adapter.peft_config["default"].base_model_name_or_path
        models = {
            "base": load_model(ModelConfig(name=name, dtype="float32", device="cpu")).model.eval(),
            **models,
        }
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in models.items():
            for quant in args.quants:
                path = Path(tmp) / f"{label}-{quant}.gguf"
                write_gguf(
                    model,
                    tuned.tokenizer,
                    path,
                    quant,
                    name=label,
                    base_gguf=tuned.source.gguf_path,
                )
                exported, tok = load_gguf(path)
                reloaded = from_transformers(exported, tok, tuned.tokenizer)
                fig = compare(model, tuned.tokenizer, reloaded, quant)
                row = {
                    "model": label,
                    "quant": quant,
                    "max_abs_logit_diff": round(fig.max_logit_diff, 4),
                    "mean_abs_logit_diff": round(
                        mean_abs_diff(model, exported, tuned.tokenizer), 4
                    ),
                    "greedy_agreement": round(fig.greedy_agreement, 4),
                    "positions": fig.positions,
                }
                print(json.dumps(row), flush=True)
                path.unlink()


if __name__ == "__main__":
    main()
