from pathlib import Path

import pytest
from pydantic import ValidationError

from instill.config import load_recipe, recipe_help
from instill.config.load import apply_overrides
from instill.errors import InstillError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "src" / "instill" / "recipes").rglob("*.yaml"))


def test_recipes_are_shipped():
    assert {p.stem for p in SHIPPED} >= {"quickstart", "lora", "full"}
    # the repository's recipes/ is the packaged folder, not a copy
    assert sorted(p.name for p in (REPO / "recipes").rglob("*.yaml")) == [p.name for p in SHIPPED]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem


def test_dotted_overrides_and_types():
    recipe = load_recipe(
        REPO / "recipes" / "lora.yaml",
        ["train.lr=1e-4", "adapter.r=8", "adapter.target_modules=[q_proj,v_proj]"],
    )
    assert recipe.train.lr == 1e-4
    assert recipe.adapter.r == 8
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]


def test_overrides_do_not_mutate_input():
    data = {"train": {"lr": 1.0}}
    apply_overrides(data, ["train.lr=2"])
    assert data == {"train": {"lr": 1.0}}


def test_unknown_key_suggests_closest(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(InstillError) as err:
        load_recipe(f)
    msg = str(err.value)
    assert str(f) in msg and "'train.lrr'" in msg and "did you mean 'train.lr'" in msg


def test_unknown_section_suggests_closest():
    with pytest.raises(InstillError, match=r"unknown key 'adaptor' \(did you mean 'adapter'\?\)"):
        load_recipe(None, ["adaptor.r=4"])


def test_wrong_type_names_key_and_value(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("train:\n  batch_size: many\n")
    with pytest.raises(InstillError, match=r"train\.batch_size: .*integer.*'many'"):
        load_recipe(f)


def test_bad_yaml_names_line(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("train:\n  lr: [1,\n")
    with pytest.raises(InstillError, match=r"line \d+ is not valid YAML"):
        load_recipe(f)


def test_recipe_is_frozen():
    recipe = load_recipe(None)
    with pytest.raises(ValidationError):
        recipe.train.lr = 3.0


def test_no_data_is_an_error():
    with pytest.raises(InstillError, match="no training data"):
        load_recipe(None, ["data.builtin=null"])


def test_help_text_comes_from_field_descriptions():
    from instill.config.schema import TrainConfig

    text = recipe_help()
    assert TrainConfig.model_fields["lr"].description in text
    assert "train.lr [default: 0.0002]" in text


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 2
