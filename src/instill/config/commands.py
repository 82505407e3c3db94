"""The options of the commands that take no recipe (eval, chat, generate, export, report, ...),
each documented once: a field's default is the option's default and its description the option's
--help, so the two cannot drift apart (cli.option builds the typer option from the field).
Where an option sets the same thing as a recipe key, the field takes that key's default and
description from schema.py instead of copying them.

These models check nothing the commands did not check before; the domain checks stay where the
work is done (eval.command, export.run, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from instill.config.load import allowed_values
from instill.config.schema import (
    BuiltinDataConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    ReportConfig,
    SuiteConfig,
    default,
    describe,
)


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def default_of(section: type[BaseModel], key: str, description: str | None = None) -> Any:
    """A field whose default is the recipe key `section.key`'s (and, unless given, its
    description): the option is that key under another name. The link is kept on the field, so
    the CLI reads the key's default itself (option_default) and follows it when it changes."""
    return Field(
        default(section, key),
        description=describe(section, key) if description is None else description,
        json_schema_extra={"default_of": f"{section.__name__}.{key}"},
    )


def option_default(options: type[BaseModel], key: str) -> Any:
    """The default of `options.key`: the linked recipe key's (default_of), else its own."""
    from instill.config import schema

    field = options.model_fields[key]
    link = (field.json_schema_extra or {}).get("default_of")
    if isinstance(link, str):
        section, name = link.split(".")
        return default(getattr(schema, section), name)
    return default(options, key)


MODEL = "A run directory, a final/ directory, or a model name."
CHAT_TEMPLATE = (
    "Jinja chat template file replacing the model's own (needed when it has none); the same as "
    "a recipe's model.chat_template."
)
ENGINES = ("torch", "llama.cpp")
LORA = "--engine llama.cpp: a LoRA adapter GGUF to apply."


class EvalOptions(_Options):
    """`instill eval`: score a model on evaluation suites."""

    suite: list[str] = Field(
        default_factory=lambda: ["builtin"],
        description="builtin, general, general_gen, or a file of rows with references (repeat "
        "for several; a file is scored against the base model's replies with --metric drift).",
    )
    output: Path | None = Field(
        None,
        description="Folder for results (default: a run's evals/<name>/, beside the run's own "
        "eval/; runs/eval for a model that is not a run).",
    )
    name: str | None = Field(
        None,
        description="A run: the name of this evaluation, written to <run>/evals/<name>/ "
        "(default: the suites and the options that differ from the run's, e.g. builtin or "
        "builtin.per_family-4).",
    )
    replace_run_results: bool = Field(
        False,
        description="A run: write over the run's own tuned results in <run>/eval/ (what compare "
        "and report read), on the run's split only.",
    )
    metric: str = default_of(
        SuiteConfig,
        "metric",
        "Primary metric of file suites: "
        f"{', '.join(allowed_values(SuiteConfig.model_fields['metric'].annotation))}. "
        + describe(SuiteConfig, "metric").removeprefix("Primary metric. "),
    )
    holdout: list[str] = Field(
        default_factory=list,
        description="A cluster the model was not tuned on, reported as unseen (repeatable; "
        "default: none, or a run's own held-out clusters).",
    )
    per_family: int | None = Field(
        None,
        description="Built-in suite: held-out examples per family (default "
        f"{default(BuiltinDataConfig, 'eval_per_family')}; a run: its own split, as are "
        "--seed, --holdout and --max-new-tokens).",
    )
    max_examples: int | None = Field(
        None,
        description="File suites: at most N examples per cluster, picked by --seed (default: all).",
    )
    seed: int | None = Field(
        None,
        description="Seed of the built-in task generator and of --max-examples' pick (default "
        f"{default(BuiltinDataConfig, 'seed')}); answers are greedy, so it does not sample.",
    )
    batch_size: int = default_of(EvalConfig, "batch_size")
    max_new_tokens: int | None = Field(
        None,
        description=f"Longest generated answer (default {default(EvalConfig, 'max_new_tokens')}; "
        "an export of a run: the run's).",
    )
    general_gen_per_kind: int | None = Field(
        None,
        description="general_gen: at most N prompts of each kind (default: a run's own, else "
        "all 136).",
    )
    base: str | None = Field(
        None,
        description="Drift suites (general_gen, --metric drift): the base model whose replies "
        "the model is scored against. Default: a run's own base model, else the model itself.",
    )
    chat_template: Path | None = Field(None, description=CHAT_TEMPLATE)
    engine: str = Field(
        "torch",
        description="torch, or llama.cpp: a .gguf file (or a GGUF export folder) answered by "
        "llama.cpp as deployed (needs the llamacpp extra; generated-answer suites only).",
    )
    lora: str | None = Field(None, description=LORA)


