"""Every shipped .gin file parses; model presets in gin equal the Python presets."""

from pathlib import Path

import pytest

from jalign import config as jconfig
from jalign.models.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]
GIN_FILES = sorted((ROOT / "configs").rglob("*.gin"))


def test_configs_exist():
    assert GIN_FILES, "no .gin files found under configs/"


@pytest.mark.parametrize("path", GIN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_gin_file_parses(path):
    jconfig.parse([path])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_gin_equals_preset(name):
    path = ROOT / "configs" / "model" / f"{name}.gin"
    assert path.exists(), f"preset {name} has no configs/model/{name}.gin"
    jconfig.parse([path])
    assert jconfig.model_config() == PRESETS[name]


def test_unknown_binding_fails_with_its_name():
    with pytest.raises(jconfig.ConfigError, match="hidden_sise"):
        jconfig.parse(["configs/model/tiny.gin"], ["LlamaConfig.hidden_sise = 3"])
    with pytest.raises(jconfig.ConfigError, match="NoSuchThing"):
        jconfig.parse([], ["NoSuchThing.x = 1"])
    with pytest.raises(jconfig.ConfigError, match="does not exist"):
        jconfig.parse(["configs/model/nope.gin"])


def test_bindings_override_files():
    jconfig.parse(["configs/model/tiny.gin"], ["LlamaConfig.num_layers = 5"])
    assert jconfig.model_config().num_layers == 5
