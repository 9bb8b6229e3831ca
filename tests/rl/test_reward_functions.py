"""Users' reward functions: 'module:function' names imported next to the config, called in
batches with the prompt records' columns; each bad return is one error naming it."""

import math

import numpy as np
import pytest

from jalign.errors import ConfigError
from jalign.rl import reward_functions as rf
from jalign.rl.rewards import RewardConfig, combined_rewards

MODULE = '''
calls = []

def exact(prompts, completions, answer, **fields):
    calls.append(len(completions))
    return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]

def short(prompts, completions, completion_lengths, **fields):
    return [-0.1 * n for n in completion_lengths]

def raises(prompts, completions, **fields):
    raise KeyError("score")

def too_few(prompts, completions, **fields):
    return [1.0] * (len(completions) - 1)

def nan_in_row_2(prompts, completions, **fields):
    return [0.0, 1.0, float("nan")][:len(completions)]

def not_numbers(prompts, completions, **fields):
    return ["high"] * len(completions)

def none_in_row_1(prompts, completions, **fields):
    return [1.0, None, 0.0][:len(completions)]

def not_a_list(prompts, completions, **fields):
    return 3

def no_args():
    return []

not_callable = 3
'''


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    """A module of reward functions in a directory of its own (as next to a config)."""
    d = tmp_path / "cfg"
    d.mkdir()
    name = f"user_rewards_{tmp_path.name.replace('-', '_')}"
    (d / f"{name}.py").write_text(MODULE)
    monkeypatch.setattr(rf, "_search_dirs", [str(d)])
    monkeypatch.syspath_prepend(str(tmp_path))  # restores sys.path afterwards
    return name


PROMPTS = ["1+1?", "2+2?", "3+3?"]
COMPLETIONS = ["2", " 5", "6 "]
FIELDS = {"answer": [2, 4, 6]}


def test_user_functions_are_weighted_with_the_built_in_ones(module_dir):
    cfg = RewardConfig(names=("format",), weights=(0.5,),
                       functions=(f"{module_dir}:exact", f"{module_dir}:short"),
                       function_weights=(1.0, 2.0))
    total, parts = combined_rewards(cfg, PROMPTS, COMPLETIONS, [1, 2, 3], fields=FIELDS)
    np.testing.assert_allclose(parts[f"{module_dir}:exact"], [1, 0, 1])
    np.testing.assert_allclose(parts[f"{module_dir}:short"], [-0.1, -0.2, -0.3], rtol=1e-6)
    # format: the whole completion (stripped) is a number: all three
    np.testing.assert_allclose(total, 0.5 * 1 + np.array([1, 0, 1]) + 2 * np.array([-0.1, -0.2, -0.3]),
                               rtol=1e-6)


@pytest.mark.parametrize("fn, match", [
    ("raises", r"reward function .*:raises raised KeyError: 'score'"),
    ("too_few", r"returned 2 values for 3 completions"),
    ("nan_in_row_2", r"returned nan for row 2 \(prompt '3\+3\?', completion '6 '\)"),
    ("not_numbers", r"returned 'high' for row 0"),
    ("none_in_row_1", r"returned None for row 1 \(prompt '2\+2\?'"),
    ("not_a_list", r"returned int, not one number per completion"),
])
def test_a_bad_return_names_the_function_and_row(module_dir, fn, match):
    cfg = RewardConfig(names=(), weights=(), functions=(f"{module_dir}:{fn}",))
    with pytest.raises(rf.RewardError, match=match) as e:
        combined_rewards(cfg, PROMPTS, COMPLETIONS, [1, 2, 3], fields=FIELDS)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec, match", [
    ("no_colon", "not 'module:function'"),
    ("a b:c", "not 'module:function'"),
    ("jalign_no_such_module_xyz:f", "cannot import 'jalign_no_such_module_xyz'"),
    ("{m}:missing", "has no callable 'missing'"),
    ("{m}:not_callable", "has no callable 'not_callable'"),
    ("{m}:no_args", r"must accept \(prompts, completions, \*\*fields\)"),
])
def test_a_bad_name_is_an_error_at_start(module_dir, spec, match):
    spec = spec.format(m=module_dir)
    with pytest.raises(ConfigError, match=match):
        RewardConfig(names=(), weights=(), functions=(spec,)).load_functions()


def test_weights_must_match_and_some_reward_is_needed():
    with pytest.raises(ValueError, match="function_weights"):
        RewardConfig(functions=("m:a", "m:b"), function_weights=(1.0,))
    with pytest.raises(ValueError, match="no reward"):
        RewardConfig(names=(), weights=())


def test_built_in_rewards_go_through_the_same_checks():
    cfg = RewardConfig(names=("length",), weights=(1.0,), length_coef=math.inf, length_target=0)
    with pytest.raises(rf.RewardError, match=r"'length' \(built in\) returned -inf for row 0"):
        combined_rewards(cfg, PROMPTS, COMPLETIONS, [1, 2, 3])


def test_every_column_of_a_prompt_record_is_a_field(module_dir):
    """A MATH-style record's own columns (here 'solution', 'level') reach the function."""
    from jalign.data import formats
    kind, adapt = formats.adapter("prompt")
    record = {"problem": [{"role": "user", "content": "1+1?"}], "solution": "2", "level": 3}
    meta = adapt(record, {"prompt": "problem"})["meta"]
    assert meta == {"solution": "2", "level": 3}
    with pytest.raises(ValueError, match="completion_lengths"):
        combined_rewards(RewardConfig(), PROMPTS, COMPLETIONS, [1, 2, 3],
                         fields={"completion_lengths": [1, 2, 3]})


def test_a_config_found_from_another_directory_imports_the_module_next_to_it(
        tmp_path, monkeypatch):
    """`jalign train configs/examples/grpo_my_reward.gin` run outside the repository
    finds the file in the repository (jalign.config.config_file), and its reward module
    (configs/examples/my_rewards.py) next to it, as the README says."""
    import sys

    from jalign.experiment import load_experiment
    from jalign.rl import reward_functions
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.modules.pop("my_rewards", None)
    try:
        load_experiment(["configs/examples/grpo_my_reward.gin"])
        fns = reward_functions.load_function("my_rewards:exact_answer")
        assert callable(fns) and fns.__module__ == "my_rewards"
        assert str(reward_functions._search_dirs[0]).endswith("configs/examples")
    finally:
        sys.modules.pop("my_rewards", None)
        reward_functions.set_search_dirs([])
