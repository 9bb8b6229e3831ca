"""GRPO's rollouts in-process on a tiny model: with one step per rollout the scoring pass
does not run the policy (the step's forward is the sampling policy's), and the step then
reports what that pass would have: entropy, the sampler mismatch, the KL to the
reference; with several steps per rollout the scoring pass keeps the old log-probs."""

import types

import jax
import numpy as np
import pytest
from flax import nnx

from jalign.algos.grpo import GRPOConfig, make_grpo_loss, roles
from jalign.data.pipeline import DataConfig, build_iterator
from jalign.models.build import create_model, params_of
from jalign.models.config import preset
from jalign.rl.group_rollout import GroupRolloutSource
from jalign.rl.rewards import RewardConfig
from jalign.sharding import DEFAULT_RULES, MeshConfig, make_mesh
from jalign.train.roles import RunModels
from jalign.train.source import SourceContext
from jalign.train.step import StepContext
from tests.numerics import f32_tolerance, llama_logp_bound

PROMPTS, G, P, N = 4, 4, 24, 6


def _source(accum_steps=1, **grpo):
    config = preset("tiny").replace(vocab_size=512, scan_layers=False)
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    policy = create_model(config, seed=3, mesh=mesh)
    reference = create_model(config, seed=4, mesh=mesh)
    prompts = build_iterator(DataConfig(path="bundled:add", format="prompt", batch_size=PROMPTS,
                                        max_length=P + 1, max_prompt_length=P, bundled_size=16,
                                        prefetch=0))
    cfg = GRPOConfig(group_size=G, max_new_tokens=N,
                     rewards=RewardConfig(names=("length",), weights=(1.0,), length_coef=0.5,
                                          length_target=1), **grpo)
    run_roles = roles(cfg)
    models = RunModels(run_roles, {r.name: config for r in run_roles})
    ctx = SourceContext(mesh=mesh, rules=DEFAULT_RULES, seed=0, models=models, initial=None,
                        initial_key=None, run_dir=None, accum_steps=accum_steps)
    src = GroupRolloutSource(prompts, cfg, ctx)
    fixed = {"reference": params_of(reference)} if cfg.beta > 0 else {}
    state = types.SimpleNamespace(params={"policy": params_of(policy)}, fixed=fixed)
    return src, state, policy, reference, cfg


def _jitted(fn, *modules):
    """``fn(*modules, *args)`` under jit, as the train step runs it (the modules' weights
    are FSDP-sharded over the test devices; op-by-op execution of such a forward is not
    what runs in training)."""
    split = [nnx.split(m) for m in modules]

    def run(states, *args):
        return fn(*[nnx.merge(d, s) for (d, _), s in zip(split, states)], *args)

    return lambda *args: jax.jit(run)([s for _, s in split], *args)


def _loss(cfg, policy, reference, batch):
    return _jitted(lambda p, r, b: make_grpo_loss(cfg)({"policy": p, "reference": r}, b,
                                                       StepContext(jax.random.key(0), 0)),
                   policy, reference)(jax.tree.map(np.asarray, batch))


def _score_flops(src, state) -> tuple[float, dict]:
    """(XLA's FLOP count of the rollout's scoring program, the first minibatch)."""
    seen = []
    score = src.score
    src.score = lambda *a: seen.append(a) or score(*a)
    batch = jax.device_get(src.next(state))
    cost = score.lower(*seen[0]).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]), batch


@pytest.fixture(scope="module")
def on_policy():
    src, state, policy, reference, cfg = _source(beta=0.05, tis_cap=2.0)
    flops, batch = _score_flops(src, state)
    return flops, batch, src.step_metrics(), policy, reference, cfg


def test_one_step_per_rollout_does_not_run_the_policy_twice(on_policy):
    flops, batch, metrics, policy, *_ = on_policy
    src, state, *_ = _source(beta=0.05, tis_cap=2.0, epochs=2)
    scored_flops, scored = _score_flops(src, state)
    assert "old_logp" in scored and "sampler_logp" not in scored
    assert "old_logp" not in batch and "sampler_logp" in batch and "ref_logp" in batch
    # Both programs run the reference; only the multi-step one also runs the policy: the
    # same forward again, so it counts about twice the FLOPs.
    assert 1.8 < scored_flops / flops < 2.2, (scored_flops, flops)
    assert "sampler_kl" in src.step_metrics() and "sampler_kl" not in metrics


def test_the_step_reports_entropy_mismatch_and_kl_from_its_own_forward(on_policy):
    _, batch, _, policy, reference, cfg = on_policy
    out = _loss(cfg, policy, reference, batch)
    m = {k: float(s) / float(c) for k, (s, c) in jax.device_get(out.aux).items()}
    assert {"rollout_entropy", "sampler_kl", "sampler_logp_diff_max", "kl"} <= set(m), sorted(m)
    # The sampler and the step read the same parameters: each token's two log-probs are
    # two float32 evaluations of one value, within 2e; k3 = exp(d) - d - 1 <= d^2.
    one = llama_logp_bound(policy, P + N)
    d = 2 * f32_tolerance(one["terms"], one["scale"], one["depth"])
    assert m["sampler_logp_diff_max"] <= d and m["sampler_kl"] <= d * d, (m, d)
    assert 0 < m["rollout_entropy"] <= np.log(512) * (1 + 1e-6)
    # kl: the sequence-summed log-ratio to the reference, recomputed from the batch's own
    # (sampler) log-probs, which equal the step's within d per token.
    on = batch["response_mask"] > 0
    ref_sums = np.where(on, batch["sampler_logp"] - batch["ref_logp"], 0.0).sum(1)
    assert abs(m["kl"] - ref_sums.mean()) <= d * N, (m["kl"], ref_sums.mean())


