"""DPO throughput: instill against TRL's DPOTrainer, same pairs, model, LoRA, batch, length, beta.

TRL is the peer, not an instill dependency. To install it without changing any package already
installed (TRL 1.16 needs transformers >= 4.56.2, accelerate >= 1.10.1, datasets >= 4.7, which
instill's environment has), put it in a folder of its own and name that folder here:

    pip install --no-deps --target ../trl-pkgs trl==1.16.0
    python bench/dpo_throughput.py --data ../shared/data/prefs-alpacaeval-train.jsonl \\
        --trl-path ../trl-pkgs [--pairs 128] [--only instill instill-packed trl]

(with `pip install trl` into the environment instead, leave --trl-path out). --trl-path goes on
the TRL process's PYTHONPATH only.

The pair file is split by prompt, as the team's held-out split is (pairs sharing a prompt stay on
one side): its prompts sorted, shuffled with seed 0, a fifth held out. Training takes the first
--pairs pairs of the other prompts whose prompt plus longer reply fits the max length (so neither
tool truncates); the held-out side, every held-out pair that fits (or the first --heldout).

Each tool runs in its own process, one after another (so peak RSS is its own), in fp32 on the
CPU: SmolLM2-135M-Instruct, LoRA r=16 alpha=32 on all linear layers (no dropout), batch 4 pairs,
max length 512, lr 5e-5 linear without warm-up, one epoch, DPO's sigmoid loss with beta 0.1, the
reference the base model through the disabled adapter, scored live every step (no precomputed
reference), no gradient checkpointing (TRL's DPOConfig turns it on by default; off here as in
instill's default).

Prints, per tool: real (non-padding) tokens per wall second of the whole training run (a pair is
two sequences, prompt + chosen and prompt + rejected, each tool counting its own tokenisation;
TRL's replies also carry the newline the chat template writes after <|im_end|>), the same after
the first optimiser step (steady), the first step's seconds, peak RSS at the end of training, the
last logged loss and the mean logged loss (each tool's own), then, on the held-out pairs,
measured the same way for both (instill's tokenisation, summed reply log-probs): the DPO loss,
the implicit-reward accuracy against the reference (the base model; chosen's log-ratio strictly
above rejected's), and the length-normalised accuracy (mean token log-prob of chosen strictly
above rejected's; needs no reference), each with a 95% interval from a bootstrap over held-out
prompts. The base model's length-normalised accuracy is the starting point (its implicit-reward
margins are all 0, so its accuracy by that measure is 0 by the strict rule).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_throughput import _setup, steady

BATCH, MAX_LEN, LR, R, ALPHA, BETA = 4, 512, 5e-5, 16, 32, 0.1
HELDOUT_SHARE, SPLIT_SEED, BOOTSTRAP = 0.2, 0, 2000


def split_by_prompt(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows; every row of a prompt on one side."""
    prompts = sorted({r["prompt"] for r in rows})
    random.Random(SPLIT_SEED).shuffle(prompts)
    held = set(prompts[: round(HELDOUT_SHARE * len(prompts))])
    return [r for r in rows if r["prompt"] not in held], [r for r in rows if r["prompt"] in held]


def fits(tokenizer, rows: list[dict]) -> list[bool]:
    """Whether each pair's prompt plus its longer reply fits MAX_LEN (instill's rendering)."""
    from instill.data.preference_tokens import tokenize_preferences

    pairs = [_pair(r, i) for i, r in enumerate(rows)]
    tokenized, _ = tokenize_preferences(tokenizer, pairs, 10**6)
    return [
        len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids)) <= MAX_LEN
        for t in tokenized
    ]


def _pair(row: dict, i: int):
    from instill.data.preference import Pair

    return Pair(
        ({"role": "user", "content": row["prompt"]},),
        ({"role": "assistant", "content": row["chosen"]},),
        ({"role": "assistant", "content": row["rejected"]},),
        f"pair {i}",
    )


