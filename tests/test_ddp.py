"""Distributed data parallel on CPU (gloo): 2 processes at batch 2 train exactly like 1 process
at batch 4 — same data per step, same token-normalised loss, same weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist import (
    assert_halved,
    assert_same_training,
    children,
    kill_tree,
    load,
    run_worker,
    torchrun,
)
from dist_worker import run

pytestmark = pytest.mark.slow  # several processes on the CPU (a minute or more each)


@pytest.mark.parametrize(
    "compile,broken",
    [(False, False), (True, False), (False, True)],
    ids=["eager", "compiled", "no-process-factor"],
)
def test_two_processes_match_one(default_source, tmp_path, compile, broken):
    """2 processes at batch 2 against 1 at batch 4: losses, the first step's gradients and the
    final weights, every element of every tensor. Compiled: each process compiles its own
    decoder layers inside DDP's wrapper. The negative control drops the process-count factor
    from the loss scale: the gradients come out halved and the test must see it (AdamW, being
    nearly scale-invariant, would hide it in the weights)."""
    out = tmp_path / "ddp.json"
    options = {"compile": compile, "broken": broken}
    run_worker(default_source.path, out, [{"out": str(out), **options}])
    two, one = load(out), run(default_source.path, 4, compile=compile)
    if broken:
        assert_halved(two, one)
        return
    assert_same_training(two, one, min_tensors=11)


def test_instill_train_under_torchrun(tiny_dir, tmp_path):
    """The CLI path in 2 processes: one run directory, written once, evaluated once."""
    proc = torchrun(
        "-m",
        "instill",
        "train",
        "quickstart",
        f"model.name={tiny_dir}",
        f"train.output_dir={tmp_path}",
        "train.max_steps=4",
        "train.batch_size=2",
        "train.log_every=1",
        "data.builtin.train_per_family=4",
        "data.builtin.eval_per_family=1",
        "data.builtin.families=[addition,uppercase]",
        "eval.holdout_clusters=[]",
        "eval.suites=[builtin]",
        "eval.max_new_tokens=4",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "quickstart"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # one writer
    assert (run / "final" / "adapter_model.safetensors").is_file()
    for name in ("base-builtin", "builtin"):
        assert json.loads((run / "eval" / f"{name}.json").read_text())["n"] == 2
    assert proc.stdout.count("total wall time") == 1  # one summary, from the main process


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the child of `parent` (torchrun) that runs local rank `rank`."""
    for pid in children(parent):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LOCAL_RANK={rank}".encode() in env:
            return pid
    return None


def test_sigterm_to_one_rank_stops_both_and_resume_is_exact(tiny_dir, tmp_path):
    """SIGTERM to rank 1 only: both processes stop after the same step, one complete checkpoint
    is written, and resuming in 2 processes ends with the weights of an uninterrupted run."""
    import signal
    import time

    from safetensors.torch import load_file

    def args(out):
        return [
            "-m", "instill", "train", "quickstart", f"model.name={tiny_dir}",
            f"train.output_dir={out}", "train.max_steps=200", "train.batch_size=2",
            "train.log_every=1", "data.builtin.train_per_family=8",
            "data.builtin.families=[addition,uppercase]", "data.replay=null",
            "eval.before=false", "eval.after=false", "eval.holdout_clusters=[]",
            "eval.suites=[builtin]",
        ]  # fmt: skip

    whole = torchrun(*args(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "cut"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", *args(out)]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        metrics, deadline = out / "quickstart" / "metrics.jsonl", time.time() + 300
        while time.time() < deadline:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        rank1 = _rank_pid(proc.pid, 1)
        assert rank1 is not None
        os.kill(rank1, signal.SIGTERM)  # rank 1 only; rank 0 gets no signal
        _, err = proc.communicate(timeout=300)
    finally:  # a hang or a failed assertion: torchrun and its workers go too
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode != 0  # torchrun reports the ranks' exit code 130
    run = out / "quickstart"
    (checkpoint,) = list((run / "checkpoints").glob("step-*"))
    stopped = int(checkpoint.name.split("-")[1])
    assert 3 <= stopped < 200 and not (run / "final").exists()
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert logged[-1] == stopped  # rank 0 stopped at the step rank 1 did
    assert err.count("interrupted after step") == 1  # said once, by the main process

    done = torchrun(*args(out), "train.resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(tmp_path / "whole" / "quickstart" / "final" / "adapter_model.safetensors")
    b = load_file(run / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), key


def test_barrier_timeout_is_the_recipes(tmp_path):
    """train.barrier_timeout_min reaches the process group: with 0.05 minutes a barrier that the
    other rank reaches 20 s late fails after about 3 s (and with the default it would wait)."""
    script = tmp_path / "barrier.py"
    script.write_text(
        "import sys, time\n"
        "from instill.config import load_recipe\n"
        "from instill.recipe import make_accelerator\n"
        "recipe = load_recipe(None, ['data.builtin.seed=0', 'train.barrier_timeout_min=0.05'])\n"
        "acc = make_accelerator(recipe)\n"
        "if acc.process_index == 1:\n"
        "    time.sleep(20)\n"
        "t = time.time()\n"
        "try:\n"
        "    acc.wait_for_everyone()\n"
        "    print(acc.process_index, 'passed')\n"
        "except RuntimeError:\n"
        "    print(acc.process_index, 'timeout', round(time.time() - t))\n"
    )
    proc = torchrun(str(script))
    assert "0 timeout 3" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_ddp_kl_to_base_when_one_process_has_replay_rows(default_source, tmp_path):
    """Data parallel, LoRA with train.kl_to_base, replay rows placed as in test_fsdp's test of
    the same name (rank 1 alone, both, rank 0 alone, neither): trains as one process does, and
    metrics.jsonl logs the KL over both processes' replay positions, the one-process value."""
    out = tmp_path / "kl.json"
    options = {"steps": 4, "method": "lora", "kl": 0.5}
    runs = [{"out": str(out), "per_device": 1, "run_dir": str(tmp_path / "two"), **options}]
    run_worker(default_source.path, out, runs, timeout=300)
    two = load(out)
    one = run(default_source.path, 2, run_dir=str(tmp_path / "one"), **options)
    assert_same_training(two, one)
    assert sorted(one["kl"]) == [1, 2, 3] and one["kl"][2] > 1e-5
    logged = {int(step): kl for step, kl in two["kl"].items()}  # (JSON's keys are strings)
    assert logged.keys() == one["kl"].keys()
    for step, value in one["kl"].items():
        assert abs(logged[step] - value) <= 2e-6, step
