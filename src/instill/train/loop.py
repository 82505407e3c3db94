"""One training loop for full fine-tuning and adapters, for one CPU process or many GPU processes.

    prep = Prepared.build(...)       model ready to train: master weights, optimiser, schedule,
                                     SupervisedLM wrapped by accelerate (DDP); restore, save
    for each optimiser step:         (in train(), the step itself inline)
        take grad_accum micro-batches; count their supervised tokens (summed over processes)
        for each micro-batch: loss = loss_sum * world_size / global_supervised_tokens; backward
        clip, optimizer.step(), schedule
        _log_step      metrics.jsonl + TensorBoard (train/logs.py), every log_every steps
        _validate      validation loss, evaluator score, checkpoints/best, early stopping
        _checkpoint    checkpoints/step-N on save_every or a stop signal (on_main)

Dividing every micro-batch's loss *sum* by the token count of the whole accumulated global batch
makes the gradient identical whether a batch is split across accumulation steps or processes.
"""

from __future__ import annotations

import contextlib
import math
import random
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from instill.config import TrainConfig
from instill.console import console
from instill.data.dataset import Row, length_grouped_batches
from instill.data.packing import collate_packed, pack_best_fit
from instill.errors import InstillError
from instill.models.load import copy_room, cpu_has_native_bf16
from instill.rundir import RunDir
from instill.train import shard
from instill.train.checkpoint import (
    load_weights,
    restore_checkpoint,
    save_checkpoint,
    save_model_dir,
)
from instill.train.compiled import compile_error, compiled_layers, eager, is_compile_failure
from instill.train.logs import TrainLogs
from instill.train.loss import SupervisedLM
from instill.train.memory import enable_checkpointing, fix_mmap_threshold
from instill.train.objective import Figures, cached_reference, is_replay, make_objective

if TYPE_CHECKING:
    from accelerate import Accelerator

T = TypeVar("T")


@dataclass
class TrainResult:
    steps: int = 0
    wall_s: float = 0.0
    tokens: int = 0  # real (non-padding) tokens processed
    trained_tokens: int = 0  # supervised tokens
    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    interrupted: bool = False  # stopped by SIGINT/SIGTERM after writing a checkpoint
    stopped_early: bool = False  # validation loss stopped improving (early_stopping_patience)
    best: tuple[int, float] | None = None  # (step, validation loss) of the lowest loss
    best_score: tuple[int, float] | None = None  # (step, score) with an evaluator: checkpoints/best
    peak_mem_mb: float = 0.0
    total_steps: int = 0  # the steps this run was set to take
    autocast: str | None = None  # "bfloat16" when the matrix products ran under autocast

    def count(self, step: int, loss: float, supervised: int, real: int) -> None:
        """One optimiser step done: its loss and (global) token counts."""
        self.losses.append(loss)
        self.steps = step
        self.tokens += real
        self.trained_tokens += supervised

    def continue_from(self, state: dict) -> None:
        """Pick up a checkpoint's trainer state (restore_checkpoint's return)."""
        self.steps, self.tokens = state["step"], state["tokens"]
        self.trained_tokens, self.losses = state["trained_tokens"], list(state["losses"])
        self.val_losses = [tuple(v) for v in state.get("val_losses", [])]
        self.best = tuple(state["best"]) if state.get("best") else None
        self.best_score = tuple(state["best_score"]) if state.get("best_score") else None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "wall_s": round(self.wall_s, 3),
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "tokens_per_s": round(self.tokens_per_s, 2),
            "first_loss": self.losses[0] if self.losses else None,
            "final_loss": self.losses[-1] if self.losses else None,
            "final_val_loss": self.val_losses[-1][1] if self.val_losses else None,
            "best_step": self.best[0] if self.best else None,
            "best_val_loss": self.best[1] if self.best else None,
            "best_score_step": self.best_score[0] if self.best_score else None,
            "best_score": self.best_score[1] if self.best_score else None,
            "stopped_early": self.stopped_early,
            "peak_mem_mb": round(self.peak_mem_mb, 1),
            "autocast": self.autocast,
        }


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Batcher:
    """This process's micro-batches, epoch after epoch, reshuffled each epoch by (seed, epoch).

    Units are rows (length-grouped) or, with packing, packed sequences of pack_length. Global
    batches of batch_size x processes units are formed exactly as one process would form them
    with that batch size, then dealt out across processes, so N processes at batch B see the
    same data in the same steps as one process at batch N x B.
    """

    def __init__(
        self,
        rows: list[Row],
        cfg: TrainConfig,
        pad_id: int,
        rank: int = 0,
        world: int = 1,
        pack_length: int | None = None,
        objective=None,
    ):
        self.rows, self.cfg, self.pad_id = rows, cfg, pad_id
        self.rank, self.world = rank, world
        self.objective = objective or make_objective(cfg)
        self.bins = pack_best_fit(rows, pack_length) if pack_length else None
        self.per_epoch = len(self._epoch(0))

    def _epoch(self, epoch: int) -> list[list[int]]:
        """Global batches of one epoch; a last batch too small to give every process a unit
        is dropped."""
        size = self.cfg.batch_size * self.world
        if self.bins is None:
            batches = length_grouped_batches(self.rows, size, self.cfg.seed, epoch)
        else:
            order = list(range(len(self.bins)))
            random.Random(f"{self.cfg.seed}:{epoch}").shuffle(order)
            batches = [order[i : i + size] for i in range(0, len(order), size)]
        return [b for b in batches if len(b) >= self.world]

    def stream(self, skip: int = 0) -> Iterator[dict]:
        """Collated micro-batches; the first `skip` are passed over without collating (resume
        lands on the exact micro-batch where the interrupted run stopped, mid-epoch too). Each
        carries "rows", the indices of its rows (named when its loss is not finite)."""
        epoch = 0
        while True:
            for batch in self._epoch(epoch):
                if skip:
                    skip -= 1
                    continue
                idx = batch[self.rank :: self.world]
                if self.bins is None:
                    out = self.objective.collate([self.rows[i] for i in idx], self.pad_id)
                    out["rows"] = idx
                else:
                    bins = [self.bins[i] for i in idx]
                    out = collate_packed(self.rows, bins, self.pad_id)
                    out["rows"] = [i for b in bins for i in b]
                yield out
            epoch += 1

    def total_steps(self) -> int:
        cfg = self.cfg
        if cfg.max_steps is not None:
            return cfg.max_steps
        if self.per_epoch == 0:
            raise InstillError(
                f"{len(self.rows)} training rows cannot give each of {self.world} processes a "
                f"row; use fewer processes"
            )
        return max(1, math.ceil(cfg.epochs * self.per_epoch / cfg.grad_accum))


