"""`--quant auto`: a merged GGUF whose tensor types are chosen by measurement, under a size budget.

    energy_j  = mean x_j^2 over the input columns of every linear layer, read while the tuned
                model runs calibration prompts and its own greedy replies (an importance matrix)
    for each 2-D tensor W' (tuned, merged, in llama.cpp's row order) and each candidate type t:
        noise_t = sum_ij (Q_t(W')_ij - W'_ij)^2 energy_j  /  sum_ij W'_ij^2 energy_j
    candidates: q4_0 q4_1 q5_0 q5_1 q8_0, and the base GGUF's own bytes for that tensor, whose
    noise is the tuning it drops (none where the adapter did not touch the tensor)
    start every tensor at its cheapest candidate; buy upgrades in order of noise removed per
    byte until the budget is spent (each tensor's candidates on their lower convex hull, so
    buying in that order is the knapsack's greedy optimum up to the last step)

The tied embedding is also the output head: its energy is that of the head's input, so its
noise is the logits' own.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from instill.data.render import end_of_turn_ids, render_prompt
from instill.export import gguf_file
from instill.export.verify import PROMPTS

T = gguf.GGMLQuantizationType
CANDIDATES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
CALIBRATION = [
    *PROMPTS,
    [
        {
            "role": "user",
            "content": "Summarise in one sentence: the river rose after three days "
            "of rain and the bridge was closed.",
        }
    ],
    [{"role": "user", "content": "List four fruits that are red."}],
    [{"role": "user", "content": "What is 17 plus 25? Answer with the number only."}],
    [{"role": "user", "content": "Rewrite politely: give me the report now."}],
    [{"role": "user", "content": "Translate to French: good morning."}],
    [{"role": "user", "content": "Which is larger, 0.7 or 0.65? Explain briefly."}],
]


@dataclass
class Option:
    label: str  # "base (q4_1)" or a type name
    qtype: T
    nbytes: int
    noise: float
    raw: np.ndarray | None = None  # the base file's bytes, copied as they are


@dataclass
class Choice:
    tensor: str
    options: list[Option]  # lower convex hull, cheapest first
    pick: int = 0

    @property
    def chosen(self) -> Option:
        return self.options[self.pick]


def _nbytes(shape: tuple[int, ...], qtype: T) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


@torch.no_grad()
def input_energy(model, tokenizer, new_tokens: int = 32) -> dict[str, np.ndarray]:
    """Per GGUF tensor: the mean square of each input column, over the calibration tokens."""
    config = model.config
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name):
        def record(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name == "lm_head":
            tensor = "token_embd.weight" if config.tie_word_embeddings else "output.weight"
        else:
            tensor = gguf_file.gguf_name(f"{name}.weight", config)
        hooks.append(module.register_forward_pre_hook(hook(tensor)))
    try:
        eot = end_of_turn_ids(tokenizer)
        for messages in CALIBRATION:
            ids = torch.tensor([render_prompt(tokenizer, messages)])
            # the reply is generated with the hooks on: its tokens are calibration text too
            model.generate(
                ids,
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=eot,
                pad_token_id=eot[0],
            )
    finally:
        for h in hooks:
            h.remove()
    return {k: (v / counts[k]).cpu().numpy() for k, v in sums.items()}


def _noise(approx: np.ndarray, w: np.ndarray, energy: np.ndarray, signal: float) -> float:
    err = approx.astype(np.float32) - w
    return float(((err * err) @ energy).sum() / signal)


def _hull(options: list[Option]) -> list[Option]:
    """Cheapest first, each dearer option strictly quieter, on the lower convex hull."""
    options = sorted(options, key=lambda o: (o.nbytes, o.noise))
    kept: list[Option] = []
    for o in options:
        if kept and o.noise >= kept[-1].noise:
            continue
        while len(kept) >= 2:
            a, b = kept[-2], kept[-1]
            # b sits above the line from a to o: buying o straight from a is better per byte
            if (a.noise - b.noise) * (o.nbytes - a.nbytes) <= (a.noise - o.noise) * (
                b.nbytes - a.nbytes
            ):
                kept.pop()
            else:
                break
        kept.append(o)
    return kept


def _options(tensor: str, w: np.ndarray, energy: np.ndarray, base) -> list[Option]:
    signal = float(((w * w) @ energy).sum()) or 1.0
    options = []
    if w.shape[-1] % 32 == 0:
        for qtype in CANDIDATES:
            approx = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
            options.append(
                Option(
                    qtype.name.lower(),
                    qtype,
                    _nbytes(w.shape, qtype),
                    _noise(approx, w, energy, signal),
                )
            )
    else:  # no block type fits the rows; gguf_file writes f16 (as llama.cpp's converter does)
        options.append(Option("f16", T.F16, _nbytes(w.shape, T.F16), 0.0))
    if base is not None:
        raw, qtype = base
        approx = gguf.quants.dequantize(raw, qtype).reshape(w.shape)
        label = f"base ({qtype.name.lower()})"
        options.append(Option(label, qtype, raw.nbytes, _noise(approx, w, energy, signal), raw))
    return options


def _base_tensors(base_gguf: str | None, config) -> dict[str, tuple[np.ndarray, T]]:
    if not base_gguf:
        return {}
    reader = gguf.GGUFReader(base_gguf)
    return {t.name: (np.asarray(t.data), T(int(t.tensor_type))) for t in reader.tensors}


def plan(model, tokenizer, base_gguf: str | None, budget_bytes: int) -> list[Choice]:
    """Per 2-D tensor of the merged model, the measured options and the one chosen."""
    config = model.config
    energy = input_energy(model, tokenizer)
    base = _base_tensors(base_gguf, config)
    choices = []
    for tensor, w in gguf_file.tensors(model, config):
        if w.ndim != 2:
            budget_bytes -= w.size * 4  # norms are written as f32
            continue
        e = energy.get(tensor)
        if e is None:  # an untied embedding: every column weighs the same
            e = np.ones(w.shape[1], dtype=np.float32)
        found = base.get(tensor)
        fits = found is not None and _nbytes(w.shape, found[1]) == found[0].nbytes
        choices.append(Choice(tensor, _hull(_options(tensor, w, e, found if fits else None))))
    _spend(choices, budget_bytes)
    return choices


def _spend(choices: list[Choice], budget: int) -> None:
    spent = sum(c.chosen.nbytes for c in choices)
    heap = []

    def offer(i: int) -> None:
        c = choices[i]
        if c.pick + 1 < len(c.options):
            now, nxt = c.chosen, c.options[c.pick + 1]
            rate = (now.noise - nxt.noise) / (nxt.nbytes - now.nbytes)
            heapq.heappush(heap, (-rate, i))

    for i in range(len(choices)):
        offer(i)
    while heap:
        _, i = heapq.heappop(heap)
        c = choices[i]
        extra = c.options[c.pick + 1].nbytes - c.chosen.nbytes
        if spent + extra > budget:
            continue  # this tensor's next step does not fit; cheaper steps elsewhere may
        c.pick += 1
        spent += extra
        offer(i)


def as_plan(choices: list[Choice]) -> dict[str, tuple[T, np.ndarray | None]]:
    return {c.tensor: (c.chosen.qtype, c.chosen.raw) for c in choices}


def summary(choices: list[Choice]) -> dict:
    """For the printout and instill.json: types chosen, bytes, noise, per tensor kind."""
    by_kind: dict[str, dict[str, int]] = {}
    for c in choices:
        kind = c.tensor.split(".")[-2] if c.tensor.startswith("blk.") else c.tensor
        counts = by_kind.setdefault(kind, {})
        counts[c.chosen.label] = counts.get(c.chosen.label, 0) + 1
    return {
        "tensor_bytes": sum(c.chosen.nbytes for c in choices),
        "by_kind": by_kind,
        "tensors": {
            c.tensor: {"type": c.chosen.label, "noise": round(c.chosen.noise, 6)} for c in choices
        },
    }
