"""train.shard: fsdp — torch's FSDP2 (`fully_shard`) over the training loop's processes.

Each process keeps 1/N of every weight, gradient and optimiser state; a decoder layer's full
weights exist only while it runs. The layers are sharded one by one (their class is read from the
model: `_no_split_modules`, or transformers' decoder-layer class), then instill's loss wrapper as
the root, which holds the embeddings, final norm and head that the wrapper calls directly.

The model the caller passed in stays a plain module: training runs on a twin that shares its
parameters until they are sharded, after which the caller's parameters are emptied. Checkpoints,
best/ and the end of training gather full weights (and optimiser state, in the numbered format of
`optimizer.state_dict()`) into the caller's model, so every file is written as a one-process run
writes it, and chat, export and resume read them unchanged.

Gradients: FSDP2 averages over processes (reduce-scatter), as DDP does; the loop's loss scale
multiplies the process count back in either way (`loop.loss_scale`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

from instill.errors import InstillError

PREFIX = "model."  # the wrapper's attribute holding the model: the root's names start with it


def wanted(cfg, acc) -> bool:
    """FSDP is used when asked for and there is more than one process to shard over."""
    return cfg.shard == "fsdp" and acc.num_processes > 1


def check(cfg, evaluator) -> None:
    """What FSDP cannot do here, said before any work."""
    if cfg.compile:
        raise InstillError(
            "train.shard: fsdp with train.compile: true is not supported (the sharded layers "
            "are not compiled); set train.compile: false, or train.shard: none"
        )
    if evaluator is not None:
        raise InstillError(
            "train.shard: fsdp with eval.during_training: the in-training evaluation runs on the "
            "main process alone, and a sharded model needs every process for each forward; "
            "unset eval.during_training (the validation loss still runs), or use train.shard: none"
        )


def layer_classes(model: torch.nn.Module) -> tuple[type, ...]:
    """The decoder-layer classes of the transformers model inside `model` (plain or peft)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    found = {type(m) for m in base.modules() if type(m).__name__ in names}
    if not found:
        found = {type(m) for m in base.modules() if isinstance(m, GradientCheckpointingLayer)}
    if not found:
        raise InstillError(
            f"train.shard: fsdp: found no decoder layers in {type(base).__name__} to shard "
            "(no _no_split_modules); use train.shard: none"
        )
    return tuple(found)


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Clip sharded gradients by the norm of the whole gradient: each process's partial norm
    is summed over processes before the clip factor is taken."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    # the factor as torch's clip_grads_with_norm_ computes it, applied as a number: that
    # function's own multiply gave sharded gradients a different clip than one process's
    # (test_fsdp's LoRA run, which clips, tells them apart)
    factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0).item()
    if factor < 1.0:
        for g in grads:
            g.mul_(factor)
    return norm


class Sharded:
    """The FSDP twin of `model` and its loss wrapper; `model` itself is emptied by `start`."""

    def __init__(self, model: torch.nn.Module, make_wrapper):
        from torch.distributed.fsdp import fully_shard

        self.model = model
        params = dict(model.named_parameters())
        self._kinds = {n: (p.dtype, p.device) for n, p in params.items()}
        # the twin shares the parameters (not copied; fully_shard then builds the shards from them)
        twin = copy.deepcopy(model, memo={id(p): p for p in params.values()})
        self.twin = twin
        classes = layer_classes(twin)
        self.layers = [m for m in twin.modules() if isinstance(m, classes)]
        for layer in self.layers:
            fully_shard(layer)
        self.root = make_wrapper(twin)
        fully_shard(self.root)

    # -- state dicts -----------------------------------------------------------------------
    def _options(self, cpu_offload: bool):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)

    def _numbered(self, optimizer, state: dict) -> dict:
        """A gathered optimiser state keyed by parameter name, in `optimizer.state_dict()`'s
        numbered form (the numbers follow the parameter groups' order, as torch's own)."""
        names = {id(p): n for n, p in self.root.named_parameters()}
        index: dict[str, int] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                index[names[id(p)]] = len(index)
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
        return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}

    def _named(self, optimizer, state: dict) -> dict:
        """The reverse of `_numbered`, for set_optimizer_state_dict."""
        names = {id(p): n for n, p in self.root.named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
        return {"state": {order[i]: s for i, s in state["state"].items()}, "param_groups": groups}

    def loader(self, optimizer):
        """What `restore_checkpoint` loads a checkpoint's optimiser state through."""
        sharded = self

        class _Loader:
            def load_state_dict(self, state: dict) -> None:
                from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

                named = sharded._named(optimizer, state)
                options = sharded._options(cpu_offload=False)
                set_optimizer_state_dict(sharded.root, optimizer, named, options=options)

        return _Loader()

    def _fill(self, weights: dict) -> None:
        for name, p in self.model.named_parameters():
            p.data = weights[PREFIX + name]

    def _empty(self) -> None:
        for name, p in self.model.named_parameters():
            dtype, device = self._kinds[name]
            p.data = torch.empty(0, dtype=dtype, device=device)

    # -- the loop's hooks ------------------------------------------------------------------
    def start(self) -> torch.nn.Module:
        """The caller's weights (as loaded, or as resumed into it) go into the shards; the
        caller's own copy is emptied. Returns the wrapper to train."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        full = {PREFIX + n: t for n, t in self.model.state_dict().items()}
        set_model_state_dict(self.root, full, options=self._options(cpu_offload=False))
        del full
        self._empty()
        return self.root

    @contextlib.contextmanager
    def full(self, optimizer=None, main: bool = True) -> Iterator[object]:
        """Every process must enter. Inside, the caller's model holds the full weights on the
        main process (`main`), and the value is an object whose state_dict() is the optimiser's
        full state; after it, the caller's model is emptied again."""
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = self._options(cpu_offload=True)  # the main process gets it, in host memory
        weights = get_model_state_dict(self.root, options=options)
        state = None
        if optimizer is not None:
            state = get_optimizer_state_dict(self.root, optimizer, options=options)
        if main:
            self._fill(weights)
            if state is not None:
                state = self._numbered(optimizer, state)
        try:
            yield _Saved(state)
        finally:
            if main:
                self._empty()

    def finish(self) -> None:
        """Every process's copy of the caller's model gets the trained full weights back."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        weights = get_model_state_dict(self.root, options=self._options(cpu_offload=False))
        self._fill({k: v.detach() for k, v in weights.items()})

    def local_fraction(self) -> dict[str, float]:
        """Each parameter's share of its elements held by this process (the check that weights,
        frozen ones too, are sharded)."""
        from torch.distributed.tensor import DTensor

        out = {}
        for name, p in self.root.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            out[name.removeprefix(PREFIX)] = local.numel() / p.numel()
        return out


class _Saved:
    def __init__(self, state):
        self._state = state

    def state_dict(self):
        return self._state
