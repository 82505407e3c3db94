"""`--quant auto`: a merged GGUF whose tensor types are chosen by measurement, under a size budget.

    calibration: the tuned model reads prompts and its own greedy replies; at each reply
    position a token is drawn from its own distribution and the loss of that token is
    backpropagated (the model's Fisher information, which is what a weight error costs in KL)
    for each linear layer, two vectors: a_i = mean squared gradient of output i,
                                        b_j = mean square of input j
    for each 2-D tensor W' (tuned, merged, in llama.cpp's row order) and each candidate type t:
        cost_t = sum_ij a_i b_j (Q_t(W')_ij - W'_ij)^2   ~ 2 x the KL it adds, per position
    candidates: q4_0 q4_1 q5_0 q5_1 q8_0 rounded afresh, and the base GGUF's own grid for that
    tensor with the tuned weights rounded onto it stochastically (regrid.py: same size as the
    base, the update kept in expectation; the base's bytes exactly where nothing was tuned)
    start every tensor at its cheapest candidate; buy upgrades in order of cost removed per
    byte until the budget is spent (each tensor's candidates on their lower convex hull, so
    buying in that order is the knapsack's greedy optimum up to the last step)

The tied embedding is also the output head: its cost is the head's (as above) plus the lookup's
(each looked-up row's error weighted by the gradient of the embedding output there).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from instill.data.render import end_of_turn_ids, render_prompt
from instill.export import gguf_file, regrid
from instill.export.verify import PROMPTS, greedy_reply

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
    label: str  # "base grid (q4_1)" or a type name
    qtype: T
    nbytes: int
    cost: float
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


@dataclass
class Weights:
    """Per GGUF tensor: the squared-gradient weight of each output row and input column, and
    for a looked-up embedding, per token row seen, the squared gradient of each column."""

    rows: np.ndarray
    cols: np.ndarray
    lookup: dict[int, np.ndarray] | None = None

    def cost(self, err: np.ndarray) -> float:
        sq = err.astype(np.float32) ** 2
        total = float(self.rows @ sq @ self.cols)
        for row, g in (self.lookup or {}).items():
            total += float(sq[row] @ g)
        return total


def _sequences(model, tokenizer, new_tokens: int) -> list[tuple[list[int], int]]:
    eot = end_of_turn_ids(tokenizer)
    seqs = []
    for messages in CALIBRATION:
        ids = render_prompt(tokenizer, messages)
        seqs.append((ids + greedy_reply(model, ids, new_tokens, eot), len(ids)))
    return seqs


def sensitivity(model, tokenizer, new_tokens: int = 32, draws: int = 2) -> dict[str, Weights]:
    """Fisher weights for every 2-D tensor of the merged model, from the calibration replies,
    in units of summed (2 x KL) over the calibration positions."""
    config = model.config
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if name == "lm_head":
                tied = config.tie_word_embeddings
                names[module] = "token_embd.weight" if tied else "output.weight"
            else:
                names[module] = gguf_file.gguf_name(f"{name}.weight", config)
    seqs = _sequences(model, tokenizer, new_tokens)
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}
    lookup: dict[int, torch.Tensor] = {}

    def on_linear(module, args, output):
        key = names[module]
        _add(cols, key, args[0])
        output.register_hook(lambda g: _add(rows, key, g))

    def on_embed(module, args, output):
        output = output.requires_grad_()  # the graph starts here: no weight gradients
        ids = args[0].reshape(-1)
        output.register_hook(lambda g: _add_lookup(lookup, ids, g))
        return output

    hooks = [m.register_forward_hook(on_linear) for m in names]
    hooks.append(model.get_input_embeddings().register_forward_hook(on_embed))
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    try:
        for _ in range(draws):
            for seq, prompt_len in seqs:
                logits = model(input_ids=torch.tensor([seq])).logits[0, prompt_len - 1 : -1]
                probs = torch.softmax(logits.detach().float(), -1)
                drawn = torch.multinomial(probs, 1, generator=generator)[:, 0]
                loss = torch.nn.functional.cross_entropy(logits.float(), drawn, reduction="sum")
                loss.backward()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    # sum_t g_ti^2 x_tj^2 ~ (sum_t g_ti^2)(sum_t x_tj^2) / tokens, per draw
    tokens = draws * sum(len(seq) for seq, _ in seqs)
    found = {}
    for key in names.values():
        r = (rows[key] / draws).cpu().numpy()
        c = (cols[key] / tokens).cpu().numpy()
        found[key] = Weights(gguf_file.rotary_rows(r, key, config), c)
    table = {tid: (g / draws).cpu().numpy() for tid, g in lookup.items()}
    if "token_embd.weight" in found:
        found["token_embd.weight"].lookup = table
    else:  # an untied embedding: its lookup alone
        found["token_embd.weight"] = Weights(np.zeros(0), np.zeros(0), table)
    return found


def _add(store: dict, key: str, t: torch.Tensor) -> None:
    v = t.detach().float().reshape(-1, t.shape[-1])
    store[key] = store.get(key, 0) + (v * v).sum(0)


def _add_lookup(store: dict, ids: torch.Tensor, grad: torch.Tensor) -> None:
    g = grad.detach().float().reshape(-1, grad.shape[-1])
    for tid, row in zip(ids.tolist(), g * g, strict=True):
        store[tid] = store.get(tid, 0) + row


def _hull(options: list[Option]) -> list[Option]:
    """Cheapest first, each dearer option strictly lower in cost, on the lower convex hull."""
    options = sorted(options, key=lambda o: (o.nbytes, o.cost))
    kept: list[Option] = []
    for o in options:
        if kept and o.cost >= kept[-1].cost:
            continue
        while len(kept) >= 2:
            a, b = kept[-2], kept[-1]
            # b sits above the line from a to o: buying o straight from a is better per byte
            if (a.cost - b.cost) * (o.nbytes - a.nbytes) <= (a.cost - o.cost) * (
                b.nbytes - a.nbytes
            ):
                kept.pop()
            else:
                break
        kept.append(o)
    return kept


def _options(w: np.ndarray, weights: Weights, base, name: str) -> list[Option]:
    """Fresh types, and the base tensor's own grid when there is a base: its bytes as they are
    for an untouched tensor, else the tuned weights stochastically rounded onto it (regrid.py).
    A fresh type equal to the base's is left out: its grid is the base's, and rounding to the
    nearest point on it undoes the tuning."""
    found = None
    if base is not None:
        raw, qtype = base
        if qtype in regrid.SUPPORTED:
            raw = regrid.regrid(raw, qtype, w, name)
        approx = gguf.quants.dequantize(raw, qtype).reshape(w.shape)
        if qtype in regrid.SUPPORTED or np.array_equal(approx, w):
            cost = weights.cost(approx - w)
            found = Option(f"base grid ({qtype.name.lower()})", qtype, raw.nbytes, cost, raw)
    options = [found] if found is not None else []
    if w.shape[-1] % 32:  # no block type fits the rows; gguf_file writes f16 (as llama.cpp does)
        return options + [Option("f16", T.F16, _nbytes(w.shape, T.F16), 0.0)]
    for qtype in CANDIDATES:
        if found is None or qtype != found.qtype:
            approx = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
            cost = weights.cost(approx - w)
            options.append(Option(qtype.name.lower(), qtype, _nbytes(w.shape, qtype), cost))
    return options


def _base_tensors(base_gguf: str | None, config) -> dict[str, tuple[np.ndarray, T]]:
    if not base_gguf:
        return {}
    reader = gguf.GGUFReader(base_gguf)
    return {t.name: (np.asarray(t.data), T(int(t.tensor_type))) for t in reader.tensors}


def smallest_bytes(model, base_gguf: str | None) -> int:
    """The tensor data of the smallest file plan() can lead to, known from shapes (and the
    base's types) before any measurement: every 2-D tensor at its cheapest candidate, the one
    plan starts from before buying upgrades; norms f32."""
    config = model.config
    base = _base_tensors(base_gguf, config)
    total = 0
    for tensor, w in gguf_file.tensors(model, config):
        if w.ndim != 2:
            total += w.size * 4
            continue
        fresh = (T.F16,) if w.shape[-1] % 32 else CANDIDATES  # as _options
        least = min(_nbytes(w.shape, qtype) for qtype in fresh)
        found = base.get(tensor)
        if found is not None and found[0].nbytes < least:  # a base type smaller than q4_0
            raw, qtype = found
            fits = _nbytes(w.shape, qtype) == raw.nbytes
            # kept as an option only as _options keeps it: regridded, or untouched bytes
            if fits and (
                qtype in regrid.SUPPORTED
                or np.array_equal(gguf.quants.dequantize(raw, qtype).reshape(w.shape), w)
            ):
                least = raw.nbytes
        total += least
    return total


def plan(model, tokenizer, base_gguf: str | None, budget_bytes: int) -> list[Choice]:
    """Per 2-D tensor of the merged model, the measured options and the one chosen."""
    config = model.config
    weights = sensitivity(model, tokenizer)
    base = _base_tensors(base_gguf, config)
    choices = []
    for tensor, w in gguf_file.tensors(model, config):
        if w.ndim != 2:
            budget_bytes -= w.size * 4  # norms are written as f32
            continue
        found = base.get(tensor)
        fits = found is not None and _nbytes(w.shape, found[1]) == found[0].nbytes
        options = _options(w, weights[tensor], found if fits else None, tensor)
        choices.append(Choice(tensor, _hull(options)))
    _spend(choices, budget_bytes)
    return choices


def _spend(choices: list[Choice], budget: int) -> None:
    spent = sum(c.chosen.nbytes for c in choices)
    heap = []

    def offer(i: int) -> None:
        c = choices[i]
        if c.pick + 1 < len(c.options):
            now, nxt = c.chosen, c.options[c.pick + 1]
            rate = (now.cost - nxt.cost) / (nxt.nbytes - now.nbytes)
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
    """For the printout and instill.json: types chosen, bytes, cost, per tensor kind."""
    by_kind: dict[str, dict[str, int]] = {}
    for c in choices:
        kind = c.tensor.split(".")[-2] if c.tensor.startswith("blk.") else c.tensor
        counts = by_kind.setdefault(kind, {})
        counts[c.chosen.label] = counts.get(c.chosen.label, 0) + 1
    return {
        "tensor_bytes": sum(c.chosen.nbytes for c in choices),
        "by_kind": by_kind,
        "tensors": {
            c.tensor: {"type": c.chosen.label, "cost": float(f"{c.chosen.cost:.4g}")}
            for c in choices
        },
    }
