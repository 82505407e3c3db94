"""The tokenised-data cache: a second run loads, and any change of input rebuilds."""

import copy
import json

import pytest

from instill.config import DataConfig, SourceConfig
from instill.data import dataset
from instill.data.dataset import build_data


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTILL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def write(path, n):
    path.write_text(
        "".join(json.dumps({"prompt": f"p{i}", "completion": "c"}) + "\n" for i in range(n))
    )
    return path


def test_second_build_loads_from_cache_with_identical_rows(tokenizer, tmp_path, home, monkeypatch):
    f = write(tmp_path / "d.jsonl", 6)
    cfg = DataConfig(sources=[SourceConfig(path=str(f))], validation=0.34)
    first = build_data(tokenizer, cfg)
    assert not first.from_cache and list((home / "data-cache").glob("*.npz"))

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(dataset, "_build_data", no_tokenizing)
    second = build_data(tokenizer, cfg)
    assert second.from_cache
    assert second.train == first.train and second.validation == first.validation
    assert second.stats == first.stats


@pytest.mark.parametrize("change", ["data", "config", "template"])
def test_any_change_rebuilds(tokenizer, tmp_path, home, change):
    f = write(tmp_path / "d.jsonl", 4)
    cfg = DataConfig(sources=[SourceConfig(path=str(f))])
    tok = tokenizer
    build_data(tok, cfg)
    if change == "data":
        write(f, 5)
    elif change == "config":
        cfg = cfg.model_copy(update={"max_length": 100})
    else:
        tok = copy.deepcopy(tokenizer)
        tok.chat_template = tokenizer.chat_template.replace("helpful", "careful")
    again = build_data(tok, cfg)
    assert not again.from_cache
    assert len(list((home / "data-cache").glob("*.npz"))) == 2