def pick_pairs(data: Path, n_train: int, n_heldout: int | None, out: Path) -> None:
    """Write train.jsonl and heldout.jsonl under `out` (prompt, chosen, rejected strings), and
    reference.json: the base model's held-out scores."""
    loaded = _setup()
    rows = [json.loads(x) for x in data.read_text().splitlines() if x.strip()]
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    train, held = split_by_prompt(rows)
    train = [r for r, ok in zip(train, fits(loaded.tokenizer, train), strict=True) if ok][:n_train]
    held = [r for r, ok in zip(held, fits(loaded.tokenizer, held), strict=True) if ok][:n_heldout]
    for name, part in (("train", train), ("heldout", held)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    # the reference is the base model for both tools: score it once
    reference = heldout_logps(loaded.model, loaded.tokenizer, out / "heldout.jsonl")
    (out / "reference.json").write_text(json.dumps(reference))


def heldout_logps(model, tokenizer, pairs_file: Path) -> list[list[float]]:
    """Per held-out pair: [chosen summed log-prob, rejected's, chosen reply tokens, rejected's],
    through instill's rendering and scoring, the same for every model."""
    import torch

    from instill.data.dataset import labels_from, pad_right
    from instill.data.preference_tokens import tokenize_preferences
    from instill.train.preference import model_logps

    rows = _rows(pairs_file)
    tokenized, _ = tokenize_preferences(
        tokenizer, [_pair(r, i) for i, r in enumerate(rows)], MAX_LEN
    )
    seqs = [s for t in tokenized for s in (t.chosen(), t.rejected())]
    sums, counts = [], []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(seqs), 2 * BATCH):
            ids, attn, mask = pad_right(seqs[i : i + 2 * BATCH], tokenizer.pad_token_id)
            logp, n = model_logps(model, ids, labels_from(ids, mask), attn)
            sums += logp.tolist()
            counts += n.tolist()
    model.train(was_training)
    return [[sums[i], sums[i + 1], counts[i], counts[i + 1]] for i in range(0, len(sums), 2)]


def preference_accuracy(policy: list, reference: list, prompts: list[str]) -> dict:
    """Held-out figures of a tuned model (per pair [chosen sum, rejected sum, chosen tokens,
    rejected tokens]) against the reference's: implicit-reward accuracy, mean margin and DPO
    loss; length-normalised accuracy (policy only); each accuracy with a 95% interval from a
    bootstrap over prompts (pairs sharing a prompt are not independent)."""
    z = [(p[0] - r[0]) - (p[1] - r[1]) for p, r in zip(policy, reference, strict=True)]
    reward_hit = [float(x > 0) for x in z]
    norm_hit = [float(p[0] / p[2] > p[1] / p[3]) for p in policy]
    return {
        "reward_acc": _mean(reward_hit),
        "reward_acc_ci": _bootstrap(reward_hit, prompts),
        "margin": BETA * _mean(z),
        "dpo_loss": _mean([math.log1p(math.exp(-BETA * x)) for x in z]),
        "norm_acc": _mean(norm_hit),
        "norm_acc_ci": _bootstrap(norm_hit, prompts),
    }


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _bootstrap(hits: list[float], prompts: list[str]) -> list[float]:
    groups: dict[str, list[float]] = {}
    for h, p in zip(hits, prompts, strict=True):
        groups.setdefault(p, []).append(h)
    clusters = list(groups.values())
    rng = random.Random(0)
    means = []
    for _ in range(BOOTSTRAP):
        drawn = [h for c in rng.choices(clusters, k=len(clusters)) for h in c]
        means.append(_mean(drawn))
    means.sort()
    return [means[int(0.025 * BOOTSTRAP)], means[int(0.975 * BOOTSTRAP) - 1]]


def run_instill(work: Path, variant: str = "instill") -> dict:
    """instill's DPO. The variant's name lists its settings after "instill": `packed`:
    data.packing (each micro-batch's sequences share rows of the max length, no padding between
    them); `compiled`: train.compile (decoder layers through torch.compile); `ckpt`:
    train.gradient_checkpointing; `32M`: train.mmap_threshold_mb 32 (large buffers stay in the
    allocator's heap instead of being mapped and zeroed afresh every step); `precomputed`:
    train.preference.precompute_reference (the reference scored once before training, its time
    counted in the run's)."""
    parts = set(variant.split("-")[1:])
    packed, compiled = "packed" in parts, "compiled" in parts
    from instill.config import AdapterConfig, PreferenceConfig, TrainConfig
    from instill.data.preference import read_preferences
    from instill.data.preference_tokens import tokenize_preferences
    from instill.models import attach_adapter
    from instill.train import train

    loaded = _setup()
    pairs, _ = read_preferences(str(work / "train.jsonl"))
    rows, _ = tokenize_preferences(loaded.tokenizer, pairs, MAX_LEN)
    real = sum(2 * len(r.prompt_ids) + len(r.chosen_ids) + len(r.rejected_ids) for r in rows)
    model, _ = attach_adapter(loaded.model, AdapterConfig(r=R, alpha=ALPHA))
    cfg = TrainConfig(
        lr=LR,
        epochs=1,
        batch_size=BATCH,
        warmup_ratio=0,
        schedule="linear",
        log_every=1,
        objective="dpo",
        preference=PreferenceConfig(
            beta=BETA, loss_type="sigmoid", precompute_reference="precomputed" in parts
        ),
        compile=compiled,
        gradient_checkpointing="ckpt" in parts,
        **({"mmap_threshold_mb": 32} if "32M" in parts else {}),
    )
    with tempfile.TemporaryDirectory() as run_dir:
        # a precomputed reference is scored inside train(), before its clock starts, and could
        # come from the reference cache: a fresh cache, and the whole call timed instead
        os.environ["INSTILL_HOME"] = str(Path(run_dir) / "home")
        called = time.perf_counter()
        result = train(
            model, loaded.tokenizer, rows, cfg, Path(run_dir),
            pack_length=MAX_LEN if packed else None,
        )  # fmt: skip
        whole_call = time.perf_counter() - called
        log = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    peak = _peak_rss_mb()
    log = [r for r in log if "loss" in r and "tokens" in r]
    # the loop's own token count, shared out to ours in proportion (as TRL's is below)
    counted = [r["tokens"] for r in log]
    return {
        **steady([r["elapsed_s"] for r in log], [round(real * c / counted[-1]) for c in counted]),
        "tokens": real,
        "wall_s": whole_call if "precomputed" in parts else result.wall_s,
        "final_loss": result.losses[-1],
        "mean_loss": _mean(result.losses),
        "steps": result.steps,
        "peak_rss_mb": peak,
        **_scored(model, loaded.tokenizer, work),
    }


