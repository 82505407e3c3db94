"""Round a tuned tensor onto its base tensor's own quantisation grid, stochastically.

A LoRA update is usually smaller than half a 4-bit step. Rounding the tuned weights to the
nearest grid point then puts almost every weight back where the base had it, and the tuning is
gone (a fresh q4_1 requantisation does the same: the tuned block's range is the base block's,
so its grid is the base's grid). Rounding up with probability equal to the fractional position
instead keeps every weight right in expectation: the update survives as a change in the share
of weights on each side, and the rounding noise, independent from weight to weight, averages
out over the hundreds of inputs each output sums. Same bytes, same size as the base tensor.

    block: scale d (and offset m) kept from the base;  t = (w' - m) / d
    q = floor(t) + [u < t - floor(t)],  u ~ U(0, 1) seeded by the tensor's name
Block layouts: q4_0 (d, 16 bytes of nibbles, value d(q-8)), q4_1 (d, m, nibbles, value dq+m),
q8_0 (d, 32 int8, value dq).
"""

from __future__ import annotations

import zlib

import gguf
import numpy as np

T = gguf.GGMLQuantizationType
SUPPORTED = (T.Q4_0, T.Q4_1, T.Q8_0)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at : at + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(q: np.ndarray) -> np.ndarray:
    q = q.astype(np.uint8)
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def regrid(raw: np.ndarray, qtype: T, tuned: np.ndarray, name: str) -> np.ndarray:
    """The base tensor's bytes `raw` with every block's values re-rounded to hold `tuned`."""
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = raw.reshape(-1, size).copy()
    x = tuned.reshape(-1, 32).astype(np.float32)
    d = _f16(blocks, 0)
    m = _f16(blocks, 2) if qtype == T.Q4_1 else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(d == 0, 0.0, (x - m) / d).astype(np.float32)
    if qtype == T.Q4_0:
        t += 8.0
    low = np.floor(t)
    u = np.random.default_rng(zlib.crc32(name.encode())).random(t.shape, dtype=np.float32)
    q = low + (u < t - low)
    if qtype == T.Q4_0:
        blocks[:, 2:] = _nibbles(np.clip(q, 0, 15))
    elif qtype == T.Q4_1:
        blocks[:, 4:] = _nibbles(np.clip(q, 0, 15))
    elif qtype == T.Q8_0:
        blocks[:, 2:] = np.clip(q, -128, 127).astype(np.int8).view(np.uint8)
    else:
        raise ValueError(f"no stochastic regrid for {qtype.name}")
    return blocks.reshape(raw.shape)
