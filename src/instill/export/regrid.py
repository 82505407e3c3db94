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

gptq() rounds onto the same grid by error compensation instead: deterministic, and it keeps
the layer's outputs on calibration inputs rather than each weight in expectation. --quant auto
does not offer it yet: its planner costs errors per weight (a diagonal Fisher), which cannot
see errors that cancel across correlated inputs, and the swap is not measured end to end.
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
    return _pack(blocks, qtype, low + (u < t - low)).reshape(raw.shape)


def _pack(blocks: np.ndarray, qtype: T, q: np.ndarray) -> np.ndarray:
    """`blocks` (one row per block, scales kept) with their values replaced by the integers q."""
    if qtype == T.Q4_0:
        blocks[:, 2:] = _nibbles(np.clip(q, 0, 15))
    elif qtype == T.Q4_1:
        blocks[:, 4:] = _nibbles(np.clip(q, 0, 15))
    elif qtype == T.Q8_0:
        blocks[:, 2:] = np.clip(q, -128, 127).astype(np.int8).view(np.uint8)
    else:
        raise ValueError(f"no regrid for {qtype.name}")
    return blocks


def gptq(raw: np.ndarray, qtype: T, tuned: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """The base tensor's bytes `raw` with every block's values re-rounded, by error-compensating
    rounding (GPTQ), to make the layer's outputs on the calibration inputs as close to the
    tuned layer's as the base's grid allows. Columns are rounded in order to the nearest grid
    point of their block (the base's scale and offset), and each column's rounding error is
    pushed onto the columns not rounded yet through the inverse of `hessian` (the inputs'
    second moment, in x), so later weights make up for earlier ones.
    Nearest rounding alone would put a small update back on the base's values; here the
    update survives as what the errors add up to in the outputs."""
    import torch

    size = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = raw.reshape(-1, size).copy()
    rows, cols = tuned.shape
    d = torch.from_numpy(_f16(blocks, 0).reshape(rows, cols // 32))
    m = torch.from_numpy(
        _f16(blocks, 2).reshape(rows, cols // 32) if qtype == T.Q4_1 else np.zeros_like(d.numpy())
    )
    shift, lo, hi = {T.Q4_0: (8.0, 0, 15), T.Q4_1: (0.0, 0, 15), T.Q8_0: (0.0, -128, 127)}[qtype]
    w = torch.from_numpy(tuned.astype(np.float32)).clone()
    h = torch.from_numpy(hessian.astype(np.float64)).clone()
    dead = torch.diag(h) == 0  # an input never seen: nothing to keep, nothing to push onto
    h[dead, dead] = 1.0
    h += 0.01 * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)  # as GPTQ damps
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    u = u.float()
    q = torch.zeros(rows, cols)
    step = 128  # columns updated together; the rest get the batch's errors at once
    for a in range(0, cols, step):
        b = min(a + step, cols)
        part, errs = w[:, a:b].clone(), torch.zeros(rows, b - a)
        for i in range(b - a):
            j = a + i
            scale, offset = d[:, j // 32], m[:, j // 32]
            safe = torch.where(scale == 0, torch.ones_like(scale), scale)
            qi = torch.clamp(torch.round((part[:, i] - offset) / safe + shift), lo, hi)
            qi = torch.where(scale == 0, torch.full_like(qi, shift), qi)
            q[:, j] = qi
            err = (part[:, i] - (scale * (qi - shift) + offset)) / u[j, j]
            part[:, i:] -= err[:, None] * u[j, j:b][None, :]
            errs[:, i] = err
        w[:, b:] -= errs @ u[a:b, b:]
    return _pack(blocks, qtype, q.reshape(-1, 32).numpy()).reshape(raw.shape)
