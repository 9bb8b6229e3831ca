"""The recipe registry: one table, gin classes derived from it, no per-algorithm code in
the loop, no field of a recipe that only one algorithm uses, and an unknown name listing
the known ones."""

import ast
import dataclasses
import types
from pathlib import Path

import pytest

from jalign import config as jconfig
from jalign.algos import registry
from jalign.errors import ConfigError
from jalign.losses.sft import sft_loss
from jalign.train.recipe import Recipe, custom

ROOT = Path(__file__).resolve().parents[2]


def test_every_config_class_of_the_table_is_bindable_and_every_algorithm_has_a_gin_file():
    for name, module in registry.RECIPES.items():
        config_class = getattr(module, "CONFIG", None)
        if config_class is not None:
            assert jconfig.CLASSES[config_class.__name__] is config_class
        assert (ROOT / "configs" / "algo" / f"{name}.gin").exists(), name
        recipe = registry.build(name)
        assert isinstance(recipe, Recipe) and recipe.config == (
            config_class() if config_class else None)


def test_unknown_algorithm_lists_the_known_ones():
    with pytest.raises(ConfigError) as e:
        registry.entry("ppo2")
    for name in registry.RECIPES:
        assert repr(name) in str(e.value)
    assert "TrainConfig.algorithm='ppo2'" in str(e.value)


def test_a_new_algorithm_is_one_table_entry(monkeypatch):
    toy = types.SimpleNamespace(CONFIG=None, SUMMARY="a test entry",
                                recipe=lambda _: custom(sft_loss))
    monkeypatch.setitem(registry.RECIPES, "toy", toy)
    jconfig.parse([], ["TrainConfig.algorithm = 'toy'"])
    recipe = jconfig.algorithm(jconfig.build("TrainConfig").algorithm)
    assert recipe.name == "sft_loss" and [r.name for r in recipe.roles] == ["policy"]


def test_algorithm_settings_come_from_gin():
    from jalign.train.roles import RunModels
    jconfig.parse(["configs/algo/ift.gin"], ["IFTConfig.gamma = 0.5", "IFTConfig.normalize = 'tokens'"])
    ift = jconfig.algorithm("ift")
    assert ift.config.gamma == 0.5 and ift.weight_name == "target_tokens"
    from jalign.models.config import preset
    models = RunModels.single(preset("tiny"))
    assert ift.passes(models) == 4 and [r.name for r in ift.roles] == ["policy"]
    jconfig.parse(["configs/algo/dpo.gin"])
    dpo = jconfig.algorithm("dpo")
    assert [(r.name, r.trained, r.in_step) for r in dpo.roles] == [
        ("policy", True, True), ("reference", False, True)]
    jconfig.parse(["configs/algo/dpo.gin"], ["DPOConfig.reference = 'precomputed'"])
    dpo = jconfig.algorithm("dpo")
    assert [r.name for r in dpo.roles] == ["policy"] and dpo.config.reference == "precomputed"
    jconfig.parse(["configs/algo/ppo.gin"], ["PPOConfig.value_init = 'jalign:/some/rm'"])
    ppo = jconfig.algorithm("ppo")
    value = next(r for r in ppo.roles if r.name == "value")
    assert (value.head, value.source, value.like) == ("scalar", "jalign:/some/rm", None)


def test_the_loop_names_no_algorithm_or_role():
    """No string of an algorithm's name, a DPO reference mode, a data kind or a role name
    in the loop, the run opener, the state or the step: what differs between algorithms
    reaches them through the recipe and its roles."""
    names = set(registry.RECIPES) | {"in_step", "precomputed", "reference", "conversation",
                                     "preference", "prompt", "policy", "value", "reward"}
    for module in ("loop.py", "run.py", "step.py", "state_init.py", "state.py"):
        tree = ast.parse((ROOT / "jalign" / "train" / module).read_text())
        found = {n.value for n in ast.walk(tree)
                 if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in names}
        assert found == set(), f"{module} names {sorted(found)}"


def test_no_field_of_a_recipe_is_used_by_one_algorithm_only():
    """Every Recipe field without a default is given by every recipe; every field with one
    is changed from it by at least two algorithms (what one algorithm alone needs is a
    method it overrides)."""
    recipes = [registry.build(name) for name in registry.RECIPES]
    for field in dataclasses.fields(Recipe):
        if field.default is dataclasses.MISSING:
            continue
        changed = [r.name for r in recipes if getattr(r, field.name) != field.default]
        assert len(changed) >= 2, f"Recipe.{field.name} is set by {changed} only"


def test_model_kind_strings_live_in_the_roles_module_only():
    kinds = {"causal_lm", "scalar_head", "policy_value"}
    for path in (ROOT / "jalign").rglob("*.py"):
        if path.relative_to(ROOT).as_posix() == "jalign/train/roles.py":
            continue
        tree = ast.parse(path.read_text())
        found = {n.value for n in ast.walk(tree)
                 if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in kinds}
        assert found == set(), f"{path} names model kinds {sorted(found)}"


def test_flops_count_the_roles_passes():
    from jalign.models.config import preset
    from jalign.train.roles import RunModels
    cfg = preset("tiny")

    def flops(name, **config):
        recipe = registry.build(name, registry.entry(name).CONFIG(**config))
        ms = RunModels(recipe.roles, {r.name: cfg for r in recipe.roles})
        return recipe.flops_per_token(ms, 64)

    base = flops("sft")
    assert flops("ift") == pytest.approx(base * 4 / 3)            # + a no-gradient pass
    assert flops("dpo") == pytest.approx(base * 4 / 3)            # + the reference forward
    assert flops("dpo", reference="precomputed") == pytest.approx(base)
    # policy + value; PPO's reference runs in the rollouts, outside the step
    assert flops("ppo") == pytest.approx(base * 2)


def test_lora_flops_leave_out_the_frozen_bases_weight_gradients():
    """MFU counts the FLOPs a step computes: a LoRA (or trainable-regex) role runs the
    forward and the input gradients through its frozen base, not the weight gradients,
    so its step is 2 passes where full fine-tuning is 3 (it read 2x full FT's MFU when
    counted as 3)."""
    import dataclasses

    from jalign.models.config import preset
    from jalign.train.roles import RunModels
    cfg = preset("tiny")
    recipe = registry.build("sft", registry.entry("sft").CONFIG())
    full = recipe.flops_per_token(RunModels(recipe.roles, {r.name: cfg for r in recipe.roles}), 64)
    lora = tuple(dataclasses.replace(r, trains="adapters") for r in recipe.roles)
    adapted = recipe.flops_per_token(RunModels(lora, {r.name: cfg for r in lora}), 64)
    assert adapted == pytest.approx(full * 2 / 3)


def test_grpo_step_flops_count_a_shared_prompt_once_per_group():
    """With share_prompt, MFU counts the prompt's tokens once per group of G rows: 32 rows
    of 48 prompt + 16 completion tokens at G 8 are 32·16 + 4·48 token passes, not 32·64."""
    from jalign.models.config import preset
    from jalign.train.roles import RunModels
    cfg = preset("tiny")

    def step(**grpo):
        recipe = registry.build("grpo", registry.entry("grpo").CONFIG(max_new_tokens=16, **grpo))
        ms = RunModels(recipe.roles, {r.name: cfg for r in recipe.roles})
        return recipe.flops_per_step(ms, 64, 32), recipe.flops_per_token(ms, 64)

    shared, per_token = step()
    assert shared == pytest.approx(per_token * (32 * 16 + 4 * 48))
    rows, _ = step(share_prompt=False)
    assert rows == pytest.approx(per_token * 32 * 64)
