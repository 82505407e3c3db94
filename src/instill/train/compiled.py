"""`train.compile`: each decoder layer compiled with torch.compile for the length of training.

Why it pays on a CPU: eager PyTorch runs RMSNorm, rotary embeddings, SiLU x up, LoRA's
scale-and-add and every residual add as separate kernels, each writing a fresh full-size tensor,
which on a small machine costs as much time as the matrix products (page faults) and holds
activations that a fused kernel never materialises. Inductor fuses those chains into a few C++
loops, and its partitioner recomputes cheap pointwise results in backward instead of saving
them. The README's Benchmarks have the measured speed and memory (bench/train_throughput.py).

Only the decoder layers are compiled ("regional" compilation): they share one graph, so the
compile cost is one layer's, paid once (cold, or much less from inductor's cache),
and the rest of the model (embedding, our supervised-only loss, peft's wrappers) stays eager.
Shapes are dynamic from the start, so length-grouped batches and the short last batch of an
epoch do not recompile. After training the layers are eager again: generation, evaluation and
export never run through graphs built for training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from instill.errors import InstillError
from instill.train.memory import decoder_layers


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_compiler(device: torch.device) -> None:
    """A clear error, before any work, when torch.compile cannot build kernels for `device`."""
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
        except ImportError:  # a torch without this helper: let inductor report it
            return
        try:
            get_cpp_compiler()
        except Exception as e:
            raise InstillError(
                "train.compile: torch.compile needs a C++ compiler on the CPU and found none "
                f"({_first_line(e)}); install g++ "
                "(or set CXX), or set train.compile: false"
            ) from None
    elif device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            raise InstillError(
                "train.compile: torch.compile needs triton on CUDA devices; pip install triton "
                "(it ships with CUDA builds of torch), or set train.compile: false"
            ) from None


@contextlib.contextmanager
def compiled_layers(model: torch.nn.Module, enabled: bool) -> Iterator[list[torch.nn.Module]]:
    """Compile every decoder layer of `model` inside the block; yield the compiled layers."""
    if not enabled:
        yield []
        return
    layers = decoder_layers(model)
    if not layers:
        raise InstillError(
            f"train.compile: found no decoder layers to compile in {type(model).__name__}; "
            "set train.compile: false"
        )
    check_compiler(next(model.parameters()).device)
    for layer in layers:
        layer.compile(dynamic=True)
    try:
        yield layers
    finally:
        for layer in layers:
            # nn.Module.compile() has no public undo; this is the attribute it sets.
            layer._compiled_call_impl = None


def eager():
    """A block in which compiled code runs eagerly: validation and in-training evaluation run
    under no_grad with other shapes, which would otherwise compile graphs of their own."""
    return torch.compiler.set_stance("force_eager")


def is_compile_failure(e: Exception) -> bool:
    """Whether `e` is torch.compile's report that its backend (inductor) could not build a
    graph, as opposed to an error of the model itself."""
    from torch._dynamo.exc import BackendCompilerFailed

    return isinstance(e, BackendCompilerFailed)


def compile_error(e: Exception) -> InstillError:
    return InstillError(
        f"train.compile: torch.compile failed on this model ({_first_line(e)[:300]}); set "
        "train.compile: false to train it eagerly"
    )
