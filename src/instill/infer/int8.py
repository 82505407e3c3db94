"""Int8 weight-only decoding on CPU (`--int8` of chat, generate and serve).

    load_for_inference (an adapter merged first) -> for_int8_decoding(model)
      -> every nn.Linear (the output projection too; never the embedding) becomes an Int8Linear:
         int8 weights, one float scale per output channel (symmetric, max |w| / 127)
      -> Int8Linear.forward: torch's CPU int8 weight-only product
         (aten._weight_int8pack_mm: activations stay float, the weights widen inside the kernel)

Why: one decoded token reads every weight once, so a single stream on CPU is bound by the bytes
of the weights (540 MB for SmolLM2-135M in float32, a quarter of that in int8). The output
projection is tied to the embedding in SmolLM2: quantising it makes an untied int8 copy (28 MB;
the embedding keeps its float32 rows). bench/int8_decode.py measured it worth that: it is a
fifth of the weights' bytes, and without it a decode step could not get 2x faster even with
int8 products at a quarter of float32's time (a third of a float32 step is outside the Linear
layers), while keeping it in float32 kept only 3 more of 64 replies identical to float32's.

Whether the kernel is faster than float32 is measured, not guessed from the CPU: on an AVX2 CPU
(2026-12-02) and on an AVX-512 one (2026-12-04) its Linear layers took 2.6x float32's time
(0.44x the decode speed both times), so `int8_unavailable` times one decode-shaped product
both ways and refuses unless int8 is the faster (README, Generation). Evaluation never
comes here: it scores the model as trained.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from instill.errors import InstillError


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 [out, in] with float scales [out]: y = (x @ q.T) * s + b."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("weight_int8", q.contiguous())
        # the kernel wants the scales in the activations' dtype
        self.register_buffer("scales", scales.to(weight.dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, as a float matrix (tests, the bench)."""
        return self.weight_int8.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # the kernel takes 2-D activations only
        y = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.weight_int8, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module, *, lm_head: bool = True) -> int:
    """Replace the model's nn.Linear layers by Int8Linear in place (the output projection only
    with `lm_head`: a tied one becomes an untied int8 copy); returns how many were replaced.
    Embeddings are never Linear: untouched."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or (child is head and not lm_head):
                continue
            setattr(parent, name, Int8Linear(child.weight, child.bias))
            replaced += 1
    return replaced


def _median_seconds(fn, reps: int) -> float:
    import time

    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


@functools.cache
def int8_speedup(rows: int = 1, inner: int = 576, outer: int = 1536, reps: int = 30) -> float:
    """float32's time over the int8 kernel's for one [rows, inner] x [inner, outer] product (a
    decode step's MLP shape in SmolLM2-135M), medians of interleaved repeats at this process's
    thread count: above 1, int8 is faster here. ~70 ms of work, once per process (the check
    before the model loads and the one at the swap read the same measurement)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(outer, inner, generator=g)
    x = torch.randn(rows, inner, generator=g)
    layer = Int8Linear(w, None)
    with torch.inference_mode():
        fp32 = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
        int8 = lambda: layer(x)  # noqa: E731
        fp32(), int8()  # warm both
        a, b = [], []
        for _ in range(3):
            a.append(_median_seconds(fp32, reps))
            b.append(_median_seconds(int8, reps))
    return sorted(a)[1] / max(sorted(b)[1], 1e-9)


def int8_unavailable() -> str | None:
    """Why int8 weight-only decoding would not be faster than float32 on this machine, or None:
    one decode-shaped product timed both ways (before any model loads), since the CPU's name
    does not tell (torch's kernel took 2.6x float32's time on an AVX2 and an AVX-512 CPU)."""
    speedup = int8_speedup()
    if speedup > 1.0:
        return None
    return (
        f"torch {torch.__version__.split('+')[0]}'s int8 weight-only kernel is slower than "
        f"float32 on this CPU ({torch.backends.cpu.get_cpu_capability()}): a decode-shaped "
        f"product ([1, 576] x [576, 1536]) took {1 / speedup:.1f}x float32's time, measured just "
        "now, so int8 would decode slower (README, Generation); leave it off"
    )


def for_int8_decoding(model: nn.Module, option: str = "--int8") -> nn.Module:
    """The loaded model (adapter merged) with int8 weights, or a clear error where int8 cannot
    apply: a model on a GPU, a 4-bit (QLoRA) model, weights that are not float, a CPU without
    the kernel. `option` names the setting in the errors."""
    param = next(model.parameters())
    if param.device.type != "cpu":
        raise InstillError(
            f"{option}: int8 weight-only decoding runs on CPU, and the model is on "
            f"{param.device}; on a GPU leave {option} off"
        )
    if _is_four_bit(model):
        raise InstillError(
            f"{option}: this model keeps its adapter unmerged on a 4-bit base (a QLoRA run); "
            "int8 cannot requantise 4-bit weights: leave it off"
        )
    if not param.dtype.is_floating_point:
        raise InstillError(f"{option}: the model's weights are {param.dtype}, not float")
    require_int8_kernel(option)
    quantize_int8(model)
    return model


def require_int8_kernel(option: str = "--int8") -> None:
    """Refuse `option` on a CPU whose kernel would be slower (before the slow model load)."""
    why = int8_unavailable()
    if why is not None:
        raise InstillError(f"{option}: {why}")


def _is_four_bit(model: nn.Module) -> bool:
    # load_for_inference merges every adapter except a 4-bit base's (bitsandbytes Linear4bit)
    return hasattr(model, "peft_config") or any(
        type(m).__name__ == "Linear4bit" for m in model.modules()
    )
