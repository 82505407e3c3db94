"""Where the forgetting verdict's reply-length limits should sit: the natural spread of the
reply-length ratio (tokens of a model's replies / tokens of the base's greedy replies, over the
general_gen prompts) between models that did not forget, against models made to ramble.

    python bench/length_guard.py                       # 16 prompts (2 per kind), replies to 1024
    python bench/length_guard.py --per-kind 4 --max-new-tokens 512
    python bench/length_guard.py --only q8_0 lora-tiny # some variants (results kept in --out)

The default model (SmolLM2-135M-Instruct) answers every prompt once per variant, greedy unless
said otherwise, up to --max-new-tokens; each variant's token counts are kept in --out (JSON) so a
second run only generates what is missing. Because a greedy reply is the same whatever the cap,
the replies to the longest cap also give each shorter cap's counts (min(tokens, cap)): the table
shows the ratio at the verdict's default cap (eval.gen_max_new_tokens, 64) beside longer ones.

Variants that should NOT count as forgetting: the base sampled (temperature 0.7, two seeds); its
linear weights through llama.cpp's q8_0 rounding (gguf's own quantizer); a LoRA adapter (r=16,
all linear layers) with small random weights; another neutral system prompt. Variants that
SHOULD be flagged: a system prompt asking for replies at great length, the same request appended
to the user's message; and one asking for a single short sentence (the 0.8x floor's side).

Columns: drift (nats/token on the base's first 64 reply tokens, as the verdict measures it), and
per cap the ratio with its 95% bootstrap interval over prompts (eval.metrics.bootstrap_ratio_ci,
the verdict's own) and how many replies were cut at that cap.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # forgetting._round_blocks: llama.cpp's rounding

NEUTRAL = "You are a helpful assistant."
LONG = (
    "You are a helpful assistant. Answer at great length: write long, detailed replies that "
    "cover every aspect of the request, with many examples and explanations."
)
LONG_USER = "\n\nAnswer at great length, in as much detail as you can, with many examples."
SHORT = "You are a helpful assistant. Answer in one short sentence."

# name: (group, how it changes the base); groups: same = should not be flagged, longer / shorter
# = should be flagged on that side
VARIANTS = {
    "sampled-seed1": ("same", "base, temperature 0.7, seed 1"),
    "sampled-seed2": ("same", "base, temperature 0.7, seed 2"),
    "q8_0": ("same", "linear weights through q8_0 rounding"),
    "lora-tiny": ("same", "LoRA r=16 all-linear, lora_B ~ N(0, 0.005)"),
    "system-neutral": ("same", f'system prompt "{NEUTRAL}"'),
    "system-long": ("longer", "system prompt asking for great length"),
    "user-long": ("longer", "user message + request for great length"),
    "system-short": ("shorter", "system prompt asking for one short sentence"),
}
CAPS = (64, 256, 512, 1024)


def conversations(prompts, name: str) -> list[list[dict]]:
    """Each prompt as the variant asks it (a system turn, or words appended to the request)."""
    out = []
    for p in prompts:
        msgs = [dict(m) for m in p.prompt]
        if name == "user-long":
            msgs[-1]["content"] += LONG_USER
        system = {"system-neutral": NEUTRAL, "system-long": LONG, "system-short": SHORT}.get(name)
        if system is not None:
            msgs = [{"role": "system", "content": system}, *msgs]
        out.append(msgs)
    return out


def variant_model(base, name: str):
    """The weights a variant answers with (the base itself for prompt and sampling variants)."""
    import torch

    if name == "q8_0":
        from forgetting import _round_blocks

        model = copy.deepcopy(base)
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, torch.nn.Linear) and mod.weight.shape[-1] % 32 == 0:
                    mod.weight.copy_(_round_blocks(mod.weight, "q8_0"))
        return model
    if name == "lora-tiny":
        from instill.config.schema import AdapterConfig
        from instill.models.adapters import attach_adapter

        model, _ = attach_adapter(copy.deepcopy(base), AdapterConfig(), seed=0)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:  # peft starts B at 0 (no change): give it small weights
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.005)
        return model.eval()
    return base


def answer(model, tok, convs, name: str, max_new_tokens: int) -> list[dict]:
    from instill.infer import GenParams, generate

    params = GenParams(max_new_tokens=max_new_tokens)
    if name.startswith("sampled-seed"):
        params = GenParams(max_new_tokens=max_new_tokens, temperature=0.7,
                           seed=int(name.removeprefix("sampled-seed")))  # fmt: skip
    gens = generate(model, tok, convs, params, batch_size=64)
    return [{"tokens": g.completion_tokens, "ids": list(g.token_ids)} for g in gens]


def drift(model, tok, prompts, convs, base_ids, base_nll) -> list[float]:
    """Per prompt: NLL of the base's first 64 reply tokens under the variant (its weights, its
    prompt) minus under the base, as general_gen's drift with its default cap."""
    from instill.anchors import reply_nll

    pairs = zip(prompts, convs, strict=True)
    asked = [type(p)(p.id, tuple(c), "", p.family, p.cluster) for p, c in pairs]
    nll = reply_nll(model, tok, asked, base_ids, 4)
    return [a - b for a, b in zip(nll, base_nll, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--per-kind", type=int, default=2, help="general_gen prompts of each kind")
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--out", default="runs/length_guard.json", help="results kept here")
    ap.add_argument("--only", nargs="*", help="variants to answer (default: base and all)")
    ap.add_argument("--merge", nargs="*", default=[], help="add the replies kept in these files")
    args = ap.parse_args()

    from instill.config import ModelConfig
    from instill.eval.tasks import general_gen_task
    from instill.models import load_model

    out = Path(args.out)
    key = f"per_kind={args.per_kind} max_new_tokens={args.max_new_tokens}"
    saved = json.loads(out.read_text()) if out.is_file() else {}
    done = saved.setdefault(key, {})
    for other in args.merge:  # replies answered by another process (--only), same settings
        for name, res in json.loads(Path(other).read_text()).get(key, {}).items():
            done.setdefault(name, res)

    def keep() -> None:  # after each step: a rerun resumes here
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(saved))

    loaded = load_model(ModelConfig())
    base, tok = loaded.model.eval(), loaded.tokenizer
    prompts = general_gen_task(args.per_kind).examples
    for name in args.only if args.only is not None else ["base", *VARIANTS]:
        if name not in done:
            t0 = time.time()
            model = variant_model(base, name)
            replies = answer(model, tok, conversations(prompts, name), name, args.max_new_tokens)
            done[name] = {"replies": replies, "seconds": round(time.time() - t0, 1)}
            keep()
            print(f"{name}: answered in {done[name]['seconds']:.0f} s", flush=True)
    if "base" not in done:
        return
    b = done["base"]
    ids = [r["ids"][:64] for r in b["replies"]]  # the verdict's default cap
    if "nll64" not in b:
        zero = [0.0] * len(ids)
        b["nll64"] = drift(base, tok, prompts, conversations(prompts, "base"), ids, zero)
        b["drift"] = [0.0] * len(ids)
    for name in VARIANTS:
        if name in done and "drift" not in done[name]:
            model = variant_model(base, name)
            convs = conversations(prompts, name)
            done[name]["drift"] = drift(model, tok, prompts, convs, ids, b["nll64"])
    keep()
    table(done, args.max_new_tokens)


def table(done: dict, max_new_tokens: int) -> None:
    from instill.eval.drift import LENGTH_CEILING, LENGTH_FLOOR
    from instill.eval.metrics import bootstrap_ci, bootstrap_ratio_ci

    caps = sorted({c for c in CAPS if c < max_new_tokens} | {max_new_tokens})
    base = [r["tokens"] for r in done["base"]["replies"]]
    print(f"\nn={len(base)} prompts; limits {LENGTH_FLOOR}x to {LENGTH_CEILING}x (whole 95% CI "
          "past the line to flag)")  # fmt: skip
    head = ["variant", "group", "drift@64 [95% CI]"]
    head += [f"ratio@{c} [95% CI] (cut)" for c in caps]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    reach = []
    for c in caps:
        capped = [min(t, c) for t in base]
        reach.append(f"{c * len(capped) / sum(capped):.2f}x ({sum(t >= c for t in base)} cut)")
    print("| base (greedy) | — | 0 | " + " | ".join(f"1.00 (reach {r})" for r in reach) + " |")
    for name, (group, _) in VARIANTS.items():
        if name not in done:
            continue
        toks = [r["tokens"] for r in done[name]["replies"]]
        d = done[name]["drift"]
        lo, hi = bootstrap_ci(d)
        cells = [name, group, f"{sum(d) / len(d):+.3f} [{lo:+.3f}, {hi:+.3f}]"]
        for c in caps:
            num, den = [min(t, c) for t in toks], [min(t, c) for t in base]
            a, b = bootstrap_ratio_ci(num, den)
            cut = sum(t >= c for t in toks)
            cells.append(f"{sum(num) / sum(den):.2f} [{a:.2f}, {b:.2f}] ({cut})")
        print("| " + " | ".join(cells) + " |")
    print("\n" + "\n".join(f"{k}: {v[1]}" for k, v in VARIANTS.items()))
    print("reach: the largest ratio any model could show at that cap (every reply cut there)")


if __name__ == "__main__":
    main()