class EvalPairsOptions(_Options):
    """`instill eval-pairs`: preference on held-out pairs."""

    pairs: Path = Field(
        description="Held-out preference pairs (prompt/chosen/rejected or any pair format)."
    )
    reference: str | None = Field(
        None,
        description="Model for the implicit reward (log-ratio to it). Default: a run's starting "
        "model (its model.name), which is also scored as the 'before' side; else none.",
    )
    max_length: int = default_of(
        DataConfig, "max_length", "Prompt plus reply, in tokens; longer replies are cut to fit."
    )
    batch_size: int = Field(8, description="Pairs per forward (each is two rows).")
    output: Path | None = Field(
        None,
        description="Folder for preference.json and preference.jsonl (default: a run's "
        "evals/pairs-<file>/; runs/eval/pairs-<file>/ for a model that is not a run). The run "
        "report shows <run>/eval/preference.json.",
    )
    chat_template: Path | None = Field(None, description=CHAT_TEMPLATE)


class CompareOptions(_Options):
    """`instill compare`."""

    as_json: bool = Field(False, description="Print the comparison as JSON.")
    evaluation: str | None = Field(
        None,
        description="With one run: its tuned side from a later evaluation, <run>/evals/<name>/ "
        "(default: the run's own results in <run>/eval/).",
    )


class ReportOptions(_Options):
    """`instill report`."""

    price_per_hour: float | None = Field(
        None,
        description="Price of a device-hour for the cost estimate, in the run's report.currency "
        f"(default {default(ReportConfig, 'currency')}) (default: the run's "
        f"report.price_per_hour, else {default(ReportConfig, 'price_per_hour')}).",
    )


class TrainOptions(_Options):
    """`instill train` (the recipe holds everything else)."""

    overwrite: bool = Field(False, description="Replace an existing run directory.")


class QuickstartOptions(_Options):
    """`instill quickstart` (its recipe holds everything else)."""

    overwrite: bool = Field(False, description="Replace an existing runs/quickstart.")


class TransferOptions(_Options):
    """`instill experiment transfer`."""

    max_steps: int | None = Field(
        None,
        description="Optimiser steps of every training, the budget (default: the recipe's "
        "train.max_steps, else its epochs).",
    )
    overwrite: bool = Field(False, description="Replace an existing experiment folder.")
    resume: bool = Field(
        False, description="Continue an interrupted experiment: finished trainings are kept."
    )


class ChatOptions(_Options):
    """`instill chat` (its sampling options are SamplingConfig's)."""

    system: str | None = Field(None, description="System prompt (default: none).")
    chat_template: Path | None = Field(None, description=CHAT_TEMPLATE)
    int8: bool = Field(
        False,
        description="Decode with int8 weights (CPU; refused where a timed product says int8 is "
        "slower, as on every CPU measured so far): the Linear layers' weights a "
        "quarter of the bytes; replies often differ from the model as trained's within 32 "
        "tokens (README, Generation).",
    )


class GenerateOptions(_Options):
    """`instill generate` (its sampling options are SamplingConfig's)."""

    input: Path = Field(description="JSONL: rows with 'messages' or 'prompt'.")
    output: Path = Field(description="JSONL written row by row; rerun to resume.")
    batch_size: int = Field(8, description="Rows generated together.")