def run_trl(work: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    loaded = _setup()
    rows = _rows(work / "train.jsonl")
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in rows
        ]
    )
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=BATCH,
            max_length=MAX_LEN,
            num_train_epochs=1,
            learning_rate=LR,
            lr_scheduler_type="linear",
            warmup_steps=0,
            beta=BETA,
            loss_type=["sigmoid"],
            gradient_checkpointing=False,
            bf16=False,
            fp16=False,
            use_cpu=True,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            dataloader_num_workers=0,
        )
        trainer = DPOTrainer(
            model=loaded.model,
            args=args,
            train_dataset=dataset,
            processing_class=loaded.tokenizer,
            peft_config=LoraConfig(
                r=R, lora_alpha=ALPHA, target_modules="all-linear", task_type="CAUSAL_LM"
            ),
            callbacks=[StepClock()],
        )
        data = trainer.train_dataset
        real = sum(
            2 * len(p) + len(c) + len(r)
            for p, c, r in zip(
                data["prompt_ids"], data["chosen_ids"], data["rejected_ids"], strict=True
            )
        )
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    peak = _peak_rss_mb()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in logged]
    counted = [h["num_tokens"] for h in logged]
    return {
        **steady([t - start for t in step_ends], [round(real * c / counted[-1]) for c in counted]),
        "tokens": real,
        "wall_s": wall,
        "final_loss": losses[-1],
        "mean_loss": _mean(losses),
        "steps": trainer.state.global_step,
        "peak_rss_mb": peak,
        **_scored(trainer.model, loaded.tokenizer, work),
    }


def _scored(model, tokenizer, work: Path) -> dict:
    start = time.perf_counter()
    scores = heldout_logps(model, tokenizer, work / "heldout.jsonl")
    return {"heldout": scores, "heldout_s": time.perf_counter() - start}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


INSTILL_VARIANTS = (
    "instill",
    "instill-packed",
    "instill-32M",
    "instill-compiled-32M",
    "instill-ckpt-compiled-32M",
    "instill-packed-compiled-32M",
    "instill-precomputed-compiled-32M",
)
CONFIGS = {
    **{v: (lambda work, v=v: run_instill(work, v)) for v in INSTILL_VARIANTS},
    "trl": run_trl,
}


def run_worker(which: str, work: Path, trl_path: Path | None) -> dict | None:
    env = dict(os.environ)
    if which == "trl" and trl_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(trl_path.resolve()), *filter(None, [env.get("PYTHONPATH")])]
        )
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", which, "--work", str(work)],
        capture_output=True,
        text=True,
        env=env,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(f"{which}: failed\n{proc.stderr[-3000:]}", flush=True)
        return None
    return json.loads(line[7:])


