"""The DPO training loss on a model: response log-probs by hand, one 2N forward whose pair
loss does not depend on how pairs are split (micro-batches, 8 devices), precomputed ==
in-step reference, ORPO's SFT term."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.data.packing import pad_pair
from jalign.losses.dpo import DPOConfig, make_dpo_loss, reference_scores, response_logps
from jalign.losses.sft import sft_loss
from jalign.models.build import abstract_model, create_model
from jalign.models.config import preset
from jalign.sharding import MeshConfig, make_mesh
from jalign.train.optimizer import OptimizerConfig, make_optimizer
from jalign.train.reference import compute_scores
from jalign.train.state import init_state, model_param_shardings, params_of, state_shardings
from jalign.train.step import StepContext, accumulate, make_train_step

CONFIG = preset("tiny", vocab_size=128)
LENGTH = 24
PAD = 0
SGD = OptimizerConfig(name="sgd", learning_rate=0.5, b1=0.0, clip_norm=None, warmup_steps=0)


def _examples(n=8, seed=0):
    """Pairs with a shared prompt and responses of unequal lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, c, r = 3 + i % 5, 2 + (3 * i) % 9, 1 + (5 * i) % 11
        draw = lambda k: rng.integers(3, CONFIG.vocab_size, k).astype(np.int32)  # noqa: E731
        out.append({"prompt_ids": draw(p), "chosen_ids": draw(c), "rejected_ids": draw(r)})
    return out


def _batch(examples):
    rows = [pad_pair(e, LENGTH, PAD) for e in examples]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.fixture(scope="module")
def models():
    return create_model(CONFIG, seed=0), create_model(CONFIG, seed=1)


def _numpy_logps(model, ids, seg):
    """log p of every vocabulary entry at every position [B, T, V], float64, by full softmax."""
    logits = np.asarray(model(jnp.asarray(ids), None, jnp.asarray(seg)), np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def test_response_logps_match_full_softmax(models):
    policy, _ = models
    b = _batch(_examples(4))
    ids, mask, seg = b["chosen_input_ids"], b["chosen_loss_mask"], b["chosen_segment_ids"]
    got, lengths = jax.jit(response_logps)(policy, ids, mask, seg)
    logp = _numpy_logps(policy, ids, seg)
    want = [sum(logp[r, t, ids[r, t + 1]] for t in range(LENGTH - 1) if mask[r, t + 1])
            for r in range(len(ids))]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(lengths), mask[:, 1:].sum(1))


def _dpo_state(mesh, accum, config, rows):
    policy = create_model(CONFIG, seed=0, mesh=mesh)
    ref = create_model(CONFIG, seed=1, mesh=mesh)
    graphdef, abstract = abstract_model(CONFIG, mesh)
    params = params_of(policy)
    tx, _ = make_optimizer(SGD, params, total_steps=10)
    state = init_state(params, tx, 0, {"reference": params_of(ref)})
    psh = model_param_shardings(abstract, mesh)
    sh = state_shardings(jax.eval_shape(lambda s: s, state), psh, mesh, {"reference": psh})
    state = jax.device_put(state, sh)
    step = make_train_step(make_dpo_loss(config), tx, graphdef, mesh=mesh, state_sharding=sh,
                           global_batch=rows, accum_steps=accum,
                           frozen_graphdefs={"reference": graphdef})
    return state, step


def _train(mesh, accum, config=DPOConfig(beta=0.5), steps=2):
    state, step = _dpo_state(mesh, accum, config, rows=8)
    losses = []
    for i in range(steps):
        state, metrics = step(state, _batch(_examples(8, seed=i)))
        losses.append(float(metrics["loss"]))
        assert 0 <= float(metrics["rewards/accuracy"]) <= 1
    return jax.device_get(state.params), losses, jax.device_get(state.frozen)


