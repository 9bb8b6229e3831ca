"""The algorithm registry: one table, gin classes derived from it, no per-algorithm code
in the loop, and an unknown name listing the known ones."""

import ast
from pathlib import Path

import pytest

from jalign import config as jconfig
from jalign.errors import ConfigError
from jalign.losses.sft import sft_loss
from jalign.train import algorithms
from jalign.train.algorithm import Algorithm, custom

ROOT = Path(__file__).resolve().parents[2]


def test_every_config_class_of_the_table_is_bindable_and_every_algorithm_has_a_gin_file():
    for name, spec in algorithms.ALGORITHMS.items():
        if spec.config_class is not None:
            assert jconfig.CLASSES[spec.config_class.__name__] is spec.config_class
        assert (ROOT / "configs" / "algo" / f"{name}.gin").exists(), name
        algo = algorithms.build(name)
        assert isinstance(algo, Algorithm) and algo.config == (
            spec.config_class() if spec.config_class else None)


def test_unknown_algorithm_lists_the_known_ones():
    with pytest.raises(ConfigError) as e:
        algorithms.spec("ppo2")
    for name in algorithms.ALGORITHMS:
        assert repr(name) in str(e.value)
    assert "TrainConfig.algorithm='ppo2'" in str(e.value)


def test_a_new_algorithm_is_one_table_entry(monkeypatch):
    toy = algorithms.AlgorithmSpec(None, lambda _: custom(sft_loss), "a test entry")
    monkeypatch.setitem(algorithms.ALGORITHMS, "toy", toy)
    jconfig.parse([], ["TrainConfig.algorithm = 'toy'"])
    algo = jconfig.algorithm(jconfig.build("TrainConfig").algorithm)
    assert algo.loss_fn is sft_loss


def test_algorithm_settings_come_from_gin():
    jconfig.parse(["configs/algo/ift.gin"], ["IFTConfig.gamma = 0.5", "IFTConfig.normalize = 'tokens'"])
    algo = jconfig.algorithm("ift")
    assert algo.config.gamma == 0.5 and algo.weight_name == "target_tokens"
    assert algo.extra_forwards == 1 and algo.frozen_models == ()
    jconfig.parse(["configs/algo/dpo.gin"])
    assert jconfig.algorithm("dpo").frozen_models == ("reference",)
    jconfig.parse(["configs/algo/dpo.gin"], ["DPOConfig.reference = 'precomputed'"])
    dpo = jconfig.algorithm("dpo")
    assert dpo.frozen_models == () and dpo.precompute is not None


def test_the_loop_names_no_algorithm():
    """No string of an algorithm's name (nor a DPO reference mode) in the loop or step:
    what differs between algorithms reaches them as Algorithm fields."""
    names = set(algorithms.ALGORITHMS) | {"in_step", "precomputed", "reference", "conversation",
                                          "preference"}
    for module in ("jalign/train/loop.py", "jalign/train/run.py", "jalign/train/step.py"):
        tree = ast.parse((ROOT / module).read_text())
        found = {n.value for n in ast.walk(tree)
                 if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in names}
        assert found == set(), f"{module} names {sorted(found)}"


def test_flops_count_extra_passes():
    from jalign.models.config import preset
    cfg = preset("tiny")
    base = algorithms.build("sft").flops_per_token(cfg, 64)
    assert algorithms.build("ift").flops_per_token(cfg, 64) == pytest.approx(base * 4 / 3)
    assert algorithms.build("dpo").flops_per_token(cfg, 64) == pytest.approx(base * 4 / 3)


def test_algorithm_model_kinds_are_the_model_classes_kinds():
    from jalign.models.heads import MODEL_KINDS as CLASSES
    from jalign.train.algorithm import MODEL_KINDS
    assert set(MODEL_KINDS) == set(CLASSES)
