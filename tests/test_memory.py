"""glibc keeps freed activation-sized blocks in its heap unless the mmap threshold is fixed."""

import subprocess
import sys

import pytest

PROBE = """
import sys, torch
from instill.train.memory import fix_mmap_threshold
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
big = torch.ones(4 * 2**20)  # 16 MiB: mmapped; freeing it raises glibc's dynamic threshold
del big
x = torch.ones(2 * 2**20)  # 8 MiB: from the heap unless the threshold is fixed
before = rss()
del x
print(before - rss())
"""


def given_back_mb(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_fixed_mmap_threshold_gives_freed_activations_back():
    assert given_back_mb("fixed") >= 7.5
    # negative control: with glibc's dynamic threshold the 8 MiB stay in the process
    assert given_back_mb("dynamic") < 1.0
