"""One training loop for full fine-tuning and adapters, for one CPU process or many GPU processes.

    for each optimiser step:
        take grad_accum micro-batches; count their supervised tokens (summed over processes)
        for each micro-batch: loss = loss_sum * world_size / global_supervised_tokens; backward
        clip, step, schedule, log

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

import torch

from instill.config import TrainConfig
from instill.console import console
from instill.data.dataset import Row, collate, length_grouped_batches
from instill.data.packing import collate_packed, pack_best_fit
from instill.errors import InstillError
from instill.train import shard
from instill.train.checkpoint import (
    load_weights,
    restore_checkpoint,
    save_checkpoint,
    save_model_dir,
)
from instill.train.compiled import compile_error, compiled_layers, eager, is_compile_failure
from instill.train.logs import TrainLogs
from instill.train.loss import IGNORE, SupervisedLM
from instill.train.memory import enable_checkpointing, fix_mmap_threshold


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
    ):
        self.rows, self.cfg, self.pad_id = rows, cfg, pad_id
        self.rank, self.world = rank, world
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
        lands on the exact micro-batch where the interrupted run stopped, mid-epoch too)."""
        epoch = 0
        while True:
            for batch in self._epoch(epoch):
                if skip:
                    skip -= 1
                    continue
                idx = batch[self.rank :: self.world]
                if self.bins is None:
                    yield collate([self.rows[i] for i in idx], self.pad_id)
                else:
                    yield collate_packed(self.rows, [self.bins[i] for i in idx], self.pad_id)
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


def available_memory(device: torch.device) -> int:
    """Bytes free for a second copy of the weights on `device`."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62  # unknown: do not refuse


def kl_reference(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module | None:
    """The base model for train.kl_to_base: None for a peft model (its adapters are switched off
    instead), else a frozen copy made before training, if one fits."""
    if cfg.kl_to_base <= 0 or hasattr(model, "disable_adapter"):
        return None
    import copy

    device = next(model.parameters()).device
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    free = available_memory(device)
    if need * 1.2 > free:  # the copy, with room for the activations it needs
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
def validation_loss(model: torch.nn.Module, rows: list[Row], batch_size: int, pad_id: int) -> float:
    """Mean token loss over `rows` (the same supervised positions as training)."""
    was_training = model.training
    model.eval()
    # (train.shard: fsdp passes its sharded wrapper; the replay mask is dropped: no KL term)
    lm = model if isinstance(model, SupervisedLM) else SupervisedLM(model)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for idx in length_grouped_batches(rows, batch_size, seed=0):
        batch = collate([rows[i] for i in idx], pad_id)
        skip = ("real_tokens", "replay_mask")
        loss_sum, n = lm(**{k: v.to(device) for k, v in batch.items() if k not in skip})
        total, count = total + float(loss_sum), count + int(n)
    model.train(was_training)
    return total / max(count, 1)


def loss_scale(acc, global_tokens: int) -> float:
    """What each process's loss sum is multiplied by before backward. DDP (and FSDP) average
    gradients over processes, so the process count is multiplied back in: the result is the
    sum over every process's supervised tokens divided by their global count."""
    return acc.num_processes / max(global_tokens, 1)


def accumulate(
    acc, wrapped, micro: list[dict], kl: list | None = None, amp=None, scaler=None
) -> tuple[float, int, int]:
    """Forward and backward over the micro-batches of one optimiser step.

    Each micro-batch's loss sum is divided by the supervised-token count of the whole step,
    summed over processes, so gradients equal those of one big batch. Returns the step's mean
    token loss, its supervised tokens and its real (non-padding) tokens, all global. With
    train.kl_to_base the loss is the cross-entropy alone, and `kl` (a list) receives this
    process's (KL sum, replay positions) of every micro-batch that had replay rows. `amp`: the
    forward's autocast context (mixed precision), `scaler`: fp16's loss scaler.
    """
    lm = acc.unwrap_model(wrapped)
    local = torch.tensor(
        [
            sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro),
            sum(int(b["real_tokens"]) for b in micro),
        ],
        device=acc.device,
    )
    global_tokens, global_real = (int(x) for x in acc.reduce(local, reduction="sum"))
    scale = loss_scale(acc, global_tokens)
    loss_total = torch.zeros((), device=acc.device)
    for i, batch in enumerate(micro):
        batch = {k: v.to(acc.device) for k, v in batch.items() if k != "real_tokens"}
        last = i == len(micro) - 1
        with acc.no_sync(wrapped) if not last else contextlib.nullcontext():
            with amp() if amp is not None else contextlib.nullcontext():
                loss_sum, _ = wrapped(**batch)
            loss = loss_sum * scale
            acc.backward(scaler.scale(loss) if scaler is not None else loss)
        loss_total += loss_sum.detach()
        if getattr(lm, "last_kl", None) is not None:
            loss_total -= lm.kl_weight * lm.last_kl[0]
            if kl is not None:
                kl.append(lm.last_kl)
    loss = float(acc.reduce(loss_total, reduction="sum")) / max(global_tokens, 1)
    return loss, global_tokens, global_real


