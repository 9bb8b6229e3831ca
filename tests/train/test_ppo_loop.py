"""A PPO run as users start it (`jalign train` in a subprocess): it trains on rollouts,
logs the rollout and update metrics, evaluates by greedy responses, and resumes after
SIGKILL, and after a SIGTERM inside a rollout, with every rollout and loss bit-identical."""

import signal
from pathlib import Path

import numpy as np
import pytest

from jalign.models.build import create_model
from jalign.models.config import preset
from jalign.sources import load_checkpoint
from jalign.train.loop import EXIT_PREEMPTED
from tests.numerics import f32_tolerance, llama_logp_bound
from tests.train.test_loop import _committed, _records as records, _run

CONFIG = str(Path(__file__).with_name("tiny_ppo.gin"))
# Wall-clock measurements: the only fields a resumed run may change.
TIMING = ("step_seconds", "tokens_per_second_per_device", "mfu", "sample_seconds",
          "reward_seconds", "score_seconds")
ROLLOUT = ("reward", "reward_task", "reward_length", "score", "kl", "kl_coef",
           "response_length", "ended_with_eos", "value_explained_variance",
           "advantage_mean", "advantage_std", "non_score_reward", "rollout_entropy")
UPDATE = ("policy_loss", "value_loss", "entropy", "clip_fraction", "approx_kl", "ratio",
          "value_clip_fraction", "response_tokens")


P, N = 24, 6  # tiny_ppo.gin: DataConfig.max_prompt_length, PPOConfig.max_new_tokens


def _policy_at(run_dir: Path, step: int):
    """The policy a rollout starting after ``step`` sampled with: a checkpoint, or at step
    0 the random initial model (ModelInit.seed 0)."""
    if step:
        return load_checkpoint(run_dir, step=step, head="lm")[1]
    config = preset("tiny").replace(vocab_size=512, scan_layers=False)  # tiny_sft.gin
    return create_model(config, seed=0)


def _records(run_dir: Path) -> list[dict]:
    return records(run_dir, drop=TIMING)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    _run(root, "ref", config=CONFIG)
    return _records(root / "ref"), root / "ref"


def test_ppo_run_logs_rollouts_updates_and_evaluations(uninterrupted):
    records, run_dir = uninterrupted
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    for r in train:
        assert set(UPDATE) <= set(r), sorted(r)
    # A rollout's metrics come with its first step: 3 rollouts of 2 epochs x 2 minibatches.
    rollouts = [r for r in train if "reward" in r]
    assert [r["step"] for r in rollouts] == [1, 5, 9]
    assert [r["rollout"] for r in rollouts] == [1, 2, 3]
    for r in rollouts:
        assert set(ROLLOUT) <= set(r), sorted(r)
        # The first update of a rollout sees the policy that sampled it: each log-ratio is
        # the difference of two float32 evaluations of one log-prob (the rollout's batch
        # and the minibatch's shape), within that log-prob's bound e; so |ratio - 1| <=
        # e^e - 1 and approx_kl (½ x², a mean) <= ½ e².
        e = llama_logp_bound(_policy_at(run_dir, r["step"] - 1), P + N, mean=True)
        e = f32_tolerance(e["terms"], e["scale"], e["depth"])
        assert abs(r["ratio"] - 1.0) <= np.expm1(e) and r["approx_kl"] <= 0.5 * e * e, (r, e)
    # The adaptive controller moved the coefficient: e = clip(kl / 0.01 - 1, ±0.2) per
    # rollout of 8 samples over a horizon of 40 (the formula itself: tests/rl/test_kl.py).
    coefs = [r["kl_coef"] for r in rollouts]
    assert coefs[0] == pytest.approx(0.1)
    for before, after, r in zip(coefs, coefs[1:], rollouts):
        e = min(max(r["kl"] / 0.01 - 1, -0.2), 0.2)
        assert after == pytest.approx(before * (1 + e * 8 / 40), rel=1e-6)
    evals = [r for r in records if "eval_reward" in r]
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert all(r["eval_prompts"] == 8 and "eval_reward_task" in r for r in evals)
    assert _committed(run_dir) == [4, 8, 12]


def test_ppo_resume_after_sigkill_is_bit_identical(tmp_path, uninterrupted):
    records, _ = uninterrupted
    _run(tmp_path, "killed", fault="sigkill_after_save:4", expect=-signal.SIGKILL, config=CONFIG)
    assert _committed(tmp_path / "killed") == [4]
    _run(tmp_path, "killed", config=CONFIG)
    # exact by construction: the same rollouts (rewards, KL, coefficient) and losses
    assert _records(tmp_path / "killed") == records


def test_ppo_sigterm_inside_a_rollout_saves_at_its_end(tmp_path, uninterrupted):
    records, _ = uninterrupted
    # SIGTERM after step 6, half-way through the second rollout: the state is exact only
    # between rollouts, so the run trains on to step 8, saves it and exits as preempted.
    _run(tmp_path, "term", "TrainConfig.save_every=12", fault="sigterm_at_step:6",
         expect=EXIT_PREEMPTED, config=CONFIG)
    assert _committed(tmp_path / "term") == [8]
    _run(tmp_path, "term", "TrainConfig.save_every=12", config=CONFIG)
    # Every rollout and update is as uninterrupted; the evaluation due at step 8 is the one
    # record missing (a preempted run saves first and does not evaluate on its way out).
    resumed = _records(tmp_path / "term")
    assert [r for r in resumed if "loss" in r] == [r for r in records if "loss" in r]
    assert [r["step"] for r in resumed if "eval_reward" in r] == [4, 12]


def test_a_ppo_checkpoint_loads_as_its_policy_and_value_model(uninterrupted):
    """`jalign convert jalign-to-hf` and `jalign generate` read a PPO run as its policy."""
    import jax

    import orbax.checkpoint as ocp

    from jalign.train.state import params_of

    _, run_dir = uninterrupted
    with ocp.CheckpointManager(run_dir / "checkpoints") as mngr:  # the raw params item
        both = mngr.restore(12, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
    _, policy = load_checkpoint(run_dir, step=12, head="lm")
    _, value = load_checkpoint(run_dir, step=12, head="scalar")
    assert set(both["params"]) == {"policy", "value"}
    for part, model in (("policy", policy), ("value", value)):
        want = jax.tree.leaves(both["params"][part])
        got = jax.tree.leaves(params_of(model))
        assert len(got) == len(want) > 0
        for a, b in zip(got, want):  # exact by construction: the same arrays read back
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
