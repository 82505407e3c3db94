"""What the multi-process tests share (test_ddp.py, test_fsdp.py): starting CPU processes under
torchrun with a time limit, reading what dist_worker.py recorded, and comparing a 2-process run
with the 1-process run it must equal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "dist_worker.py")


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(proc.name))
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL to `pid` and all its descendants. (torchrun's workers lead sessions of their own,
    so killing its process group leaves them; and a worker hung in a collective ignores SIGTERM,
    which the training loop turns into a request to stop after the step.)"""
    tree, todo = [pid], [pid]
    while todo:
        found = children(todo.pop())
        tree += found
        todo += found
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch(command: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """`command`, one thread per process (they share the cores). Past `timeout` it is killed
    with every process it started (collectives that do not match hang rather than fail), and
    the test fails saying so."""
    if "PYTHONPATH" in env and os.environ.get("PYTHONPATH"):  # before the caller's (src/ to test)
        env["PYTHONPATH"] += os.pathsep + os.environ["PYTHONPATH"]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"no result after {timeout:.0f} s (a hang?)\n{out[-2000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def torchrun(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """`args` (a script or -m module, and its arguments) in two CPU processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", *args]  # fmt: skip
    return launch(command, timeout, **env)


def run_worker(tokenizer: str, out: Path, runs: list[dict], timeout: float = 600) -> None:
    """dist_worker.py's `runs` (keyword arguments of its run(), each with its own "out") in two
    processes; fails with the processes' output when they did not all succeed."""
    proc = torchrun(WORKER, tokenizer, json.dumps(runs), timeout=timeout, PYTHONPATH=str(HERE))
    assert proc.returncode == 0, proc.stderr[-3000:]


def load(out: str | Path) -> dict:
    """What dist_worker.run recorded at `out` (its main process's files): the record, with the
    final parameters and the first step's gradients as tensors."""
    from safetensors.torch import load_file

    record = json.loads(Path(out).read_text())
    record["params"] = load_file(f"{out}.params.safetensors")
    grads = Path(f"{out}.grads.safetensors")
    record["grads"] = load_file(grads) if grads.is_file() else {}
    return record


def ranks(out: str | Path, world: int = 2) -> list[dict]:
    """Each process's own record of its decisions (validation losses, best step, early stop)."""
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(world)]


def worst_grad(two: dict, one: dict, factor: float = 1.0) -> float:
    """The largest element difference between factor x two's first gradients and one's."""
    assert two["grads"].keys() == one["grads"].keys()
    return max((factor * two["grads"][k] - g).abs().max().item() for k, g in one["grads"].items())


# The share of a tensor's elements that assert_same_weights lets AdamW's rounding flips have.
FLIPS = 0.01


def assert_same_weights(a: dict, b: dict, start: dict, rel: float = 1e-3) -> None:
    """Two runs' final weights are the same training's: per tensor, the difference is at most
    `rel` of how far b's tensor moved from `start` (a tensor that did not move must be equal),
    leaving out its FLIPS share of worst elements. AdamW divides each gradient by its own running
    magnitude, so an element whose gradient is near zero turns a ~1e-8 difference in summation
    order into a visible step (seen: one element of 256 off by 4e-5 after 3 steps at lr 1e-2,
    the tensor off by 4e-4 of its movement; five elements of 1024 off by up to 1.6e-4, the
    tensor by 1.2e-3 of its movement, the other 1019 by under 1e-5). A real difference moves
    whole tensors: one token fewer in one rejected reply of 12 pairs moved one by 5e-2."""
    assert a.keys() == b.keys()
    for name, value in b.items():
        assert a[name].shape == value.shape, name
        moved = (value.double() - start[name].double()).norm().item()
        off = (a[name].double() - value.double()).flatten().abs().sort().values
        kept = off[: off.numel() - int(FLIPS * off.numel())]
        diff = kept.norm().item()
        assert diff <= rel * moved, (name, diff, moved, off.norm().item())


def assert_same_training(two: dict, one: dict, min_tensors: int = 8) -> None:
    """2 processes trained as 1: the same tokens, the first step's gradients to 1e-6, the losses
    to 1e-4 and the final weights as assert_same_weights says (to 1e-3 of each tensor's
    movement from the start both runs share)."""
    assert two["world"] == 2 and one["world"] == 1
    assert two["tokens"] == one["tokens"]
    assert len(two["grads"]) >= min_tensors
    assert worst_grad(two, one) <= 1e-6
    assert max(abs(a - b) for a, b in zip(two["losses"], one["losses"], strict=True)) <= 1e-4
    assert_same_weights(two["params"], one["params"], one["start"])


def assert_halved(two: dict, one: dict) -> None:
    """The negative control (the loss scale without the process count): DDP and FSDP average
    gradients over processes, so they come out halved, and the comparison must see it."""
    worst, halved = worst_grad(two, one), worst_grad(two, one, factor=2.0)
    assert worst > 1e-4 and halved <= 1e-6, (worst, halved)