def train(
    model: torch.nn.Module,
    tokenizer,
    rows: list[Row],
    cfg: TrainConfig,
    run_dir: Path | None,
    accelerator=None,
    pack_length: int | None = None,
    validation: list[Row] | None = None,
    resume_from: Path | None = None,
    fingerprint: dict | None = None,
    evaluator: Callable[[torch.nn.Module], float] | None = None,
) -> TrainResult:
    """Train `model` in place on `rows`. Returns throughput and losses; logs to run_dir.

    `pack_length`: pack rows into sequences of that many tokens instead of padding batches.
    `resume_from`: a checkpoint directory; weights, optimiser, scheduler, RNG and the data
    position are restored, so the run continues exactly as if it had not stopped.
    `fingerprint`: what must match between a checkpoint and this run (model and adapter config).
    `evaluator`: scores the model at every validation point (higher is better; run on the main
    process, shared with the others); checkpoints/best, select_best and early stopping then
    follow that score instead of the validation loss.
    """
    from accelerate import Accelerator

    acc = accelerator or Accelerator(cpu=next(model.parameters()).device.type == "cpu")
    check_distributed(acc)
    check_precision(acc)
    # Mixed precision: weights that train in bf16/fp16 are kept (and stepped by AdamW) in
    # float32, and forward and backward run under autocast to their dtype (fp16 with a loss
    # scaler); stepping bf16 weights directly loses every update below bf16's resolution
    # (~0.4% of the weight). Frozen weights stay as loaded.
    low = low_precision(model)
    masters = [p for p in model.parameters() if p.requires_grad and p.dtype == low]
    for p in masters:
        p.data = p.data.float()

    def amp():
        return torch.autocast(acc.device.type, dtype=low or torch.bfloat16, enabled=bool(low))

    scaler = torch.amp.GradScaler(acc.device.type) if low == torch.float16 else None
    # freed activation memory goes back to the system (train.mmap_threshold_mb moves the line)
    fix_mmap_threshold(int(cfg.mmap_threshold_mb * 2**20))
    torch.manual_seed(cfg.seed)
    enable_checkpointing(model, cfg.gradient_checkpointing)
    model.train()
    batcher = Batcher(
        rows, cfg, tokenizer.pad_token_id, acc.process_index, acc.num_processes, pack_length
    )
    steps = batcher.total_steps()
    sharded = None
    if shard.wanted(cfg, acc):  # FSDP: the loop trains a sharded twin (train/shard.py)
        shard.check(cfg, evaluator)
        reference = kl_reference(model, cfg)
        wrapper = lambda m: SupervisedLM(m, kl_weight=cfg.kl_to_base, reference=reference)  # noqa: E731
        sharded = shard.Sharded(model, wrapper)
        if acc.is_main_process:
            console.print(f"train.shard: fsdp: weights sharded over {acc.num_processes} processes")
    optimizer = make_optimizer(sharded.twin if sharded else model, cfg, acc.device)
    scheduler = make_scheduler(optimizer, cfg, steps)
    result = TrainResult()
    if resume_from is not None:
        loads = sharded.loader(optimizer) if sharded else optimizer
        state = restore_checkpoint(resume_from, model, loads, scheduler, fingerprint or {})
        result.steps, result.tokens = state["step"], state["tokens"]
        result.trained_tokens, result.losses = state["trained_tokens"], list(state["losses"])
        result.val_losses = [tuple(v) for v in state.get("val_losses", [])]
        result.best = tuple(state["best"]) if state.get("best") else None
        result.best_score = tuple(state["best_score"]) if state.get("best_score") else None
    # The scheduler is stepped by us once per optimiser step; accelerate's wrapper would step it
    # once per process.
    if sharded:
        wrapped = sharded.start()
    else:
        lm = SupervisedLM(model, kl_weight=cfg.kl_to_base, reference=kl_reference(model, cfg))
        wrapped, optimizer = acc.prepare(lm, optimizer)
    stream = batcher.stream(skip=result.steps * cfg.grad_accum)
    logs = TrainLogs(run_dir) if run_dir and acc.is_main_process else None
    start = time.perf_counter()
    done_before, tokens_before = result.steps, result.tokens
    progress = _progress(acc.is_main_process)
    task = progress.add_task(
        "train", total=steps, completed=done_before, loss=float("nan"), lr=0.0, tps=0.0
    )
    stop = _StopFlag()
    # validation and in-training evaluation run eagerly (no graphs compiled for their shapes)
    plain = eager if cfg.compile else contextlib.nullcontext
    kl_parts: list[tuple[float, int]] = []  # (KL sum, replay positions) since the last log
    with progress, stop, compiled_layers(model, cfg.compile), logs or contextlib.nullcontext():
        for step in range(done_before + 1, steps + 1):
            micro = [next(stream) for _ in range(cfg.grad_accum)]
            try:
                loss, global_tokens, global_real = accumulate(
                    acc, wrapped, micro, kl_parts, amp, scaler
                )
            except Exception as e:
                if cfg.compile and is_compile_failure(e):
                    raise compile_error(e) from e
                raise
            grad_norm = None
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.max_grad_norm is not None:
                clip = shard.clip_grad_norm_ if sharded else acc.clip_grad_norm_
                grad_norm = float(clip(wrapped.parameters(), cfg.max_grad_norm))
            if scaler is not None:
                scaler.step(optimizer)  # (skipped when the fp16 gradients overflowed)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(loss)
            result.steps = step
            result.tokens += global_real
            result.trained_tokens += global_tokens
            elapsed = time.perf_counter() - start
            tps = (result.tokens - tokens_before) / elapsed
            lr = scheduler.get_last_lr()[0]
            progress.update(task, advance=1, loss=loss, lr=lr, tps=tps)
            if logs and (step % cfg.log_every == 0 or step == steps):
                record = {
                    "step": step,
                    "loss": round(loss, 6),
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": result.tokens,
                    "supervised_tokens": result.trained_tokens,
                    "tokens_per_s": round(tps, 2),
                    "elapsed_s": round(elapsed, 2),
                    "peak_mem_mb": round(peak_memory_mb(acc.device), 1),
                }
                if cfg.kl_to_base > 0 and kl_parts:  # per replay position since the last log
                    positions = sum(n for _, n in kl_parts)
                    record["kl_to_base"] = round(sum(k for k, _ in kl_parts) / positions, 6)
                    kl_parts.clear()
                logs.record(record)
                for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                    if record[key] is not None:
                        logs.scalar(f"train/{key}", record[key], step)
            if validation and ((cfg.eval_every and step % cfg.eval_every == 0) or step == steps):
                with plain(), amp():
                    val = validation_loss(
                        wrapped if sharded else model,
                        validation,
                        cfg.batch_size,
                        tokenizer.pad_token_id,
                    )
                result.val_losses.append((step, val))
                if logs:
                    at = round(time.perf_counter() - start, 2)
                    val_record = {"step": step, "val_loss": round(val, 6)}
                    val_record.update(tokens=result.tokens, elapsed_s=at)
                    logs.record(val_record)
                    logs.scalar("validation/loss", val, step)
                improved = result.best is None or val < result.best[1]
                if improved:
                    result.best = (step, val)
                if evaluator is not None:
                    with plain(), amp():
                        score = evaluator(model) if acc.is_main_process else None
                    score = _shared(acc, score)
                    if logs:
                        logs.record({"step": step, "eval_score": score})
                    improved = result.best_score is None or score > result.best_score[1]
                    if improved:
                        result.best_score = (step, score)
                if improved and run_dir:
                    with _full(sharded, acc):
                        if acc.is_main_process:
                            best_dir = run_dir / "checkpoints" / "best"
                            save_model_dir(model, tokenizer, best_dir, what="best checkpoint")
                patience = cfg.early_stopping_patience
                best_step = (result.best_score or result.best)[0]
                since_best = sum(1 for s, _ in result.val_losses if s > best_step)
                if patience and since_best >= patience and step != steps:
                    result.stopped_early = True
            # a signal to any process stops them all after this same step
            interrupted = _any(acc, stop.requested) and step != steps
            periodic = cfg.save_every and step % cfg.save_every == 0 and step != steps
            if run_dir and (periodic or interrupted):
                acc.wait_for_everyone()
                with _full(sharded, acc, optimizer) as optimizer_state:
                    if acc.is_main_process:
                        save_checkpoint(
                            run_dir / "checkpoints",
                            model,
                            tokenizer,
                            optimizer_state,
                            scheduler,
                            result,
                            fingerprint or {},
                            cfg.keep_checkpoints,
                        )
                acc.wait_for_everyone()
            if interrupted:
                result.interrupted = True
                break
            if result.stopped_early:
                break
    if sharded:  # every process's `model` gets the trained full weights back
        sharded.finish()
    if cfg.select_best and result.best and run_dir and not result.interrupted:
        acc.wait_for_everyone()
        load_weights(model, run_dir / "checkpoints" / "best")
    for p in masters:  # the trained model in the dtype it was loaded in
        p.data = p.data.to(low)
    result.wall_s = time.perf_counter() - start
    result.peak_mem_mb = peak_memory_mb(acc.device)
    model.eval()
    return result


def _full(sharded, acc, optimizer=None):
    """Around a write: with FSDP, `model` holds the gathered full weights on the main process
    and the value gives the optimiser's full state; otherwise the optimiser itself."""
    if sharded is None:
        return contextlib.nullcontext(optimizer)
    return sharded.full(optimizer, main=acc.is_main_process)


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
