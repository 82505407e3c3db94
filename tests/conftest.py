"""Shared fixtures: the real SmolLM2 tokenizer, and tiny random Llama models built from a config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# The GGUF -> safetensors conversion of the default model is cached here across test runs.
os.environ.setdefault("INSTILL_HOME", str(REPO / ".pytest_cache" / "instill-home"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# train.autocast: auto (the shipped recipes) trains in float32 here unless a test asks for the
# CPU's bf16 (tests/test_e2e.py runs the quickstart as this machine would); the tiny-model tests
# then give the same numbers on every CPU
os.environ.setdefault("INSTILL_CPU_BF16", "0")


@pytest.fixture(scope="session")
def default_source():
    """The default model, converted from its GGUF once (about 30 s) and cached."""
    import transformers

    from instill.models import resolve_model

    transformers.logging.set_verbosity_error()
    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(default_source):
    from instill.config import ModelConfig
    from instill.models import load_tokenizer

    return load_tokenizer(default_source.path, ModelConfig())


def build_tiny(tokenizer, seed: int = 0, tied: bool = True):
    """A 2-layer, 64-dim Llama with the real SmolLM2 vocabulary, random weights. Tied, its
    greedy reply repeats the prompt's last token (the residual stream stays near that token's
    embedding): every chat reply is newlines. Untied, its replies are varied words."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def adapter_run(run: Path, model, tokenizer, source) -> Path:
    """A run folder as training leaves it for `instill export`: final/ (the peft adapter and the
    tokenizer), config.yaml naming the GGUF base and run.json recording it (path, sha256).
    `source` is resolve_model's ModelSource of that base."""
    import json

    import yaml

    model.save_pretrained(run / "final")
    tokenizer.save_pretrained(run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": source.gguf_path}}))
    record = {
        "name": source.gguf_path,
        "kind": "gguf",
        "path": source.path,
        "sha256": source.sha256,
    }
    (run / "run.json").write_text(json.dumps({"model": record}))
    return run


@pytest.fixture
def tiny(tokenizer):
    return build_tiny(tokenizer)


@pytest.fixture
def chatty(tokenizer):
    """The tiny model with its own output layer: replies differ by prompt, so a test of what
    generation returns can tell one prompt's reply from another's."""
    return build_tiny(tokenizer, tied=False)


RECIPES = REPO / "src" / "instill" / "recipes"
# The built-in data of every tiny run: two task families, 6 training and 2 eval rows each.
TINY_DATA = [
    "data.builtin.families=[addition,uppercase]",
    "data.builtin.train_per_family=6",
    "data.builtin.eval_per_family=2",
]


@pytest.fixture(scope="session")
def builtin_data(tokenizer):
    """data(per_family): the built-in data of TINY_DATA's two families, `per_family` training
    rows each, built once per size for the session."""
    from instill.config import BuiltinDataConfig, DataConfig
    from instill.data.dataset import build_data

    built = {}

    def data(per_family: int):
        if per_family not in built:
            builtin = BuiltinDataConfig(
                train_per_family=per_family, families=["addition", "uppercase"]
            )
            cfg = DataConfig(builtin=builtin)
            built[per_family] = build_data(tokenizer, cfg)
        return built[per_family]

    return data


@pytest.fixture(scope="session")
def tiny_recipe(tiny_dir):
    """make(out, *overrides, recipe="quickstart.yaml"): a shipped recipe run on the tiny model,
    writing under `out`, with TINY_DATA; `overrides` come last, so they win."""
    from instill.config import load_recipe

    def make(out, *overrides: str, recipe: str = "quickstart.yaml"):
        return load_recipe(
            RECIPES / recipe,
            [f"model.name={tiny_dir}", f"train.output_dir={out}", *TINY_DATA, *overrides],
        )

    return make


@pytest.fixture(scope="session")
def tiny_dir(tokenizer, tmp_path_factory):
    """The tiny model saved as a local Hugging Face directory (loadable by model.name)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