class ServeOptions(_Options):
    """The options of `instill serve` that are not the server's settings (ServeConfig)."""

    port: int = Field(8000, description="Port to listen on.")
    api_key: str | None = Field(
        None,
        description="Required bearer key. Prefer env INSTILL_API_KEY or --api-key-file: a value "
        "on the command line is visible to other users in ps.",
    )
    api_key_file: Path | None = Field(None, description="File holding the bearer key (first line).")
    allowed_host: list[str] = Field(
        default_factory=list,
        description="Another name clients reach the server by (the Host header; repeatable). "
        "Default: the --host address, and localhost names when it is loopback. '*' answers any "
        "name (turns off the DNS-rebinding check).",
    )
    engine: str = Field(
        "torch",
        description="torch, or llama.cpp: a .gguf file (or a GGUF export folder) decoded by "
        "llama.cpp in-process, one request at a time (needs the llamacpp extra).",
    )
    lora: str | None = Field(None, description=LORA)


class PairsSourceOptions(_Options):
    """Where `instill pairs make` takes its prompts from (its sampling is PairsConfig's)."""

    out: Path = Field(
        description="Pairs JSONL to write (format pairs); a summary goes to OUT.summary.json."
    )
    suite: str = Field(
        "builtin",
        description="builtin (the built-in families' training split), or a file of rows with "
        "reference answers (as `instill eval --suite FILE` reads).",
    )
    metric: str = Field(
        "auto",
        description="A suite file's scorer: exact_match (auto), contains, token_f1 or rouge_l.",
    )
    holdout: list[str] = Field(
        default_factory=list,
        description="A cluster whose prompts are never sampled (repeatable). A run's own "
        "eval.holdout_clusters are always left out too.",
    )
    kto: Path | None = Field(
        None,
        description="Also write every distinct reply as a prompt/completion/label row (KTO).",
    )
    family: list[str] = Field(
        default_factory=list,
        description="Built-in tasks: sample only this family (repeatable; default: every "
        "family), e.g. those whose pass rate leaves room. Other families' prompts are unchanged "
        "by it.",
    )


class InspectOptions(_Options):
    """`instill data inspect`."""

    model: str = default_of(ModelConfig, "name", "Tokenizer and template to use.")
    rows: int = Field(2, description="How many rows to show rendered.")
    max_length: int = default_of(
        DataConfig,
        "max_length",
        "A data file: longest tokenised row, in tokens (a recipe: its data.max_length).",
    )
    as_json: bool = Field(False, description="Print the numbers as JSON.")


class ExportOptions(_Options):
    """`instill export`."""

    fmt: str = Field(
        "hf",
        description="hf, gguf (merged) or gguf-lora (a llama.cpp adapter for the run's base GGUF).",
    )
    quant: str | None = Field(
        None,
        description="GGUF type: f32, f16, q8_0, q4_0, q4_1, or auto (per-tensor types chosen by "
        "measurement; default: the GGUF base's own); or, quantised by llama.cpp's own quantizer "
        "(the llamacpp extra), q6_k, q5_k_m, q5_k_s, q5_0, q5_1, q4_k_m, q4_k_s, iq4_xs, "
        "iq4_nl, q3_k_l, q3_k_m, q3_k_s, q2_k, without an importance matrix (llama-cpp-python "
        "cannot make one). gguf-lora: f32, f16 (default), q8_0.",
    )
    max_size: float | None = Field(
        None,
        description="--quant auto: the file's size budget in MB (default: 5.5 bits a weight).",
    )
    dtype: str = Field("fp32", description="HF weights dtype: fp32, fp16, bf16.")
    parts: str = Field("merged", description="HF: merged, adapter or both.")
    output: Path | None = Field(
        None, description="Output directory (default RUN/export/FORMAT-TYPE)."
    )
    overwrite: bool = Field(False, description="Replace an existing output directory.")
    dequantize: bool = Field(
        False,
        description="Merge an adapter trained on a 4-bit base into the full-precision base.",
    )
    min_agreement: float | None = Field(
        None,
        description="Replace the verification's greedy-agreement floor, a share from 0 to 1 "
        "(lower accepts more drift; default: the export type's own floor, printed with the "
        "check).",
    )
    copy_base: bool = Field(
        False,
        description="gguf-lora: put the base GGUF into the export folder (hardlinked on the same "
        "filesystem, else copied; sha256 checked), so the folder is self-contained and movable.",
    )
