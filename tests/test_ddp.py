"""Distributed data parallel on CPU (gloo): 2 processes at batch 2 train exactly like 1 process
at batch 4 — same data per step, same token-normalised loss, same weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ddp_worker import run

HERE = Path(__file__).resolve().parent


def torchrun(*args: str, **env: str) -> subprocess.CompletedProcess:
    """Two CPU processes (one thread each, so they do not fight over the 2 cores)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *args,
    ]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_two_processes_match_one(default_source, tmp_path, compile):
    """Compiled: each process compiles its own decoder layers inside DDP's wrapper, and the
    gradients DDP averages are still those of one big batch."""
    out = tmp_path / "ddp.json"
    args = [str(HERE / "ddp_worker.py"), default_source.path, "2", str(out)]
    proc = torchrun(*args, *(["compile"] if compile else []), PYTHONPATH=str(HERE))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    one = run(default_source.path, 4, None, compile=compile)
    assert two["world"] == 2 and one["world"] == 1
    assert two["tokens"] == one["tokens"]
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-4)
    for name, value in one["params"].items():
        assert two["params"][name] == pytest.approx(value, rel=1e-4, abs=1e-4), name


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
