"""A GRPO run as users start it (`jalign train` in a subprocess) with their own reward
function in a file next to their config: it trains on groups of completions, logs the
rollout and update metrics, resumes after SIGKILL bit-identically, and a reward function
that returns NaN stops it with one line naming the function."""

import signal
import textwrap

import numpy as np
import pytest

from jalign.cli import EXIT_BAD_INPUT
from tests.numerics import f32_tolerance, llama_logp_bound
from tests.train.test_loop import _committed, _records as records, _run
from tests.train.test_ppo_loop import N, P, _policy_at  # tiny_grpo.gin: the same sizes

TIMING = ("step_seconds", "tokens_per_second_per_device", "mfu", "sample_seconds",
          "reward_seconds", "score_seconds")
ROLLOUT = ("reward", "reward_task", "reward_length", "kl", "kl_coef", "response_length",
           "ended_with_eos", "rollout_entropy", "reward_group_std", "groups_without_signal",
           "advantage_mean", "advantage_std", "sampler_kl", "sampler_logp_diff_max")
UPDATE = ("policy_loss", "kl_loss", "clip_fraction", "approx_kl", "ratio", "sequences")

REWARDS = '''
def digits(prompts, completions, answer, completion_lengths, **fields):
    """How many digits a completion has (random completions differ), checking that the
    prompt records' answers and the lengths arrive one per completion."""
    assert len(answer) == len(completions) == len(completion_lengths) == len(prompts)
    assert all(isinstance(a, str) and a.isdigit() for a in answer), answer[:3]
    return [sum(ch.isdigit() for ch in c) / 4 for c in completions]

def even_answers_only(prompts, completions, answer, **fields):
    """Signal only in the groups of prompts whose answer is even: the others all score 0."""
    return [digits([p], [c], [a], [1])[0] if int(a) % 2 == 0 else 0.0
            for p, c, a in zip(prompts, completions, answer)]

def broken(prompts, completions, **fields):
    return [float("nan") if i == 5 else 0.0 for i in range(len(completions))]
'''


def _config(tmp_path, function="digits", *bindings):
    """A user's config directory: their config and their reward module side by side."""
    d = tmp_path / "my_experiment"
    d.mkdir(exist_ok=True)
    (d / "my_rewards.py").write_text(REWARDS)
    (d / "grpo.gin").write_text(textwrap.dedent(f"""\
        include 'tests/train/tiny_grpo.gin'
        RewardConfig.functions = ('my_rewards:{function}',)
        RewardConfig.function_weights = (1.0,)
        """) + "\n".join(bindings) + "\n")
    return str(d / "grpo.gin")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    _run(root, "ref", config=_config(root))
    return records(root / "ref", drop=TIMING), root / "ref"


def test_grpo_run_with_a_user_reward_function(uninterrupted):
    recs, run_dir = uninterrupted
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    rollouts = [r for r in train if "reward" in r]
    assert [r["step"] for r in rollouts] == [1, 3, 5]  # 2 epochs x 1 minibatch each
    for r in train:
        assert set(UPDATE) <= set(r), sorted(r)
        assert r["sequences"] == 16  # 4 prompts x G = 4 completions, aggregation 'grpo'
        assert np.isfinite(r["loss"])
    for r in rollouts:
        assert set(ROLLOUT) | {"reward_my_rewards:digits"} <= set(r), sorted(r)
        assert r["kl_coef"] == 0.05
    # The user's function gives groups different scores: there is something to learn.
    assert min(r["groups_without_signal"] for r in rollouts) < 1
    assert any(r["reward_group_std"] > 0 for r in rollouts)
    # A rollout's first update sees the policy that sampled it: its log-ratios are the
    # difference of two float32 evaluations of one log-prob (as for PPO).
    for r in rollouts:
        e = llama_logp_bound(_policy_at(run_dir, r["step"] - 1), P + N, mean=True)
        e = f32_tolerance(e["terms"], e["scale"], e["depth"])
        assert abs(r["ratio"] - 1.0) <= np.expm1(e) and r["approx_kl"] <= 0.5 * e * e, (r, e)
        # The sampler and the scoring pass read the same parameters: each token's two
        # log-probs differ by at most 2e (two float32 evaluations of one log-prob, each
        # within e), and k3 = exp(d) - d - 1 <= d^2 for |d| <= 1.
        one = llama_logp_bound(_policy_at(run_dir, r["step"] - 1), P + N)
        d = 2 * f32_tolerance(one["terms"], one["scale"], one["depth"])
        assert r["sampler_logp_diff_max"] <= d and r["sampler_kl"] <= d * d, (r, d)
    assert [r["step"] for r in recs if "eval_reward" in r] == [3, 6]


