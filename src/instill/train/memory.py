"""Keep glibc's heap from holding on to freed activation memory.

glibc serves an allocation from the heap unless it is larger than the mmap threshold, and it
raises that threshold (up to 32 MiB, glibc's ceiling) each time a large mmapped block is freed.
After the first training step, activation tensors of a few MiB therefore come from the heap, and
because their sizes change with every batch shape the heap fragments and is never returned, so
peak memory grows well past what one step needs. A fixed threshold puts every block of at least
64 KiB in its own mapping, given back on free.

That costs speed: every activation then comes as fresh pages the kernel must fault in and zero.
`train.mmap_threshold_mb` moves the threshold, trading memory for speed. The README's Benchmarks
have the measurements (bench/peak_memory.py for memory, bench/train_throughput.py for speed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
THRESHOLD = 64 * 1024


def fix_mmap_threshold(threshold: int = THRESHOLD) -> bool:
    """Set glibc's mmap threshold (which also stops its dynamic growth). Returns whether it was
    set: False off Linux or on a C library without mallopt (musl), where it does not apply."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1


def checkpointed_layers(n: int, fraction: float) -> list[int]:
    """Which of n decoder layers recompute their activations in backward: round(n * fraction)
    of them, spread evenly (layer i when floor((i + 1) f) > floor(i f))."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return [i for i in range(n) if int((i + 1) * fraction + 1e-9) > int(i * fraction + 1e-9)]


def decoder_layers(model) -> list:
    """The repeated decoder blocks of a transformers model: the unit of gradient checkpointing
    and of regional compilation (`train/compiled.py`)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_checkpointing(model, setting: bool | float) -> list[int]:
    """Turn on gradient checkpointing for all decoder layers (True) or a fraction of them, and
    return the indices of the checkpointed layers. The others keep their activations: each
    layer left out costs its activation memory and saves one recomputed forward."""
    if setting is False:
        return []
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    layers = decoder_layers(model)
    keep = checkpointed_layers(len(layers), 1.0 if setting is True else float(setting))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in keep
    return keep
