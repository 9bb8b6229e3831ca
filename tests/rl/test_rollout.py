"""The rollout source's wiring, in-process on a tiny model: what the scoring pass hands the
train step lines up with what the sampler drew (tokens, masks, log-probs), and its
advantages are GAE of the KL-penalised rewards with the score on the last response
token, recomputed here in float64 from the buffer's own inputs."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jalign.data.pipeline import DataConfig, build_iterator
from jalign.algos.ppo import PPOConfig, roles
from jalign.models.build import create_model, params_of
from jalign.models.config import preset
from jalign.models.heads import SCALAR
from jalign.rl.rewards import RewardConfig
from jalign.rl.rollout import RolloutSource
from jalign.sharding import DEFAULT_RULES, MeshConfig, make_mesh
from jalign.train.roles import RunModels
from jalign.train.source import SourceContext
from tests.numerics import assert_f32_close, llama_logp_bound

ROWS, P, N = 16, 24, 6  # 8 devices hold each minibatch of 8 rows
GAMMA, LAM, COEF = 0.9, 0.8, 0.3


def _gae64(rewards, values, mask, gamma, lam):
    """GAE by the textbook loop over each row's unmasked positions (float64)."""
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = np.flatnonzero(mask[b])
        next_v = next_a = 0.0
        for t in idx[::-1]:
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            next_a = delta + gamma * lam * next_a
            next_v = values[b, t]
            adv[b, t] = next_a
    return adv


def _source(rollout_sharding="train"):
    config = preset("tiny").replace(vocab_size=512, scan_layers=False)
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))  # the 8 test devices
    # FSDP-sharded over the 8 test devices, as a train state's parameters are.
    model = types.SimpleNamespace(policy=create_model(config, seed=3, mesh=mesh),
                                  value=create_model(config, seed=5, mesh=mesh, head=SCALAR))
    reference = create_model(config, seed=4, mesh=mesh)  # not the policy: the KL is not 0
    prompts = build_iterator(DataConfig(path="bundled:add", format="prompt", batch_size=ROWS,
                                        max_length=P + 1, max_prompt_length=P, bundled_size=32,
                                        prefetch=0))
    ppo = PPOConfig(epochs=2, minibatches=2, max_new_tokens=N, gamma=GAMMA, lam=LAM,
                    kl_coef=COEF, whiten_advantages=False, rollout_sharding=rollout_sharding,
                    rewards=RewardConfig(names=("length",), weights=(1.0,), length_coef=0.5,
                                         length_target=1))
    ppo_roles = roles(ppo)
    models = RunModels(ppo_roles, {r.name: config for r in ppo_roles})
    ctx = SourceContext(mesh=mesh, rules=DEFAULT_RULES, seed=0, models=models,
                        initial=None, initial_key=None, run_dir=None)
    src = RolloutSource(prompts, ppo, ctx)
    state = types.SimpleNamespace(
        params={"policy": params_of(model.policy), "value": params_of(model.value)},
        fixed={"reference": params_of(reference)})
    return src, state, model, reference


@pytest.fixture(scope="module")
def source():
    return _source()


def test_replicated_rollouts_equal_sharded_ones(source):
    """PPOConfig.rollout_sharding='replicated' samples from a gathered copy of the policy:
    the same tokens, and log-probs equal within the float32 bound."""
    src, state, model, _ = source
    rep, rep_state, *_ = _source("replicated")
    for s in (src, rep):
        while not s.at_boundary():
            s.next(state if s is src else rep_state)
    saved = src.get_state()
    rep.set_state(saved)
    a = jax.device_get(src.next(state))
    b = jax.device_get(rep.next(rep_state))
    src.set_state(saved)  # the other tests' source continues as if this one never ran
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    on = a["response_mask"] > 0
    assert_f32_close(b["old_logp"][on], a["old_logp"][on], **llama_logp_bound(model.policy, P + N))