def test_pair_loss_independent_of_split_and_devices():
    """One batch of 8 pairs == 4 micro-batches of 2 == 8 devices with 2 micro-batches:
    losses and the SGD update (i.e. the gradient), with the frozen reference in the step."""
    one = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    full_params, full_losses, frozen = _train(one, accum=1)
    assert abs(full_losses[0] - np.log(2)) > 1e-3  # policy != reference: a real signal
    runs = {"4 micro-batches": _train(one, accum=4),
            "8 devices (2x2x2), 2 micro-batches": _train(make_mesh(MeshConfig(2, 2, 2)), accum=2)}
    for name, (params, losses, frozen_after) in runs.items():
        np.testing.assert_allclose(losses, full_losses, rtol=1e-5, err_msg=name)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(full_params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
        for a, b in zip(jax.tree.leaves(frozen_after), jax.tree.leaves(frozen)):
            np.testing.assert_array_equal(a, b)  # the reference never changes


def _forked_examples(n=6, seed=7):
    """Pairs whose responses share a prefix and then differ (like a wrong digit), with
    unequal lengths; one pair has identical responses."""
    rng = np.random.default_rng(seed)
    draw = lambda k: rng.integers(3, CONFIG.vocab_size, k).astype(np.int32)  # noqa: E731
    out = []
    for i in range(n):
        prompt, shared = draw(3 + i % 4), draw(i % 4)
        chosen = np.concatenate([shared, draw(1 + i % 3)])
        rejected = np.concatenate([shared, draw(2 + i % 2)]) if i else chosen.copy()
        out.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return out


def test_first_difference_span_by_hand(models):
    """span='to_first_difference': each side's log-prob sums its response tokens up to and
    including the first one that differs from the other side (found here by a Python scan
    of the unpadded responses), and the sigmoid loss follows from those sums."""
    policy, ref = models
    examples = _forked_examples()
    batch = jax.tree.map(jnp.asarray, _batch(examples))
    beta = 0.4
    out = make_dpo_loss(DPOConfig(beta=beta, span="to_first_difference"))(
        policy, batch, StepContext(jax.random.key(0), {"reference": ref}, 0))
    sums = {}
    for name, model in (("policy", policy), ("ref", ref)):
        for side in ("chosen", "rejected"):
            ids = np.asarray(batch[f"{side}_input_ids"])
            logp = _numpy_logps(model, ids, np.asarray(batch[f"{side}_segment_ids"]))
            row_sums = []
            for r, e in enumerate(examples):
                c, w = list(e["chosen_ids"]), list(e["rejected_ids"])
                fork = next((k for k in range(max(len(c), len(w)))
                             if k >= min(len(c), len(w)) or c[k] != w[k]), None)
                resp = e[f"{side}_ids"]
                keep = len(resp) if fork is None else min(fork + 1, len(resp))
                start = len(e["prompt_ids"])  # response token k sits at index start + k
                row_sums.append(sum(logp[r, start + k - 1, resp[k]] for k in range(keep)))
            sums[name, side] = np.array(row_sums)
    h = (sums["policy", "chosen"] - sums["ref", "chosen"]) - (
        sums["policy", "rejected"] - sums["ref", "rejected"])
    want = np.sum(np.log1p(np.exp(-beta * h)))
    np.testing.assert_allclose(float(out.total), want, rtol=1e-5)
    assert abs(h[0]) == 0.0  # identical responses: no preference signal
    full = make_dpo_loss(DPOConfig(beta=beta))(
        policy, batch, StepContext(jax.random.key(0), {"reference": ref}, 0))
    assert abs(float(full.total) - want) > 1e-3  # the span changed what is scored


@pytest.mark.parametrize("span", ["response", "to_first_difference"])
def test_precomputed_reference_equals_in_step(models, span):
    policy, ref = models
    examples = _examples(8, seed=3) if span == "response" else _forked_examples(8)
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    graphdef, params = abstract_model(CONFIG)[0], params_of(policy)
    # The real precompute path: padded in its own batches of 3 (not the training batch).
    score_fn = functools.partial(reference_scores, span=span)
    scores = compute_scores(ref, examples, score_fn, rows=3, length=LENGTH, pad_id=PAD,
                            mesh=mesh)
    annotated = [dict(e, ref_chosen_logps=scores["ref_chosen_logps"][i],
                      ref_rejected_logps=scores["ref_rejected_logps"][i])
                 for i, e in enumerate(examples)]
    batch = jax.tree.map(jnp.asarray, _batch(annotated))
    assert batch["ref_chosen_logps"].shape == (8,)
    rng = jax.random.key(0)
    results = {}
    for mode in ("in_step", "precomputed"):
        loss_fn = make_dpo_loss(DPOConfig(beta=0.3, reference=mode, span=span))
        frozen = {"reference": ref} if mode == "in_step" else {}
        out, g = jax.jit(lambda p, b, f=frozen, fn=loss_fn: accumulate(
            fn, graphdef, p, b, rng, 1, mesh=mesh, frozen=f))(params, batch)
        results[mode] = (float(out.total / out.weight), g)
    (a, ga), (b, gb) = results["in_step"], results["precomputed"]
    assert abs(a - b) <= 1e-6, (a, b)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_orpo_adds_per_token_nll_of_chosen(models):
    policy, _ = models
    batch = jax.tree.map(jnp.asarray, _batch(_examples(4, seed=5)))
    plain = make_dpo_loss(DPOConfig(loss_type="orpo", beta=0.2))(policy, batch)
    with_sft = make_dpo_loss(DPOConfig(loss_type="orpo", beta=0.2, sft_weight=1.0))(policy, batch)
    # Independent path: sft_loss on each chosen row alone gives its per-token NLL.
    nll = 0.0
    for r in range(4):
        row = {"input_ids": batch["chosen_input_ids"][r:r + 1],
               "loss_mask": batch["chosen_loss_mask"][r:r + 1],
               "segment_ids": batch["chosen_segment_ids"][r:r + 1]}
        out = sft_loss(policy, row)
        nll += float(out.total / out.weight)
    assert float(with_sft.weight) == float(plain.weight) == 4
    np.testing.assert_allclose(float(with_sft.total - plain.total), nll, rtol=1e-5)


def test_missing_reference_is_a_clear_error(models):
    policy, _ = models
    batch = jax.tree.map(jnp.asarray, _batch(_examples(2)))
    with pytest.raises(ValueError, match="frozen 'reference'"):
        make_dpo_loss(DPOConfig())(policy, batch, StepContext(jax.random.key(0), {}, 0))
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        make_dpo_loss(DPOConfig(reference="precomputed"))(policy, batch)
    # SimPO needs no reference at all.
    out = make_dpo_loss(DPOConfig(loss_type="simpo", beta=2.0))(policy, batch)
    assert np.isfinite(float(out.total))
    with pytest.raises(ValueError, match="loss_type"):
        DPOConfig(loss_type="kto")
    with pytest.raises(ValueError, match="span"):
        DPOConfig(span="tokens")