def test_grpo_resume_after_sigkill_is_bit_identical(tmp_path, uninterrupted):
    recs, _ = uninterrupted
    config = _config(tmp_path)
    _run(tmp_path, "killed", fault="sigkill_after_save:2", expect=-signal.SIGKILL, config=config)
    assert _committed(tmp_path / "killed") == [2]
    _run(tmp_path, "killed", config=config)
    # exact by construction: the same rollouts (samples, rewards, advantages) and losses
    assert records(tmp_path / "killed", drop=TIMING) == recs


def test_a_reward_function_returning_nan_stops_the_run_naming_it(tmp_path):
    r = _run(tmp_path, "nan", config=_config(tmp_path, "broken"), expect=EXIT_BAD_INPUT)
    lines = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "reward function my_rewards:broken returned nan for row 5" in lines[0], \
        r.stderr[-2000:]


def test_a_reward_function_that_does_not_import_fails_before_anything_loads(tmp_path):
    r = _run(tmp_path, "missing", config=_config(tmp_path, "nowhere"), expect=EXIT_BAD_INPUT)
    assert "RewardConfig.functions: 'my_rewards:nowhere'" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "missing").exists()  # refused before the run directory


def test_dynamic_sampling_keeps_groups_with_signal_and_filters_overlong(tmp_path):
    """DAPO's filtering: groups whose rewards are all equal are dropped and more prompts
    sampled (at most 3 rounds), truncated completions get no loss, and the soft overlong
    penalty lowers the score of long completions."""
    config = _config(tmp_path, "even_answers_only", "RewardConfig.names = ('task',)",
                     "RewardConfig.weights = (1.0,)", "GRPOConfig.dynamic_sampling = True",
                     "GRPOConfig.max_sampling_rounds = 3", "GRPOConfig.mask_truncated = True",
                     "GRPOConfig.overlong_buffer = 2", "GRPOConfig.overlong_penalty = 0.5",
                     "TrainConfig.eval_every = 0")
    _run(tmp_path, "dapo", config=config)
    rollouts = [r for r in records(tmp_path / "dapo", drop=TIMING) if "sampling_rounds" in r]
    assert len(rollouts) == 3
    for r in rollouts:
        assert 1 <= r["sampling_rounds"] <= 3
        # What the scoring pass saw without signal is what the drawing had to keep.
        assert r["groups_without_signal"] == pytest.approx(r["groups_without_signal_kept"] / 4)
        if r["sampling_rounds"] < 3:
            assert r["groups_without_signal_kept"] == 0
        # Scores: the reward minus 0.5 x (length - 4) / 2 for completions over 4 tokens.
        assert r["score"] <= r["reward"]
    assert sum(r["groups_dropped"] for r in rollouts) > 0  # odd answers are dropped
    # The random policy's completions mostly run to max_new_tokens without EOS: with
    # overlong filtering, a rollout where none ended trains nothing (its 2 epochs' steps).
    train = {r["step"]: r for r in records(tmp_path / "dapo", drop=TIMING) if "loss" in r}
    cut_off = [r["step"] for r in rollouts if r["ended_with_eos"] == 0]
    assert cut_off, rollouts
    for step in cut_off:
        for s in (step, step + 1):
            assert train[s]["loss"] == 0 and train[s]["grad_norm"] == 0, train[s]
