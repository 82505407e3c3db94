"""Forgetting and how to keep general behaviour: one recipe run with and without preservation
(data.replay, train.kl_to_base, learning rate), one table of what each bought and cost.

    python bench/forgetting.py                        # the quickstart, four variants
    python bench/forgetting.py --recipe bench/t0_quarter.yaml --variant "name=x data.replay=0.1"
    python bench/forgetting.py --table runs/qs-*      # only the table, from finished runs
    python bench/forgetting.py --calibrate            # drift of changes users call harmless

--calibrate puts numbers beside the verdict's drift limit: the drift on general_gen's prompts of
the default model against copies of itself whose linear weights were rounded as llama.cpp's
q8_0 and q4_0 round them (by the gguf package's own quantizers: 32-weight blocks, one fp16 scale
each), which users treat as the same model.

Each variant is a space-separated list of recipe overrides and must set a distinct name=. Runs go
to runs/<name> (replaced). Columns: wall time, the task suite's gain, the held-out clusters'
score, general knowledge (choice) and general behaviour (general_gen: drift, reply length, short
replies), and the forgetting verdict. Numbers come from the runs' own files (eval/, run.json).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

QUICKSTART = [  # the quickstart ships replay 0.1 at lr 1e-3
    "name=fg-none data.replay=null",
    "name=fg-replay",
    "name=fg-replay-kl train.kl_to_base=0.5",
    "name=fg-lr3e-4-replay train.lr=3e-4",
]


def run(recipe: str, variant: str) -> Path:
    overrides = shlex.split(variant)
    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("name="))
    cmd = [sys.executable, "-m", "instill", "train", recipe, *overrides, "--overwrite"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return Path("runs") / name


def row(run_dir: Path) -> list[str]:
    import json

    from instill.eval.compare import Side, compare_suite
    from instill.report.claims import forgetting_verdict, is_guard

    info = json.loads((run_dir / "run.json").read_text())
    folder = run_dir / "eval"
    base, tuned = Side("base", folder, "base-"), Side("tuned", folder)
    tables = [compare_suite(base, tuned, s) for s in tuned.suites() if s in set(base.suites())]
    by = {t["suite"]: t for t in tables}
    task = next((t for t in tables if not is_guard(t)), None)

    def pts(r):
        return "—" if r is None or r.delta is None else f"{100 * r.a:.1f}->{100 * r.b:.1f}"

    overall = task["rows"][0] if task else None
    unseen = next((r for r in task["rows"] if r.label == "unseen clusters"), None) if task else None
    general = by.get("general", {"rows": [None]})["rows"][0]
    gen = by.get("general_gen", {}).get("generation")
    cells = [
        run_dir.name,
        f"{info['wall_s']:.0f}",
        f"{info['train']['steps']}",
        f"{task['suite']} {pts(overall)}" if task else "—",
        pts(unseen),
        pts(general),
    ]
    if gen:
        d, (_, _, ratio, ci), (sa, sb, _, _) = gen["drift"], gen["tokens"], gen["short"]
        cells += [
            f"{d.delta:+.3f} [{d.ci[0]:+.3f},{d.ci[1]:+.3f}]",
            f"{ratio:.2f} [{ci[0]:.2f},{ci[1]:.2f}]",
            f"{100 * sa:.0f}->{100 * sb:.0f}",
        ]
    else:
        cells += ["—", "—", "—"]
    verdict = forgetting_verdict(tables)
    cells.append(
        "not settled"
        if not verdict.settled
        else {True: "none", False: "FOUND", None: "—"}[verdict.supported]
    )
    return cells


def _round_blocks(w, kind: str):
    """w rounded the way llama.cpp stores it as `kind` (q8_0 or q4_0), by gguf's own quantizer:
    32-weight blocks with one fp16 scale each; q4_0 has 16 levels, d = max / -8 (asymmetric)."""
    import gguf
    import torch

    qtype = gguf.GGMLQuantizationType[kind.upper()]
    data = w.detach().float().cpu().numpy()
    back = gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)
    return torch.from_numpy(back).to(w.dtype).reshape(w.shape)


def calibrate(max_new_tokens: int = 64, per_kind: int = 8) -> None:
    import copy

    import torch

    from instill.anchors import base_replies, reply_nll
    from instill.config import ModelConfig
    from instill.eval.metrics import bootstrap_ci
    from instill.models import load_model

    loaded = load_model(ModelConfig())
    base, tok = loaded.model.eval(), loaded.tokenizer
    from instill.eval.tasks import general_gen_task

    prompts = general_gen_task(per_kind).examples  # the quickstart's (cached after its run)
    anchor = base_replies(base, tok, prompts, max_new_tokens, 32)
    ids = [anchor.replies[p.id].ids for p in prompts]
    print("| copy of the base | drift nats/token [95% CI] |")
    print("|---|---|")
    for kind in ("q8_0", "q4_0"):
        model = copy.deepcopy(base)
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, torch.nn.Linear) and mod.weight.shape[-1] % 32 == 0:
                    mod.weight.copy_(_round_blocks(mod.weight, kind))
        nll = reply_nll(model, tok, prompts, ids, 8)
        d = [n - anchor.replies[p.id].nll for p, n in zip(prompts, nll, strict=True)]
        lo, hi = bootstrap_ci(d)
        print(f"| {kind} rounding | {sum(d) / len(d):+.3f} [{lo:+.3f}, {hi:+.3f}] |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--recipe", default="quickstart")
    ap.add_argument("--variant", action="append", help="overrides of one run (repeat)")
    ap.add_argument("--table", nargs="*", help="only print the table of these run directories")
    ap.add_argument("--calibrate", action="store_true", help="drift of q8_0/q4_0-rounded copies")
    args = ap.parse_args()
    if args.calibrate:
        calibrate()
        return
    if args.table:
        dirs = [Path(p) for p in args.table]
    else:
        dirs = [run(args.recipe, v) for v in (args.variant or QUICKSTART)]
    head = ["run", "wall s", "steps", "task suite", "unseen", "general (choice)",
            "drift nats/tok [CI]", "length ratio [CI]", "short %", "forgetting"]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for d in dirs:
        print("| " + " | ".join(row(d)) + " |")


if __name__ == "__main__":
    main()