def test_response_only_log_probs_are_the_full_rows_last_slots(on_policy):
    """``response_log_probs(last=N)`` runs the LM head on the response slots only: the
    full computation's values there (within the float32 bound: other chunk shapes), 0
    before, entropies alike."""
    from jalign.losses.ppo import response_log_probs
    from tests.numerics import assert_f32_close
    _, batch, _, policy, *_ = on_policy
    args = (batch["input_ids"], batch["segment_ids"], batch["positions"])
    kw = dict(temperature=1.0, chunk_tokens=16, entropy=True)
    full_lp, full_ent = jax.device_get(_jitted(
        lambda m, *a: response_log_probs(m, *a, **kw), policy)(*args))
    lp, ent = jax.device_get(_jitted(
        lambda m, *a: response_log_probs(m, *a, **kw, last=N), policy)(*args))
    assert lp.shape == full_lp.shape and ent.shape == full_ent.shape
    assert not lp[:, :-N].any() and not ent[:, :-N].any()
    bound = llama_logp_bound(policy, P + N)
    assert_f32_close(lp[:, -N:], full_lp[:, -N:], **bound)
    assert_f32_close(ent[:, -N:], full_ent[:, -N:], **bound)
    with pytest.raises(ValueError, match="last=30"):
        _jitted(lambda m, *a: response_log_probs(m, *a, **kw, last=P + N), policy)(*args)


def test_adapter_dropout_keeps_the_scoring_forward(monkeypatch):
    """A train forward with adapter dropout is not the sampling policy: with it, one step
    per rollout still takes the old log-probs (and entropy, mismatch, TIS) from the
    scoring pass, and the loss reads them from the batch."""
    import jalign.train.step as step
    monkeypatch.setattr(step, "adapter_dropout", lambda models: True)
    src, state, policy, reference, cfg = _source(beta=0.05, tis_cap=2.0)
    assert cfg.steps_per_rollout == 1 and src.policy_in_scoring
    batch = jax.device_get(src.next(state))
    assert "old_logp" in batch and "tis_weight" in batch and "sampler_logp" not in batch
    assert {"rollout_entropy", "sampler_kl", "kl"} <= set(src.step_metrics())
    out = _loss(cfg, policy, reference, batch)
    assert "sampler_kl" not in out.aux and np.isfinite(float(out.total))


def test_steps_hold_whole_groups_in_every_micro_batch():
    """With ``share_prompt`` each train step's rows are whole groups, shuffled as groups,
    laid out so that the step's strided micro-batch split gives each micro-batch whole
    groups with consecutive rows; every row once per epoch."""
    from jalign.train.step import _split_micro
    src, state, *_ = _source(accum_steps=2, epochs=2, minibatches=2, beta=0.05)
    src.next(state)  # samples the rollout
    orders = src._order
    assert len(orders) == 4 and all(len(o) == PROMPTS * G // 2 for o in orders)
    for epoch in (orders[:2], orders[2:]):
        assert sorted(np.concatenate(epoch)) == list(range(PROMPTS * G))
    for order in orders:
        for micro in np.asarray(_split_micro({"r": order}, 2)["r"]):
            groups = micro.reshape(-1, G)
            assert (groups // G == groups[:, :1] // G).all(), micro  # one group per G rows
            assert (groups % G == np.arange(G)).all(), micro          # in sampling order
    assert any((np.concatenate(orders[:2]) != np.concatenate(orders[2:]))), "not shuffled"


def test_shared_prompt_log_probs_of_each_micro_batch_equal_row_by_row():
    """On each micro-batch of a step as the train step splits it (2 accumulated), the
    response log-probs with the prompt run once per group equal the row-by-row forward's
    within the float32 bound (a micro-batch without whole groups would mix prompts: O(1)
    off). The gradients' equality is tests/models/test_group_forward.py's."""
    from jalign.losses.ppo import response_log_probs
    from jalign.train.step import _split_micro
    from tests.numerics import assert_f32_close
    src, state, policy, *_ = _source(accum_steps=2, epochs=2)
    batch = jax.device_get(src.next(state))
    for micro in jax.tree.map(np.asarray, [
            {k: v[m] for k, v in _split_micro(batch, 2).items()} for m in range(2)]):
        args = (micro["input_ids"], micro["segment_ids"], micro["positions"])
        kw = dict(temperature=1.0, chunk_tokens=16, last=N)
        shared, _ = jax.device_get(_jitted(
            lambda m, *a: response_log_probs(m, *a, **kw, group_size=G), policy)(*args))
        rows, _ = jax.device_get(_jitted(
            lambda m, *a: response_log_probs(m, *a, **kw), policy)(*args))
        on = micro["response_mask"] > 0
        assert on.any()
        assert_f32_close(np.where(on, shared, 0), np.where(on, rows, 0),
                         **llama_logp_bound(policy, P + N))