def report(results: dict, reference: list, prompts: list[str]) -> None:
    n = len(reference)
    base_norm = [float(r[0] / r[2] > r[1] / r[3]) for r in reference]
    print(
        f"\nheld-out: {n} pairs, {len(set(prompts))} prompts; the base model's length-normalised "
        f"accuracy {_mean(base_norm):.3f} {_fmt_ci(_bootstrap(base_norm, prompts))}"
    )
    print(
        f"{'tool':<24}{'tokens/s':>9}{'steady':>8}{'1st step s':>11}{'peak RSS MB':>12}"
        f"{'last loss':>10}{'mean loss':>10}{'held-out loss':>14}{'reward acc':>24}"
        f"{'norm acc':>24}{'load':>11}"
    )
    for name, r in results.items():
        acc = r["accuracy"]
        st = f"{r['steady_tokens_per_s']:.1f}" if r.get("steady_tokens_per_s") else "-"
        print(
            f"{name:<24}{r['tokens_per_s']:>9.1f}{st:>8}{r['first_step_s']:>11.1f}"
            f"{r['peak_rss_mb']:>12.0f}{r['final_loss']:>10.4f}{r['mean_loss']:>10.4f}"
            f"{acc['dpo_loss']:>14.4f}"
            f"{acc['reward_acc']:>8.3f} {_fmt_ci(acc['reward_acc_ci']):>15}"
            f"{acc['norm_acc']:>8.3f} {_fmt_ci(acc['norm_acc_ci']):>15}"
            f"{r['load_before'][0]:>5.1f}-{r['load_after'][0]:<5.1f}"
        )
    peer = results.get("trl")
    for name, ours in results.items():
        if name == "trl" or peer is None:
            continue
        speed = ours["tokens_per_s"] / peer["tokens_per_s"]
        st = (
            f"{ours['steady_tokens_per_s'] / peer['steady_tokens_per_s']:.2f}x"
            if ours.get("steady_tokens_per_s") and peer.get("steady_tokens_per_s")
            else "-"
        )
        rss = ours["peak_rss_mb"] / peer["peak_rss_mb"]
        a, b = ours["accuracy"], peer["accuracy"]
        print(
            f"\n{name} / TRL: tokens/s {speed:.2f}x (steady {st}), peak RSS {rss:.2f}, "
            f"held-out DPO loss {a['dpo_loss']:.4f} vs {b['dpo_loss']:.4f}, reward accuracy "
            f"{a['reward_acc']:.3f} vs {b['reward_acc']:.3f}, length-normalised "
            f"{a['norm_acc']:.3f} vs {b['norm_acc']:.3f}"
        )
        met = speed >= 2 and rss <= 0.6 and a["dpo_loss"] <= b["dpo_loss"] * 1.005
        print(
            "issue 23's goal (>= 2x TRL's tokens/s at <= 0.6x its peak RSS, held-out loss no "
            f"worse, +0.5% noise allowed): {'met' if met else 'not met'}; accuracies above "
            "with their intervals"
        )


def _fmt_ci(ci: list[float]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="the AlpacaEval pair file (required to run)")
    parser.add_argument(
        "--pairs", type=int, default=128, help="training pairs (128: 32 steps of 4 pairs)"
    )
    parser.add_argument(
        "--heldout", type=int, default=None, help="held-out pairs scored (default: all that fit)"
    )
    parser.add_argument("--only", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument(
        "--trl-path", type=Path, help="a folder holding TRL (pip install --target), for TRL only"
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="keep the split, the reference's scores and each tool's result here (default: a "
        "new temporary folder); a folder from an earlier run is reused as it is, and the "
        "results already in it are reported beside this run's",
    )
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = CONFIGS[args.worker](args.work)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.data is None:
        parser.error("--data is required")
    work = args.work or Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "reference.json").is_file():
        pick_pairs(args.data, args.pairs, args.heldout, work)
    sizes = _sizes(work)
    print(
        f"{sizes['train_pairs']} training pairs ({sizes['train_prompts']} prompts), "
        f"{sizes['heldout_pairs']} held-out ({sizes['heldout_prompts']} prompts), batch {BATCH} "
        f"pairs, max length {MAX_LEN}, lr {LR} linear, beta {BETA} sigmoid, fp32, LoRA r={R} "
        f"alpha={ALPHA} all-linear, {os.cpu_count()} CPUs; work folder {work}",
        flush=True,
    )
    reference = json.loads((work / "reference.json").read_text())
    prompts = [r["prompt"] for r in _rows(work / "heldout.jsonl")]
    for which in args.only:
        load = os.getloadavg()
        r = run_worker(which, work, args.trl_path)
        if r is None:
            continue
        r["tokens_per_s"] = r["tokens"] / r["wall_s"]
        r["accuracy"] = preference_accuracy(r.pop("heldout"), reference, prompts)
        # the machine's load average (1, 5, 15 min) before and after, beside the numbers
        r["load_before"], r["load_after"] = load, os.getloadavg()
        (work / f"{which}.json").write_text(json.dumps(r))
        print(f"{which}: {json.dumps(r)}", flush=True)
    results = {
        name: json.loads((work / f"{name}.json").read_text())
        for name in CONFIGS
        if (work / f"{name}.json").is_file()
    }
    report(results, reference, prompts)


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x]


def _sizes(work: Path) -> dict:
    train, held = _rows(work / "train.jsonl"), _rows(work / "heldout.jsonl")
    return {
        "train_pairs": len(train),
        "train_prompts": len({r["prompt"] for r in train}),
        "heldout_pairs": len(held),
        "heldout_prompts": len({r["prompt"] for r in held}),
    }


if __name__ == "__main__":
    main()