def test_minibatches_cover_each_epoch_and_stop_at_the_boundary(source):
    src, state, *_ = source
    start = src.drawn
    seen = []
    for i in range(4):  # 2 epochs x 2 minibatches
        assert src.at_boundary() == (i == 0)
        batch = src.next(state)
        assert batch["input_ids"].shape == (ROWS // 2, P + N)
        seen.append(np.asarray(batch["input_ids"]))
        if i == 0:
            metrics = src.step_metrics()
            assert metrics["rollout"] == start // 4 + 1 and "reward_length" in metrics
        else:
            assert src.step_metrics() == {}
    assert src.at_boundary() and src.drawn == start + 4
    # each epoch's two minibatches are the whole rollout, every row once, in a new order
    order = [np.asarray(o) for o in src._order]
    for epoch in (order[:2], order[2:]):
        assert sorted(np.concatenate(epoch).tolist()) == list(range(ROWS))
    assert not np.array_equal(np.concatenate(order[:2]), np.concatenate(order[2:]))
    buf = jax.device_get(src._buffer) if src._buffer is not None else None
    assert buf is None  # drawn to the end: the next draw samples a new rollout
    assert all(len(s) == ROWS // 2 for s in seen)


def test_buffer_lines_up_with_the_samples_and_gae(source):
    src, state, model, reference = source
    rows_before = src.prompts.batches
    src.next(state)  # samples a new rollout
    assert src.prompts.batches == rows_before + 1
    buf = jax.device_get(src._buffer)
    ids, seg, mask = buf["input_ids"], buf["segment_ids"], buf["response_mask"]
    # The response tokens are where the mask says, after the left-padded prompt.
    lengths = mask.sum(1).astype(int)
    assert (lengths >= 1).all() and (lengths <= N).all()
    for r in range(ROWS):
        assert (np.flatnonzero(mask[r]) == np.arange(P - 1, P - 1 + lengths[r])).all()
        assert seg[r, P:].sum() == lengths[r] and (seg[r, P + lengths[r]:] == 0).all()
    # old log-probs = the sampling policy's, recomputed by the training forward.
    bound = llama_logp_bound(model.policy, P + N)
    policy_lp = _full_forward_logp(model.policy, ids, seg)
    ref_lp = _full_forward_logp(reference, ids, seg)
    on = mask > 0
    assert_f32_close(buf["old_logp"][on], policy_lp[on], **bound)
    assert_f32_close(buf["ref_logp"][on], ref_lp[on], **bound)
    # Rewards: -coef * (log pi - log ref) per token, the length penalty on the last token.
    scores = -0.5 * np.maximum(lengths - 1, 0)
    kl = np.where(on, buf["old_logp"].astype(np.float64) - buf["ref_logp"], 0.0)
    rewards = -COEF * kl
    rewards[np.arange(ROWS), P - 2 + lengths] += scores
    values = np.where(on, buf["old_values"].astype(np.float64), 0.0)
    adv = _gae64(rewards, values, on, GAMMA, LAM)
    # float32 GAE: each step a few roundings, chained over at most N tokens.
    scale = np.abs(rewards).sum() + 2 * np.abs(values).sum() + 1
    assert_f32_close(buf["advantages"][on], adv[on], terms=4 * N, scale=scale)
    assert_f32_close(buf["returns"][on], (adv + values)[on], terms=4 * N + 1, scale=scale)
    assert (buf["advantages"][~on] == 0).all()


def _full_forward_logp(policy, ids, seg):
    """log softmax of a plain full forward at each next token [B, T-1] (float64)."""
    pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0)
    logits = np.asarray(nnx.jit(lambda m, i, p, s: m(i, p, s))(policy, jnp.asarray(ids),
                                                               jnp.asarray(pos), jnp.asarray(seg)),
                        np.float64)
    z = logits[:, :-1]
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return np.take_along_axis(z, ids[:, 1:, None], axis=-1)[..., 0] - lse


def test_a_checkpointed_state_restores_the_next_rollout(source):
    src, state, *_ = source
    while not src.at_boundary():
        src.next(state)
    saved = src.get_state()
    first = jax.device_get(src.next(state))
    src.set_state(saved)
    again = jax.device_get(src.next(state))
    for key in first:  # exact by construction: same key, prompts, policy and program
        np.testing.assert_array_equal(again[key], first[key], err_msg=key)
    inside = dict(saved, drawn=saved["drawn"] + 1)
    with pytest.raises(Exception, match="inside a rollout"):
        src.set_state(inside)
