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


def test_two_processes_match_one(default_source, tmp_path):
    out = tmp_path / "ddp.json"
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(HERE / "ddp_worker.py"),
            default_source.path,
            "2",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    one = run(default_source.path, 4, None)
    assert two["world"] == 2 and one["world"] == 1
    assert two["tokens"] == one["tokens"]
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-4)
    for name, value in one["params"].items():
        assert two["params"][name] == pytest.approx(value, rel=1e-4, abs=1e-4), name