def low_precision(model: torch.nn.Module) -> torch.dtype | None:
    """bfloat16 or float16 when weights that train are stored in it (full fine-tuning of a model
    loaded in bf16/fp16); None when they are float32 (LoRA adapters are, whatever the base)."""
    found = {p.dtype for p in model.parameters() if p.requires_grad}
    low = found & {torch.bfloat16, torch.float16}
    return next(iter(low)) if low else None


def autocast_to(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast to `dtype` on `device`, or a no-op for None (float32 throughout)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=bool(dtype))


def autocast_dtype(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """The dtype training's forward and backward run under autocast in, or None (float32
    throughout): the trained weights' own dtype when it is half precision (low_precision),
    else bf16 when train.autocast asks for it (auto: on a CPU with native bf16 only; a GPU's
    bf16 comes from model.dtype: auto, which loads the weights in it)."""
    low = low_precision(model)
    if low is not None or cfg.autocast == "fp32":
        return low
    if cfg.autocast == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise InstillError(
                "train.autocast: bf16, but this GPU has no bf16 support; set train.autocast: off"
            )
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def precision_mode(low: torch.dtype | None) -> str:
    """accelerate's name for a mixed precision in `low` (float32 or None: "no")."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(low, "no")


def check_distributed(acc) -> None:
    """instill starts processes through accelerate's data-parallel mode and shards itself
    (train.shard: fsdp, train/shard.py). accelerate's own FSDP and DeepSpeed wrappers would have
    each process write its own shard as if it were the whole model: refused."""
    kind = str(acc.distributed_type).rsplit(".", 1)[-1]
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise InstillError(
            f"accelerate's {kind} mode is not supported yet: instill's checkpoints and final/ "
            "would hold one process's shard, not the model. Launch with "
            "configs/accelerate/ddp.yaml and set train.shard: fsdp in the recipe to shard "
            "weights, gradients and optimiser state across the processes"
        )


def check_precision(acc) -> None:
    """instill runs mixed precision itself (from the weights' dtype); an Accelerator that also
    does (autocast, and for fp16 a second loss scaler) would contradict it."""
    if acc.mixed_precision != "no":
        raise InstillError(
            f"the Accelerator has mixed_precision: {acc.mixed_precision}; instill sets mixed "
            "precision from model.dtype (float32 master weights under autocast when the "
            "weights are bf16/fp16): build it with mixed_precision='no'"
        )


def make_scheduler(optimizer, cfg: TrainConfig, steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
        cfg.schedule
    ]
    warmup = int(round(cfg.warmup_ratio * steps))
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InstillError("nothing to train: every parameter is frozen (check adapter.freeze)")
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def kl_reference(
    model: torch.nn.Module, cfg: TrainConfig, objective=None
) -> torch.nn.Module | None:
    """The frozen model that train.kl_to_base or a preference objective's reference compares
    against: None for a peft model (its adapters are switched off instead) or when nothing needs
    one, else a frozen copy made before training, if one fits."""
    objective = objective or make_objective(cfg)
    live_reference = objective.needs_reference and not cfg.preference.precompute_reference
    if hasattr(model, "disable_adapter") or not (cfg.kl_to_base > 0 or live_reference):
        return None
    import copy

    fits, need, free = copy_room(model)
    device = next(model.parameters()).device
    if not fits and live_reference:
        raise InstillError(
            f"train.objective: {cfg.objective} with adapter.method: full compares against a "
            f"frozen copy of the starting model ({need / 2**30:.1f} GiB) and {device} has "
            f"{free / 2**30:.1f} GiB free; set train.preference.precompute_reference: true (the "
            "reference is scored once before training, no copy kept) or use adapter.method: lora"
        )
    if not fits:
        raise InstillError(
            f"train.kl_to_base: full fine-tuning needs a frozen copy of the base model for the "
            f"KL term ({need / 2**30:.1f} GiB) and {device} has {free / 2**30:.1f} GiB free; use "
            "adapter.method: lora (the base comes from the same weights with the adapters "
            "switched off) or set train.kl_to_base: 0 (replay alone)"
        )
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    rows: list[Row],
    batch_size: int,
    pad_id: int,
    acc=None,
    objective=None,
    figures: Figures | None = None,
) -> float:
    """Mean token loss over `rows` (the same supervised positions as training); with a
    preference `objective` (whose scorer `model` then is: see Prepared.scorer), the mean loss
    per pair, and the pairs' figures summed into `figures`.

    With `acc` of several processes (every one calls this, with the same rows), batches of
    batch_size x processes rows are dealt out as training's are and the loss sums and token
    counts are summed over processes: each scores its share, and all of them get the same
    value, the one-process one (to summation order), so the decisions taken on it (best/, early
    stopping) agree across processes."""
    was_training = model.training
    model.eval()
    # (train.shard: fsdp passes its sharded wrapper; the replay mask is dropped: no KL term)
    supervised = objective is None or objective.name == "sft"
    if supervised:
        lm = model if isinstance(model, SupervisedLM) else SupervisedLM(model)
        objective = make_objective(TrainConfig())
    else:
        lm = model
    device = next(model.parameters()).device
    rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
    total, count = 0.0, 0
    for idx in length_grouped_batches(rows, batch_size * world, seed=0):
        share = idx[rank::world]
        # a process with no row of the last batch still runs a forward, uncounted: a sharded
        # model's forward gathers weights from every process
        batch = objective.collate([rows[i] for i in share or idx[:1]], pad_id)
        skip = ("real_tokens", "replay_mask")
        loss_sum, n = lm(**{k: v.to(device) for k, v in batch.items() if k not in skip})
        if share:
            total, count = total + float(loss_sum), count + int(n)
            if figures is not None:
                figures.add(getattr(lm, "last_figures", None))
    model.train(was_training)
    if world > 1:
        summed = torch.tensor([total, count], dtype=torch.float64, device=device)
        total, count = acc.reduce(summed, reduction="sum").tolist()
    return total / max(count, 1)


def loss_scale(acc, global_tokens: int) -> float:
    """What each process's loss sum is multiplied by before backward. DDP (and FSDP) average
    gradients over processes, so the process count is multiplied back in: the result is the
    sum over every process's supervised tokens divided by their global count."""
    return acc.num_processes / max(global_tokens, 1)


def accumulate(
    acc,
    wrapped,
    micro: list[dict],
    kl: list | None = None,
    amp=None,
    scaler=None,
    objective=None,
    figures: Figures | None = None,
) -> tuple[float, int, int]:
    """Forward and backward over the micro-batches of one optimiser step.

    Each micro-batch's loss sum is divided by the supervised-token count of the whole step,
    summed over processes, so gradients equal those of one big batch. Returns the step's mean
    token loss, its supervised tokens and its real (non-padding) tokens, all global. With
    train.kl_to_base the loss is the cross-entropy alone, and `kl` (a list) receives this
    process's (KL sum, replay positions) of every micro-batch that had replay rows. `amp`: the
    forward's autocast context (mixed precision), `scaler`: fp16's loss scaler. `objective`
    (default: supervised) says what the loss is divided by (its units: supervised tokens, or
    pairs); the module's figures of each micro-batch are summed into `figures`.
    """
    lm = acc.unwrap_model(wrapped)
    if objective is None:
        objective = make_objective(TrainConfig())
    local = torch.tensor(
        [sum(objective.units(b) for b in micro), sum(int(b["real_tokens"]) for b in micro)],
        device=acc.device,
    )
    global_tokens, global_real = (int(x) for x in acc.reduce(local, reduction="sum"))
    scale = loss_scale(acc, global_tokens)
    loss_total = torch.zeros((), device=acc.device)
    for i, batch in enumerate(micro):
        batch = {k: v.to(acc.device) for k, v in batch.items() if k not in ("real_tokens", "rows")}
        if getattr(lm, "kl_weight", 0) > 0 and "replay_mask" not in batch:
            # no replay rows here: the KL's base forward still runs (SupervisedLM._kl), on every
            # process alike, so sharded processes issue the same collectives
            batch["replay_mask"] = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        last = i == len(micro) - 1
        with acc.no_sync(wrapped) if not last else contextlib.nullcontext():
            with amp() if amp is not None else contextlib.nullcontext():
                loss_sum, _ = wrapped(**batch)
            loss = loss_sum * scale
            acc.backward(scaler.scale(loss) if scaler is not None else loss)
        loss_total += loss_sum.detach()
        if figures is not None:
            figures.add(getattr(lm, "last_figures", None))
        if getattr(lm, "last_kl", None) is not None:
            loss_total -= lm.kl_weight * lm.last_kl[0]
            if kl is not None:
                kl.append(lm.last_kl)
    loss = float(acc.reduce(loss_total, reduction="sum")) / max(global_tokens, 1)
    return loss, global_tokens, global_real


def make_accelerator(cpu: bool, barrier_timeout_min: float) -> Accelerator:
    """The one place an Accelerator is built (by the run's setup, or by train() called on its
    own): CPU or the model's device, a barrier timeout long enough for the main process's
    evaluation, and accelerate's own mixed precision off (the loop runs it from the weights'
    dtype)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=barrier_timeout_min))
    return Accelerator(cpu=cpu, mixed_precision="no", kwargs_handlers=[timeout])


@dataclass
class Prepared:
    """The model made ready to train, and its state in and out of checkpoints. Model preparation,
    saving and restoring sit together here so that a way of spreading the model over processes
    other than DDP (sharding) changes this class and nothing in the loop.

    Mixed precision: weights that train in bf16/fp16 are kept (and stepped by AdamW) in float32,
    and forward and backward run under autocast to their dtype (fp16 with a loss scaler);
    stepping bf16 weights directly loses every update below bf16's resolution (~0.4% of the
    weight). Frozen weights stay as loaded.
    """

    acc: Accelerator
    model: torch.nn.Module  # the caller's model (plain or peft), trained in place
    wrapped: torch.nn.Module | None  # SupervisedLM as accelerate wrapped it (DDP); FSDP: start()
    optimizer: torch.optim.Optimizer
    scheduler: object
    low: torch.dtype | None  # the trained weights' own dtype when half precision
    masters: list[torch.nn.Parameter]  # those weights, held in float32 while training
    scaler: torch.amp.GradScaler | None  # fp16's loss scaler
    sharded: shard.Sharded | None = None  # train.shard: fsdp (the loop trains its sharded twin)
    objective: object = None  # train/objective.py: what the rows are and what the loss is
    amp_dtype: torch.dtype | None = None  # autocast_dtype: low, or train.autocast's bf16

    @classmethod
    def build(
        cls, acc: Accelerator, model: torch.nn.Module, cfg: TrainConfig, steps: int, objective=None
    ):
        low = low_precision(model)
        amp_dtype = autocast_dtype(model, cfg, acc.device)
        masters = [p for p in model.parameters() if p.requires_grad and p.dtype == low]
        for p in masters:
            p.data = p.data.float()
        enable_checkpointing(model, cfg.gradient_checkpointing)
        model.train()
        # the frozen base for train.kl_to_base (or a preference objective's reference) is copied
        # before any checkpoint is loaded
        objective = objective or make_objective(cfg)
        reference = kl_reference(model, cfg, objective)
        scaler = torch.amp.GradScaler(acc.device.type) if low == torch.float16 else None
        if shard.wanted(cfg, acc):  # FSDP: not wrapped by accelerate; shards filled by start()
            sharded = shard.Sharded(model, lambda m: objective.module(m, reference))
            if acc.is_main_process:
                console.print(
                    f"train.shard: fsdp: weights sharded over {acc.num_processes} processes"
                )
            optimizer = make_optimizer(sharded.twin, cfg, acc.device)
            scheduler = make_scheduler(optimizer, cfg, steps)
            return cls(
                acc, model, None, optimizer, scheduler, low, masters, scaler, sharded, objective,
                amp_dtype,
            )  # fmt: skip
        optimizer = make_optimizer(model, cfg, acc.device)
        scheduler = make_scheduler(optimizer, cfg, steps)
        lm = objective.module(model, reference)
        # The scheduler is stepped by us once per optimiser step; accelerate's wrapper would
        # step it once per process.
        wrapped, optimizer = acc.prepare(lm, optimizer)
        return cls(
            acc, model, wrapped, optimizer, scheduler, low, masters, scaler, None, objective,
            amp_dtype,
        )  # fmt: skip

    def start(self) -> torch.nn.Module:
        """What the loop trains, once any checkpoint is restored: the DDP wrapper, or (FSDP)
        the sharded wrapper with the caller's weights moved into its shards."""
        if self.sharded is not None:
            self.wrapped = self.sharded.start()
        return self.wrapped

    def scorer(self) -> torch.nn.Module:
        """What validation runs: the caller's model, or (FSDP, whose caller's copy is empty
        while training) the sharded wrapper, on every process. A preference objective scores
        with its own module (the reference is part of it), unwrapped from DDP."""
        if self.sharded is not None:
            return self.wrapped
        if self.objective is not None and self.objective.name != "sft":
            return self.acc.unwrap_model(self.wrapped)
        return self.model

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        clip = shard.clip_grad_norm_ if self.sharded is not None else self.acc.clip_grad_norm_
        return clip(self.wrapped.parameters(), max_norm)

    def gathered(self, optimizer: bool = False):
        """Around a write (every process enters): (the model holding the full weights on the main
        process, an object whose state_dict() is the optimiser's full state, or None)."""
        if self.sharded is None:
            return contextlib.nullcontext((self.weights(), self.optimizer if optimizer else None))
        return _gathered(self, optimizer)

    def amp(self):
        """The forward's autocast (a no-op when training runs in float32)."""
        return autocast_to(self.acc.device, self.amp_dtype)

    def weights(self) -> torch.nn.Module:
        """The model whose weights a checkpoint holds (the main process saves it)."""
        return self.acc.unwrap_model(self.wrapped).model

    def restore(self, path: Path, fingerprint: dict) -> dict:
        """Weights, optimiser, scheduler and RNG from a checkpoint; its trainer state. (FSDP:
        the weights go into the caller's model, which start() then moves into the shards.)"""
        loads = self.sharded.loader(self.optimizer) if self.sharded else self.optimizer
        return restore_checkpoint(path, self.model, loads, self.scheduler, fingerprint)

    def gather_back(self) -> None:
        """FSDP: every process's copy of the caller's model gets the trained full weights."""
        if self.sharded is not None:
            self.sharded.finish()

    def load_weights(self, path: Path) -> None:
        load_weights(self.model, path)

    def finish(self) -> None:
        """The trained model back in the dtype it was loaded in."""
        for p in self.masters:
            p.data = p.data.to(self.low)
        self.model.eval()


def train(
    model: torch.nn.Module,
    tokenizer,
    rows: list[Row],
    cfg: TrainConfig,
    run_dir: Path | None,
    accelerator: Accelerator | None = None,
    pack_length: int | None = None,
    validation: list[Row] | None = None,
    resume_from: Path | None = None,
    fingerprint: dict | None = None,
    evaluator: Callable[[torch.nn.Module], float] | None = None,
) -> TrainResult:
    """Train `model` in place on `rows`. Returns throughput and losses; logs to run_dir.

    `accelerator`: the run's one Accelerator (made by make_accelerator when not given).
    `pack_length`: pack rows into sequences of that many tokens instead of padding batches.
    `resume_from`: a checkpoint directory; weights, optimiser, scheduler, RNG and the data
    position are restored, so the run continues exactly as if it had not stopped (and
    metrics.jsonl loses the records the interrupted run logged after it).
    `fingerprint`: what must match between a checkpoint and this run (model and adapter config).
    `evaluator`: scores the model at every validation point (higher is better; run on the main
    process, shared with the others); checkpoints/best, select_best and early stopping then
    follow that score instead of the validation loss.
    """
    acc = accelerator
    if acc is None:
        cpu = next(model.parameters()).device.type == "cpu"
        acc = make_accelerator(cpu, cfg.barrier_timeout_min)
    check_distributed(acc)
    check_precision(acc)
    # freed activation memory goes back to the system (train.mmap_threshold_mb moves the line)
    fix_mmap_threshold(int(cfg.mmap_threshold_mb * 2**20))
    torch.manual_seed(cfg.seed)
    objective = make_objective(cfg)
    if objective.name != "sft":
        objective.check_rows(rows, "the training data")
        objective.check_rows(validation or [], "the validation data")
        # packing: each micro-batch's pair sequences share rows (the batch is still pairs)
        objective.pack_length, pack_length = pack_length, None
        if objective.needs_reference and cfg.preference.precompute_reference:
            # scored before any adapter trains and before a checkpoint is restored: the start
            rows, validation = _precompute(model, objective, rows, validation, tokenizer, cfg, acc)
    batcher = Batcher(
        rows,
        cfg,
        tokenizer.pad_token_id,
        acc.process_index,
        acc.num_processes,
        pack_length,
        objective,
    )
    steps = batcher.total_steps()
    if shard.wanted(cfg, acc):
        shard.check(cfg, evaluator)
    prep = Prepared.build(acc, model, cfg, steps, objective)
    result = TrainResult(total_steps=steps)
    result.autocast = None if prep.amp_dtype is None else str(prep.amp_dtype).split(".")[-1]
    if resume_from is not None:
        result.continue_from(prep.restore(resume_from, fingerprint or {}))
    wrapped = prep.start()
    optimizer, scheduler, scaler = prep.optimizer, prep.scheduler, prep.scaler
    stream = batcher.stream(skip=result.steps * cfg.grad_accum)
    done_before, tokens_before = result.steps, result.tokens
    kl_parts: list[tuple[float, int]] = []  # (KL sum, replay positions) since the last log
    figures = Figures.empty()  # the objective's figures since the last log
    start = time.perf_counter()
    with contextlib.ExitStack() as cleanup:  # logs and signal handlers closed on every way out
        logs = None
        if run_dir and acc.is_main_process:
            logs = cleanup.enter_context(TrainLogs(run_dir, done_before if resume_from else None))
        progress = cleanup.enter_context(_progress(acc.is_main_process))
        task = progress.add_task(
            "train", total=steps, completed=done_before, loss=float("nan"), lr=0.0, tps=0.0
        )
        stop = cleanup.enter_context(_StopFlag())
        cleanup.enter_context(compiled_layers(model, cfg.compile))
        for step in range(done_before + 1, steps + 1):
            micro = [next(stream) for _ in range(cfg.grad_accum)]
            try:  # forward and backward
                loss, global_tokens, global_real = accumulate(
                    acc, wrapped, micro, kl_parts, prep.amp, scaler, objective, figures
                )
            except Exception as e:
                if cfg.compile and is_compile_failure(e):
                    raise compile_error(e) from e
                raise
            if not math.isfinite(loss):  # the same global value on every process
                raise _not_finite(loss, step, micro, rows, run_dir)
            grad_norm = None
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.max_grad_norm is not None:
                grad_norm = float(prep.clip_grad_norm_(cfg.max_grad_norm))
            if scaler is not None:
                scaler.step(optimizer)  # (skipped when the fp16 gradients overflowed)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.count(step, loss, global_tokens, global_real)
            elapsed = time.perf_counter() - start
            tps = (result.tokens - tokens_before) / elapsed
            lr = scheduler.get_last_lr()[0]
            progress.update(task, advance=1, loss=loss, lr=lr, tps=tps)
            if step % cfg.log_every == 0 or step == steps:
                kl = _kl_since_log(acc, kl_parts) if cfg.kl_to_base > 0 else None  # all processes
                means = figures.means(acc)  # all processes
                if logs:
                    _log_step(
                        logs, result, lr, grad_norm, tps, elapsed, acc.device, kl, means,
                        objective.units_name,
                    )  # fmt: skip
            if validation and ((cfg.eval_every and step % cfg.eval_every == 0) or step == steps):
                _validate(prep, tokenizer, validation, cfg, result, logs, evaluator, start, run_dir)
            # a signal to any process stops them all after this same step
            interrupted = _any(acc, stop.requested) and step != steps
            periodic = cfg.save_every and step % cfg.save_every == 0 and step != steps
            if run_dir and (periodic or interrupted):
                _checkpoint(prep, tokenizer, run_dir, result, fingerprint or {}, cfg)
            if interrupted:
                result.interrupted = True
                break
            if result.stopped_early:
                break
    prep.gather_back()
    if cfg.select_best and result.best and run_dir and not result.interrupted:
        on_main(acc, lambda: None)  # the main process wrote checkpoints/best
        prep.load_weights(RunDir(run_dir).best)
    prep.finish()
    result.wall_s = time.perf_counter() - start
    result.peak_mem_mb = peak_memory_mb(acc.device)
    return result


def _kl_since_log(acc, kl_parts: list[tuple[float, int]]) -> float | None:
    """train.kl_to_base's KL per replay position since the last log, over every process's
    replay positions (each process holds only its own micro-batches'), or None when no process
    had any. Every process calls it at the same steps; the parts are cleared."""
    summed = [sum(k for k, _ in kl_parts), sum(n for _, n in kl_parts)]
    kl_parts.clear()
    if acc.num_processes > 1:
        local = torch.tensor(summed, dtype=torch.float64, device=acc.device)
        summed = acc.reduce(local, reduction="sum").tolist()
    kl_sum, positions = summed
    return kl_sum / positions if positions else None


def _precompute(model, objective, rows, validation, tokenizer, cfg, acc):
    """train.preference.precompute_reference: every training and validation pair scored once by
    the reference (the starting model: the adapters are off, or no step has been taken)."""
    if acc.is_main_process:
        n = sum(not is_replay(r) for r in rows) + len(validation or [])
        console.print(f"scoring {n} pairs with the reference model (precompute_reference)")
    pad, size = tokenizer.pad_token_id, cfg.batch_size
    # under the autocast training runs in, so that before the first step the policy's
    # log-probs equal these (DPO's margins start at 0)
    dtype = autocast_dtype(model, cfg, acc.device)
    with eager(), autocast_to(acc.device, dtype):
        rows = cached_reference(model, objective, rows, pad, size, dtype)
        if validation:
            validation = cached_reference(model, objective, validation, pad, size, dtype)
    return rows, validation


def _not_finite(loss: float, step: int, micro: list[dict], rows: list, run_dir) -> InstillError:
    """The error that stops a run whose loss is NaN or infinite: the step, this process's rows
    of the step, and the checkpoints left as they were."""
    sources = [rows[i].source for b in micro for i in b.get("rows", [])]
    shown = ", ".join(sources[:8]) + (f" and {len(sources) - 8} more" if len(sources) > 8 else "")
    kept = f"; the checkpoints in {RunDir(run_dir).checkpoints} are kept" if run_dir else ""
    return InstillError(
        f"the training loss is {loss} at step {step} (rows: {shown}); stopped without taking "
        f"the step{kept}. Lower train.lr, set train.max_grad_norm, or check those rows"
    )


def _log_step(
    logs, result, lr, grad_norm, tps, elapsed, device, kl, figures=None, units="supervised_tokens"
) -> None:
    """One training record in metrics.jsonl, and its scalars in TensorBoard."""
    record = {
        "step": result.steps,
        "loss": round(result.losses[-1], 6),
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": result.tokens,
        units: result.trained_tokens,  # supervised tokens, or (preference) pairs or rows
        "tokens_per_s": round(tps, 2),
        "elapsed_s": round(elapsed, 2),
        "peak_mem_mb": round(peak_memory_mb(device), 1),
    }
    if kl is not None:  # per replay position since the last log, over all processes
        record["kl_to_base"] = round(kl, 6)
    for name, value in (figures or {}).items():  # a preference objective's, per pair
        record[name] = round(value, 6)
    logs.record(record)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", *(figures or {})):
        if record[key] is not None:
            logs.scalar(f"train/{key}", record[key], result.steps)


def _validate(prep, tokenizer, validation, cfg, result, logs, evaluator, start, run_dir) -> None:
    """The validation loss (and the evaluator's score) after this step: logged, checkpoints/best
    saved when it improved, and result.stopped_early set when it stopped improving before the
    last step. Run eagerly: no graphs are compiled for validation's shapes."""
    acc, step = prep.acc, result.steps
    plain = eager if cfg.compile else contextlib.nullcontext
    figures = Figures.empty()
    with plain(), prep.amp():
        val = validation_loss(
            prep.scorer(), validation, cfg.batch_size, tokenizer.pad_token_id, acc,
            prep.objective, figures,
        )  # fmt: skip
    means = figures.means(acc)
    result.val_losses.append((step, val))
    if logs:
        at = round(time.perf_counter() - start, 2)
        record = {"step": step, "val_loss": round(val, 6), "tokens": result.tokens, "elapsed_s": at}
        record.update({f"val_{k}": round(v, 6) for k, v in means.items()})
        logs.record(record)
        logs.scalar("validation/loss", val, step)
    improved = result.best is None or val < result.best[1]
    if improved:
        result.best = (step, val)
    if evaluator is not None:
        with plain(), prep.amp():
            score = evaluator(prep.model) if acc.is_main_process else None
        score = _shared(acc, score)
        if logs:
            logs.record({"step": step, "eval_score": score})
        improved = result.best_score is None or score > result.best_score[1]
        if improved:
            result.best_score = (step, score)
    if improved and run_dir:
        with prep.gathered() as (weights, _):
            if acc.is_main_process:
                best_dir = RunDir(run_dir).best
                save_model_dir(weights, tokenizer, best_dir, what="best checkpoint")
    patience = cfg.early_stopping_patience
    best_step = (result.best_score or result.best)[0]
    since_best = sum(1 for s, _ in result.val_losses if s > best_step)
    if patience and since_best >= patience and step != result.total_steps:
        result.stopped_early = True


def _checkpoint(prep, tokenizer, run_dir, result, fingerprint, cfg) -> None:
    """checkpoints/step-N, written by the main process while the others wait."""
    with prep.gathered(optimizer=True) as (weights, optimizer):
        on_main(
            prep.acc,
            lambda: save_checkpoint(
                RunDir(run_dir).checkpoints,
                weights,
                tokenizer,
                optimizer,
                prep.scheduler,
                result,
                fingerprint,
                cfg.keep_checkpoints,
            ),
        )


@contextlib.contextmanager
def _gathered(prep: Prepared, optimizer: bool):
    with prep.sharded.full(
        prep.optimizer if optimizer else None, main=prep.acc.is_main_process
    ) as state:
        yield prep.model, (state if optimizer else None)


def on_main(acc, work: Callable[[], T]) -> T | None:
    """`work` on the main process alone, between two barriers that every process passes: no
    process starts it before all have arrived, and none goes on before it is done. Every
    process calls this at the same point of the run, so the barriers match by construction.
    Returns work's result on the main process, None on the others."""
    acc.wait_for_everyone()
    out = work() if acc.is_main_process else None
    acc.wait_for_everyone()
    return out


def _any(acc, flag: bool) -> bool:
    """True on every process when `flag` is true on any of them."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor([int(flag)], device=acc.device), reduction="sum").item())


def _shared(acc, value: float | None) -> float:
    """The main process's value, on every process (so all of them take the same decisions)."""
    if acc.num_processes == 1:
        return float(value)
    from accelerate.utils import broadcast_object_list

    return float(broadcast_object_list([value], from_process=0)[0])


class _StopFlag:
    """While active, SIGINT and SIGTERM ask the loop to finish its step, checkpoint and stop
    (a second SIGINT interrupts at once)."""

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]train[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:.0f} tok/s"
        ),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )
