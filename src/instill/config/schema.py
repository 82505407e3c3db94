"""Every recipe key, documented once. The `description` of each field is what the CLI help shows.

All models are frozen and reject unknown keys; the loader turns validation errors into messages
that name the file and key and suggest the closest valid key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="Pretrained model: an alias (smollm2-135m-instruct), a local Hugging Face "
        "directory, a .gguf file, or a hub id (needs network).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights and compute dtype. auto: bfloat16 on a GPU that supports it, "
        "float32 otherwise (CPUs without native bf16 are hundreds of times slower in bf16).",
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with a hub model. Off unless you trust it."
    )
    chat_template: str | None = Field(
        None,
        description="Path to a Jinja chat template file; replaces the tokenizer's own template "
        "(required when the model has none). null: the tokenizer's own.",
    )
    quantize: Literal["none", "4bit"] = Field(
        "none",
        description="4bit: load the frozen base in 4-bit NF4 through bitsandbytes and train "
        "LoRA adapters on it (QLoRA). CUDA GPUs only.",
    )
    init: Literal["pretrained", "scratch"] = Field(
        "pretrained",
        description="pretrained: start from the model's weights. scratch: same architecture, "
        "random weights (the baseline that shows what pretraining saved).",
    )


class AdapterConfig(_Section):
    method: Literal["lora", "full"] = Field(
        "lora", description="lora: train low-rank adapters (peft). full: train all weights."
    )
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules that get adapters: a preset (all-linear, attention, mlp) or a list "
        "of module-name suffixes such as [q_proj, v_proj].",
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    freeze: list[str] = Field(
        default_factory=list,
        description="Full fine-tuning only: parameters whose name contains one of these "
        "strings stay frozen (e.g. [embed_tokens]).",
    )


class BuiltinDataConfig(_Section):
    train_per_family: int = Field(
        64, ge=0, description="Generated training examples per built-in task family."
    )
    eval_per_family: int = Field(
        12, ge=0, description="Generated held-out evaluation examples per task family."
    )
    seed: int = Field(0, description="Seed of the built-in task generator.")
    families: list[str] | None = Field(
        None, description="Restrict to these task families (default: all)."
    )


class SourceConfig(_Section):
    path: str = Field(
        description="A JSON, JSONL, CSV or Parquet file, a folder of them, or a hub dataset "
        "name (needs network)."
    )
    split: str = Field("train", description="Split to read from a hub dataset.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename columns (the file's name: the name instill reads) before the "
        "format is detected, e.g. {question: prompt, answer: completion}.",
    )
    format: Literal[
        "auto", "messages", "sharegpt", "alpaca", "prompt_completion", "selfinstruct", "text",
        "pairs", "conversation_pairs", "hh", "sharegpt_pairs", "alpaca_pairs", "kto",
    ] = Field(
        "auto",
        description="Row format; auto detects it from the keys of the first row. The last six "
        "are preference formats (train.objective other than sft).",
    )  # fmt: skip
    weight: float = Field(
        1.0, gt=0, description="Sampling weight: 2.0 repeats the source twice, 0.5 keeps half."
    )


class ReplayConfig(_Section):
    fraction: float = Field(
        gt=0,
        lt=1,
        description="Share of the training rows that are replay rows (0.1: one row in ten).",
    )
    prompts: str | None = Field(
        None,
        description="A file of general prompts (prompt, instruction or messages rows) for the "
        "base model to answer. Default: instill's replay prompts, disjoint from general_gen's.",
    )
    max_new_tokens: int = Field(
        64,
        gt=0,
        description="Longest base reply, in tokens; a reply cut there is trained without its end "
        "of turn.",
    )


class DataConfig(_Section):
    builtin: BuiltinDataConfig | None = Field(
        None,
        description="Train on instill's generated instruction tasks (their train split; their "
        "eval split is the builtin suite). A recipe with no data section gets them with the "
        "values below; a data section that leaves builtin out trains on its sources alone "
        "(builtin: {} adds the tasks with these values).",
    )
    sources: list[SourceConfig] = Field(
        default_factory=list,
        description="Instruction data files, mixed by weight: a list of entries such as "
        "{path: my-data.jsonl, weight: 2.0}, whose keys follow.",
    )
    max_length: int = Field(
        512, gt=8, description="Longest tokenised row, in tokens; longer rows are truncated."
    )
    validation: float | str = Field(
        0.0,
        description="Validation split: a fraction of the training rows held out (by seed), or "
        "a data file of its own. 0 disables it.",
    )
    seed: int = Field(0, description="Seed of the validation split and of source subsampling.")
    on_error: Literal["stop", "skip"] = Field(
        "stop",
        description="stop: the first bad row is an error. skip: bad rows are skipped, counted, "
        "and listed with their reasons in the run's skipped_rows.jsonl.",
    )
    packing: bool = Field(
        False,
        description="Pack rows into sequences of max_length (best fit; attention never crosses "
        "rows); train.batch_size then counts packed sequences. Off: length-grouped batches. "
        "Preference objectives: each micro-batch's prompt+reply sequences are packed into rows "
        "of max_length (no padding between them); train.batch_size still counts pairs.",
    )
    replay: ReplayConfig | None = Field(
        None,
        description="Self-distillation replay: before training the base model answers general "
        "prompts (cached) and its replies are mixed into the training rows at this fraction, "
        "so tuning keeps its general behaviour. null: off. A number is the fraction: "
        "replay: 0.1; or a section with the keys that follow. In a preference run each replay "
        "row adds its mean token loss as one unit beside the pairs (or kto's rows).",
    )
    mask: Literal["assistant", "last_assistant", "all"] = Field(
        "assistant",
        description="Which tokens carry loss: every assistant reply (default), only the last "
        "one, or every token.",
    )

    @field_validator("validation", mode="before")
    @classmethod
    def _validation_number(cls, v):
        # YAML 1.1 reads 5e-2 (no dot) as a string; a string that is a number is a fraction,
        # not a file name (a file literally named so can be given as ./5e-2)
        if isinstance(v, str):
            try:
                return float(v.strip())
            except ValueError:
                return v
        return v

    @field_validator("replay", mode="before")
    @classmethod
    def _replay_fraction(cls, v):
        if isinstance(v, int | float) and not isinstance(v, bool):
            return {"fraction": v}
        return v

    @model_validator(mode="after")
    def _has_data(self) -> DataConfig:
        if self.builtin is None and not self.sources:
            raise ValueError("no training data: set data.builtin or add data.sources")
        if isinstance(self.validation, float) and not 0.0 <= self.validation < 1.0:
            raise ValueError("data.validation: a fraction must be in [0, 1)")
        return self


METHOD_BETA = {"dpo": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}


class PreferenceConfig(_Section):
    """train.objective's knobs when it is a preference method (peers' defaults beside ours are
    in the README's "Preference tuning" section and train/preference.py)."""

    beta: float | None = Field(
        None,
        gt=0,
        description="Strength of the preference term. null: the method's default (dpo 0.1, "
        "ipo's tau 0.1, simpo 2.0, orpo 0.1 (its lambda), kto 0.1).",
    )
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid",
        description="dpo only: sigmoid (DPO), ipo (IPO; beta is its tau) or hinge (RSO's hinge).",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="dpo (sigmoid) and simpo: the share of labels taken as flipped "
        "(conservative DPO), for noisy preference data.",
    )
    gamma: float = Field(0.5, ge=0, description="simpo only: the target reward margin.")
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="dpo and simpo: weight of a supervised term, the chosen reply's mean token "
        "loss (TRL's rpo_alpha); the remedy for chosen log-probs that fall while training.",
    )
    desirable_weight: float = Field(1.0, gt=0, description="kto only: weight of desirable rows.")
    undesirable_weight: float = Field(
        1.0, gt=0, description="kto only: weight of undesirable rows."
    )
    precompute_reference: bool = Field(
        False,
        description="dpo: score every row with the reference model once before training and "
        "train with those log-probs, so no reference forward runs while training (and full "
        "fine-tuning needs no frozen copy of the model).",
    )

    def beta_for(self, objective: str) -> float:
        return self.beta if self.beta is not None else METHOD_BETA[objective]


class TrainConfig(_Section):
    output_dir: str = Field("runs", description="Parent folder of run directories.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(
        None,
        gt=0,
        description="Stop after this many optimiser steps (overrides epochs; null: epochs decide).",
    )
    batch_size: int = Field(8, gt=0, description="Rows per micro-batch (per process).")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimiser step.")
    warmup_ratio: float = Field(
        0.05, ge=0, le=1, description="Fraction of steps spent warming up the learning rate."
    )
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warmup."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the gradient norm to this (null: no clipping)."
    )
    seed: int = Field(0, description="Seed for weights init, adapters, shuffling and dropout.")
    log_every: int = Field(5, gt=0, description="Write metrics every N optimiser steps.")
    eval_every: int | None = Field(
        None,
        gt=0,
        description="Validation loss every N optimiser steps (always once at the end when "
        "there is a validation split; null: only then).",
    )
    early_stopping_patience: int | None = Field(
        None,
        gt=0,
        description="Stop when validation loss has not improved for this many evaluations (null: "
        "no early stopping).",
    )
    select_best: bool = Field(
        False,
        description="final/ gets the weights with the lowest validation loss "
        "(checkpoints/best) instead of the last ones.",
    )
    save_every: int | None = Field(
        None,
        gt=0,
        description="Write a checkpoint every N steps (always one at the end; null: only "
        "that one).",
    )
    keep_checkpoints: int = Field(2, ge=1, description="Keep the last N step checkpoints.")
    barrier_timeout_min: float = Field(
        180,
        gt=0,
        description="Several processes: how long one waits for the others at a barrier, in "
        "minutes. The others wait while the main process evaluates the base model and writes "
        "the report, which can exceed the collective libraries' defaults (NCCL: 10 minutes) on "
        "real models; a process that dies still stops the run after this long at worst.",
    )
    resume: str | None = Field(
        None,
        description="auto: continue from the run directory's last complete checkpoint (start "
        "afresh when there is none); or the path of a checkpoint. Weights, optimiser, "
        "scheduler, RNG and data position are restored. null: start afresh.",
    )
    autocast: Literal["fp32", "auto", "bf16"] = Field(
        "fp32",
        description="Matrix products of training's forward and backward in bf16 while the "
        "weights, gradients and optimiser state stay float32 (mixed precision). auto: bf16 on a "
        "CPU with native bf16 (AVX512_BF16 or AMX; training steps 1.2-1.7x faster measured), "
        "float32 elsewhere; bf16: always; fp32 (or off): float32 throughout. Weights that are "
        "themselves bf16/fp16 (model.dtype) always train under autocast to their dtype. "
        "Evaluation and generation run in the model's dtype either way.",
    )

    @field_validator("autocast", mode="before")
    @classmethod
    def _autocast_off(cls, v):
        # YAML 1.1 reads a bare off (or no, false) as False
        return "fp32" if v is False else v

    mmap_threshold_mb: float = Field(
        0.0625,
        gt=0,
        le=32,  # glibc's ceiling
        description="CPU (glibc): host allocations at least this large get their own memory "
        "mapping, given back when freed. The default (64 KiB) keeps peak memory lowest; 16 to "
        "32 lets freed activations be reused from the heap: faster training at the cost of "
        "more memory (the README's Benchmarks have the figures).",
    )
    gradient_checkpointing: bool | float = Field(
        False,
        description="Recompute activations in backward to save memory: true for every decoder "
        "layer, or a fraction in (0, 1] of the layers (spread evenly; e.g. 0.67 recomputes two "
        "layers in three), trading less memory saved for less recomputation.",
    )

    objective: Literal["sft", "dpo", "simpo", "orpo", "kto"] = Field(
        "sft",
        description="sft: supervised tuning on instruction rows. dpo (with "
        "train.preference.loss_type sigmoid, ipo or hinge), simpo, orpo: preference tuning on "
        "pairs (prompt, chosen, rejected); kto: on labelled replies (or pairs, each split in "
        "two). dpo and kto compare against a reference: the starting model (LoRA: the same "
        "weights with the adapters off).",
    )
    preference: PreferenceConfig = Field(
        default_factory=PreferenceConfig, description="Preference objectives' settings."
    )
    kl_to_base: float = Field(
        0.0,
        ge=0,
        description="Weight of a KL(base || tuned) term on the replay rows (data.replay), added "
        "to the loss per supervised token. LoRA takes the base's distribution from the same "
        "model with its adapters switched off; full fine-tuning needs a frozen copy.",
    )
    compile: bool = Field(
        False,
        description="Compile each decoder layer with torch.compile while training (needs a C++ "
        "compiler on CPU, triton on CUDA). Fuses the pointwise work between matrix products, "
        "so steps after the first run faster; the first pays a one-off compile (shorter once "
        "inductor's cache holds it). The README's Benchmarks have the figures.",
    )
    shard: Literal["none", "fsdp"] = Field(
        "none",
        description="Several processes: none keeps a whole copy of the model in each (data "
        "parallel); fsdp shards weights, gradients and optimiser state across them (torch's "
        "FSDP2, one decoder layer at a time), for models whose training state does not fit one "
        "GPU. Checkpoints and final/ hold the full model either way. One process: no effect.",
    )

    @field_validator("gradient_checkpointing")
    @classmethod
    def _checkpoint_fraction(cls, v):
        if isinstance(v, bool):
            return v
        if v == 0.0:  # none of the layers
            return False
        if not 0.0 < v <= 1.0:
            raise ValueError("a fraction of layers must be in (0, 1]; or use true / false")
        return True if v == 1.0 else v


METRIC_NAMES = Literal["auto", "exact_match", "contains", "token_f1", "rouge_l", "choice", "drift"]


class SuiteConfig(_Section):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Suite name; results go to eval/<name>.json and eval/<name>.jsonl.",
    )
    path: str = Field(
        description="A file of evaluation rows in any format the data pipeline reads; the "
        "reference is the row's reference (or references, a list) field, else its last "
        "assistant reply. Rows with choices (a list) and answer (text or index) are scored by "
        "log-likelihood. With metric drift, rows need only a prompt: each is scored against "
        "the base model's own reply (drift, reply length; ROUGE-L where a reference is given)."
    )
    metric: METRIC_NAMES = Field(
        "auto",
        description="Primary metric. auto: choice when rows have choices, else exact_match. "
        "drift: open prompts scored against the base model (see the general_gen suite).",
    )
    format: Literal[
        "auto", "messages", "sharegpt", "alpaca", "prompt_completion", "selfinstruct"
    ] = Field("auto", description="Row format; auto detects it from each row's keys.")
    max_examples: int | None = Field(
        None,
        gt=0,
        description="At most this many examples per cluster (sampled by seed; null: all).",
    )
    max_new_tokens: int | None = Field(
        None, gt=0, description="Longest generated answer, in tokens (null: eval.max_new_tokens)."
    )


SUITE_NAMES = ("builtin", "general", "general_gen", "data")


class EvalConfig(_Section):
    suites: list[str | SuiteConfig] = Field(
        default_factory=lambda: ["builtin"],
        description="Evaluation suites. builtin: the held-out split of the built-in tasks; "
        "general: everyday knowledge outside the tuning data, scored by choice; general_gen: "
        "open everyday requests scored by generation against the base model (drift, reply "
        "length); both guard against forgetting. data: the "
        "recipe's validation rows and the rows of held-out clusters; or a file of your own as "
        "{name: NAME, path: FILE}, with the keys that follow.",
    )
    before: bool = Field(True, description="Evaluate the untuned model before training.")
    after: bool = Field(True, description="Evaluate the tuned model after training.")
    max_new_tokens: int = Field(32, gt=0, description="Longest generated answer, in tokens.")
    gen_max_new_tokens: int = Field(
        64,
        gt=0,
        description="Longest reply to an open prompt, in tokens (general_gen, and file suites "
        "with metric drift that set no max_new_tokens of their own).",
    )
    general_gen_per_kind: int | None = Field(
        None,
        gt=0,
        description="general_gen: at most this many prompts of each of its 8 kinds (17 each, 136 "
        "in all; the same ones every run; null: all). Fewer prompts evaluate faster, with wider "
        "intervals.",
    )
    batch_size: int = Field(32, gt=0, description="Prompts generated together.")
    holdout_clusters: list[str] = Field(
        default_factory=list,
        description="Task clusters kept out of training entirely (the FLAN/T0 protocol) and "
        "reported apart as unseen. Matches the built-in clusters and a data row's cluster "
        "(or task) field.",
    )
    data_metric: METRIC_NAMES = Field(
        "auto",
        description="Primary metric of the data suite. auto: rouge_l (rows are free text).",
    )
    max_per_cluster: int = Field(
        40, gt=0, description="Data suite: at most this many rows per cluster (by seed)."
    )

    during_training: str | None = Field(
        None,
        description="A suite (one of eval.suites) scored on a sample at every validation point "
        "(train.eval_every); checkpoints/best, train.select_best and early stopping then "
        "follow its score instead of the validation loss. null: none.",
    )
    during_training_sample: int = Field(
        32, gt=0, description="Examples of the during_training suite scored each time."
    )

    @model_validator(mode="after")
    def _known_suites(self) -> EvalConfig:
        names = []
        for s in self.suites:
            if isinstance(s, str) and s not in SUITE_NAMES:
                raise ValueError(
                    f"eval.suites: unknown suite '{s}'; use one of {', '.join(SUITE_NAMES)} or "
                    "{name: ..., path: FILE} for a file of your own"
                )
            names.append(s if isinstance(s, str) else s.name)
        if self.during_training is not None and self.during_training not in names:
            raise ValueError(
                f"eval.during_training: '{self.during_training}' is not one of eval.suites "
                f"({', '.join(names)})"
            )
        drift = ["general_gen"] + [
            s.name for s in self.suites if isinstance(s, SuiteConfig) and s.metric == "drift"
        ]
        if self.during_training in drift:
            raise ValueError(
                f"eval.during_training: '{self.during_training}' measures drift from the base "
                "model (lower is better), not a task score; pick a task suite"
            )
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"eval.suites: suite name(s) used twice: {', '.join(dupes)}")
        return self


class ReportConfig(_Section):
    price_per_hour: float = Field(
        0.10,
        ge=0,
        description="Price of one device-hour (this machine, a GPU, ...) for the report's cost "
        "estimate, in report.currency.",
    )
    currency: str = Field(
        "USD",
        min_length=1,
        max_length=12,
        description="Currency of report.price_per_hour, printed beside every cost (USD, EUR, ...).",
    )


class Recipe(_Section):
    name: str = Field(
        "run",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Run name; the run directory is <train.output_dir>/<name>.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The pretrained model.")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="What is trained.")
    data: DataConfig = Field(
        default_factory=lambda: DataConfig(builtin=BuiltinDataConfig()),
        description="Training data.",
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    report: ReportConfig = Field(default_factory=ReportConfig, description="The run's report.")

    @model_validator(mode="after")
    def _quantized_base_trains_adapters(self) -> Recipe:
        if self.model.quantize != "none" and self.adapter.method != "lora":
            raise ValueError(
                "model.quantize: a 4-bit base cannot be fully fine-tuned; use adapter.method: "
                "lora (QLoRA) or model.quantize: none"
            )
        return self

    @model_validator(mode="after")
    def _kl_needs_replay(self) -> Recipe:
        if self.train.objective == "sft" and self.train.kl_to_base > 0 and self.data.replay is None:
            raise ValueError(
                "train.kl_to_base: the KL term is taken on replay rows; set data.replay (a "
                "fraction such as 0.1) or train.kl_to_base: 0"
            )
        return self

    @model_validator(mode="after")
    def _preference_data(self) -> Recipe:
        t, d = self.train, self.data
        if t.objective == "sft":
            return self
        where = f"train.objective: {t.objective}"
        if d.builtin is not None and d.builtin.train_per_family > 0:
            raise ValueError(
                f"{where} trains on preference pairs, and data.builtin gives supervised rows; "
                "set data.builtin.train_per_family: 0 (its evaluation split still feeds the "
                "builtin suite) and add a pair file to data.sources (instill pairs make writes "
                "one from the built-in tasks)"
            )
        if not d.sources:
            raise ValueError(f"{where}: add a file of preference pairs to data.sources")
        if t.kl_to_base > 0:
            raise ValueError(
                f"{where}: train.kl_to_base is a supervised run's term; a preference run holds "
                "the model near its start through data.replay (the start's own replies to "
                "general prompts, trained as supervised rows among the pairs) and, for dpo and "
                "kto, the reference model; set train.kl_to_base: 0"
            )
        if t.objective == "kto" and t.preference.precompute_reference:
            raise ValueError(
                "train.preference.precompute_reference: kto's reference point is taken on each "
                "batch's mismatched rows, which change with the batch; set it to false for kto"
            )
        if t.preference.loss_type != "sigmoid" and t.objective != "dpo":
            raise ValueError(
                f"train.preference.loss_type: {t.preference.loss_type} applies to "
                "train.objective: dpo only"
            )
        return self

    @model_validator(mode="after")
    def _validation_needed(self) -> Recipe:
        t = self.train
        if (
            t.early_stopping_patience or t.select_best or t.eval_every
        ) and not self.data.validation:
            raise ValueError(
                "train.eval_every, train.early_stopping_patience and train.select_best need a "
                "validation split: set data.validation (a fraction such as 0.05, or a file)"
            )
        if self.eval.during_training is not None and not t.eval_every:
            raise ValueError(
                "eval.during_training scores the model at every validation point: set "
                "train.eval_every (and data.validation)"
            )
        return self


class ServeConfig(_Section):
    """`instill serve`'s settings (a command's options, not a recipe section)."""

    api_key: str | None = Field(None, description="Required bearer key; null: no key.")
    max_batch: int = Field(8, ge=1, description="Requests decoded together.")
    max_concurrent: int = Field(64, ge=1, description="Requests in flight before 429.")
    max_tokens_cap: int = Field(
        1024, ge=1, description="Largest max_tokens a request may ask, in tokens."
    )
    max_n: int = Field(1, ge=1, description="Largest n (replies per request) a request may ask.")
    max_body_bytes: int = Field(1_000_000, ge=1, description="Largest request body read, in bytes.")
    host: str = Field(
        "127.0.0.1",
        description="Address to listen on (beyond loopback, set an API key). Requests must name "
        "it, or an allowed host, in their Host header.",
    )
    allowed_hosts: tuple[str, ...] = Field(
        (), description="More names to answer to; '*' turns the Host check off."
    )
    int8: bool = Field(
        False,
        description="Decode with int8 weights (torch engine, CPU; refused where a timed product "
        "says int8 is slower): the Linear "
        "layers' weights a quarter of the bytes; replies often differ from the model as "
        "trained's within 32 tokens (README, Generation).",
    )

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, key: str | None) -> str | None:
        # an empty key would compare equal to a missing Authorization header's: auth off
        if key is not None and not key.strip():
            raise ValueError(
                "the API key is empty, which would turn authentication off; give a key, or "
                "set none to serve without one"
            )
        return key


class SamplingConfig(_Section):
    """The sampling settings of `instill generate` and `instill chat` (options, and chat's
    /params), with the engine's defaults (GenParams, which a test holds equal)."""

    max_new_tokens: int = Field(256, gt=0, description="Longest reply, in tokens.")
    temperature: float = Field(
        0.0,
        ge=0,
        description="Divides the logits before sampling: higher is more varied. 0 is greedy "
        "(the most likely token every step; top-k, top-p and the seed then do nothing).",
    )
    top_k: int = Field(
        0, ge=0, description="Sample from the k most likely tokens only (0: all tokens)."
    )
    top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Sample from the most likely tokens whose probabilities add up to this "
        "share, 0 to 1 (nucleus sampling; 1: all tokens).",
    )
    repetition_penalty: float = Field(
        1.0,
        gt=0,
        description="Make tokens already in the prompt or reply less likely: positive logits "
        "are divided by it, negative ones multiplied (1: off; above 1 repeats less). Applies "
        "to greedy decoding too.",
    )
    seed: int | None = Field(
        None,
        description="Seed of sampling: the same seed, settings and prompt give the same reply "
        "(default: a fresh random draw each time).",
    )


class PairsConfig(_Section):
    """The options of `instill pairs make`: sample replies to training prompts whose answers can
    be checked, and pair a passing reply with a failing one."""

    k: int = Field(4, ge=2, description="Replies sampled for each prompt (at least 2).")
    temperature: float = Field(
        0.8,
        gt=0,
        description="Sampling temperature (above 0: greedy replies would all be the same).",
    )
    per_family: int | None = Field(
        None,
        gt=0,
        description="Built-in tasks: training prompts per family (default 8). A suite file: at "
        "most this many rows per cluster, picked by --seed (default: all).",
    )
    seed: int = Field(
        0,
        description="Seed of the built-in prompts, of each reply's sampling and of the pick of "
        "the rejected reply: the same seed gives the same file.",
    )
    max_new_tokens: int | None = Field(
        None,
        gt=0,
        description="Longest reply, in tokens; a reply cut there never passes (default: a run's "
        "eval.max_new_tokens, else 32, what evaluation scores).",
    )
    threshold: float = Field(
        1.0,
        gt=0,
        le=1,
        description="A reply passes when its score reaches this (0 to 1). The built-in "
        "scorers, exact_match and contains score 0 or 1; token_f1 and rouge_l are graded.",
    )
    batch_size: int = Field(32, gt=0, description="Replies generated together.")
    pairs_per_prompt: int = Field(
        1,
        ge=1,
        description="Most pairs from one prompt: each further pair rejects another distinct "
        "failing reply (against the next distinct passing one), so more pairs come from the "
        "same samples. Pairs of one prompt stay on one side of the validation split.",
    )


def default(section: type[BaseModel], key: str):
    """A field's default: where a command-line option sets the same thing as a config field, the
    option's default is read here, so the two cannot disagree."""
    return section.model_fields[key].get_default(call_default_factory=True)


def describe(section: type[BaseModel], key: str) -> str:
    """A field's description, for the --help of the option that sets it."""
    return section.model_fields[key].description or ""
