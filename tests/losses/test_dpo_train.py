"""The DPO training loss on a model: response log-probs by hand, one 2N forward whose pair
loss does not depend on how pairs are split (micro-batches, 8 devices), precomputed ==
in-step reference, ORPO's SFT term."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jalign.data.packing import pad_pair
from jalign.losses.dpo import (DPOConfig, make_dpo_loss, pair_logps, reference_scores,
                               response_logps, scored_span)
from jalign.losses.sft import sft_loss
from jalign.models.build import abstract_model, create_model
from jalign.models.config import preset
from jalign.sharding import MeshConfig, make_mesh
from jalign.train.optimizer import OptimizerConfig, make_optimizer
from jalign.train.reference import compute_scores
from jalign.train.state import init_state, model_param_shardings, params_of, state_shardings
from jalign.algos import dpo as dpo_recipe
from jalign.train.roles import NONE, Role, RunModels
from jalign.train.step import accumulate, make_train_step
from tests.numerics import (TRANSCENDENTAL_TERMS, f32_tolerance, assert_f32_close,
                            llama_grad_bound, llama_logp_bound)

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


# ------------------------------------------------------------------ float32 bounds
#
# The sigmoid DPO loss of a pair is softplus(-beta h), h = (pc - rc) - (pr - rr), four summed
# response log-probs: each within llama_logp_bound of its own response length between two
# programs, so h within their sum, and the loss (slope <= beta) within beta times that.
# Its gradient sums, over the response tokens t, c_t d(log p_t), c_t = +-beta
# sigmoid(-beta h) / pairs: on the scale sum_t |c_t| |d log p_t| of those per-token
# gradients, plus the error of c_t itself (|d sigmoid| <= 1/4) times sum_t |d log p_t|.


@functools.lru_cache(maxsize=None)
def _token_grad_fn():
    graphdef, _ = abstract_model(CONFIG)

    def one(params, rows, r, c):  # d(-log p(token c of row r)) / d params
        row = {k: jax.lax.dynamic_slice_in_dim(v, r, 1) for k, v in rows.items()}
        row["loss_mask"] = (jnp.arange(LENGTH) == c).astype(jnp.int32)[None]
        return jax.grad(lambda p: sft_loss(nnx.merge(graphdef, p), row).total)(params)

    return jax.jit(jax.vmap(one, in_axes=(None, None, 0, 0)))


def _dpo_bounds(policy, ref, batch, beta, span="response"):
    """(mean pair loss bound, per-leaf bounds of its gradient, the gradient in float64)."""
    batch = scored_span(jax.tree.map(jnp.asarray, batch), span)
    n = batch["chosen_input_ids"].shape[0]
    pc, pr, lc, lr = (np.asarray(x, np.float64) for x in jax.jit(pair_logps)(policy, batch))
    rc, rr, _, _ = (np.asarray(x, np.float64) for x in jax.jit(pair_logps)(ref, batch))
    h = (pc - rc) - (pr - rr)

    def side(model, lengths):
        return np.array([f32_tolerance(**llama_logp_bound(model, LENGTH, tokens=max(int(k), 1)))
                         for k in lengths])

    tol_h = side(policy, lc) + side(policy, lr) + side(ref, lc) + side(ref, lr)
    softplus = f32_tolerance(3 + 2 * TRANSCENDENTAL_TERMS, 1.0)  # its rounding, per unit
    loss = float(np.mean(beta * tol_h + softplus * (beta * np.abs(h) + np.log(2.0))))

    keys = ("input_ids", "segment_ids", "positions")
    rows = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in keys}
    mask = np.concatenate([np.asarray(batch["chosen_loss_mask"]),
                           np.asarray(batch["rejected_loss_mask"])])
    r, c = np.nonzero(mask[:, 1:])
    per_token = _token_grad_fn()(nnx.to_pure_dict(nnx.state(policy, nnx.Param)), rows, r, c + 1)
    pair, sign = r % n, np.where(r < n, 1.0, -1.0)
    sig = 1 / (1 + np.exp(beta * h))  # sigmoid(-beta h)
    coef = sign * beta * sig[pair] / n  # dL/dparams = sum_t coef_t d(-log p_t)
    dcoef = beta ** 2 / 4 * tol_h[pair] / n
    grads, tols = [], []
    for leaf in jax.tree.leaves(per_token):
        leaf = np.asarray(leaf, np.float64)
        grads.append(np.tensordot(coef, leaf, 1))
        scale = float(np.tensordot(np.abs(coef), np.abs(leaf), 1).max())
        tols.append(f32_tolerance(**llama_grad_bound(policy, LENGTH, 2 * n * LENGTH, scale))
                    + float(np.tensordot(dcoef, np.abs(leaf), 1).max()))
    return loss, tols, grads


def test_response_logps_match_full_softmax(models):
    policy, _ = models
    b = _batch(_examples(4))
    ids, mask, seg = b["chosen_input_ids"], b["chosen_loss_mask"], b["chosen_segment_ids"]
    got, lengths = jax.jit(response_logps)(policy, ids, mask, seg)
    logp = _numpy_logps(policy, ids, seg)
    want = [sum(logp[r, t, ids[r, t + 1]] for t in range(LENGTH - 1) if mask[r, t + 1])
            for r in range(len(ids))]
    # Each row's summed log-probs over its response tokens, float32 against float64 from
    # model()'s float32 logits (another program).
    bound = llama_logp_bound(policy, LENGTH, tokens=int(mask[:, 1:].sum(1).max()))
    assert_f32_close(got, want, **bound)
    np.testing.assert_array_equal(np.asarray(lengths), mask[:, 1:].sum(1))  # integer counts


# The policy and a frozen reference of its own (another random model, so the loss is not
# trivial at the start), as the DPO recipe's loss reads them.
WITH_REFERENCE = RunModels((Role("policy"), Role("reference", trains=NONE)),
                           {"policy": CONFIG, "reference": CONFIG})


def _dpo_state(mesh, accum, config, rows):
    policy = create_model(CONFIG, seed=0, mesh=mesh)
    ref = create_model(CONFIG, seed=1, mesh=mesh)
    _, abstract = abstract_model(CONFIG, mesh)
    params = {"policy": params_of(policy)}
    tx, _ = make_optimizer(SGD, params, total_steps=10)
    state = init_state(params, tx, 0, {"reference": params_of(ref)})
    psh = model_param_shardings(abstract, mesh)
    sh = state_shardings(jax.eval_shape(lambda s: s, state), {"policy": psh}, mesh,
                         {"reference": psh})
    state = jax.device_put(state, sh)
    step = make_train_step(dpo_recipe.recipe(config).loss_fn, tx, WITH_REFERENCE, mesh=mesh,
                           state_sharding=sh, global_batch=rows, accum_steps=accum)
    return state, step


def _train(mesh, accum, config=DPOConfig(beta=0.5), steps=2):
    state, step = _dpo_state(mesh, accum, config, rows=8)
    losses = []
    for i in range(steps):
        state, metrics = step(state, _batch(_examples(8, seed=i)))
        losses.append(float(metrics["loss"]))
        assert 0 <= float(metrics["rewards/accuracy"]) <= 1
    return jax.device_get(state.params["policy"]), losses, jax.device_get(state.fixed)


def _split_bounds(models, beta=0.5):
    """Bounds for _train's two SGD steps (p1 = p0 - lr0 g0, p2 = p1 - lr1 g1(p1)): the
    losses, and the parameters after step 2 per leaf."""
    policy, ref = models
    graphdef, _ = abstract_model(CONFIG)
    p0 = params_of(policy)
    tree = jax.tree.structure(p0)
    leaves0 = [np.asarray(x, np.float64) for x in jax.tree.leaves(p0)]
    _, lr = make_optimizer(SGD, p0, total_steps=10)
    lr0, lr1 = float(lr(0)), float(lr(1))
    loss0, tol_g0, g0 = _dpo_bounds(policy, ref, _batch(_examples(8, seed=0)), beta)
    leaves1 = [p - lr0 * g for p, g in zip(leaves0, g0)]
    policy1 = nnx.merge(graphdef, jax.tree.unflatten(tree, [np.float32(x) for x in leaves1]))
    loss1, tol_g1, g1 = _dpo_bounds(policy1, ref, _batch(_examples(8, seed=1)), beta)

    def rounding(p, u):  # p + u in float32: two roundings
        return f32_tolerance(2, float(np.abs(p).max() + np.abs(u).max()))

    p1 = [lr0 * t + rounding(p, lr0 * g) for t, p, g in zip(tol_g0, leaves0, g0)]
    # Step 2 repeats step 1's bound at parameters already apart by it; that difference also
    # passes through the step's gradient, (I - lr1 H) d: counted twice (lr1 |H| <= 1 here:
    # the SGD losses fall). Step 2's loss moves by sum |dL/dp| |dp| over it too.
    p2 = [2 * a + lr1 * t + rounding(p, lr1 * g) for a, t, p, g in zip(p1, tol_g1, leaves1, g1)]
    losses = [loss0, loss1 + sum(float(np.abs(g).sum()) * a for g, a in zip(g1, p1))]
    return losses, p2


def test_pair_loss_independent_of_split_and_devices(models):
    """One batch of 8 pairs == 4 micro-batches of 2 == 8 devices with 2 micro-batches:
    losses and the SGD update (i.e. the gradient), with the frozen reference in the step."""
    one = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    full_params, full_losses, frozen = _train(one, accum=1)
    loss_tols, param_tols = _split_bounds(models)
    # policy != reference: a real signal, beyond the loss's float32 bound
    assert abs(full_losses[0] - np.log(2)) > 2 * loss_tols[0]
    runs = {"4 micro-batches": _train(one, accum=4),
            "8 devices (2x2x2), 2 micro-batches": _train(make_mesh(MeshConfig(2, 2, 2)), accum=2)}
    for name, (params, losses, frozen_after) in runs.items():
        for step, (a, b, tol) in enumerate(zip(losses, full_losses, loss_tols, strict=True)):
            assert abs(a - b) <= tol, f"{name} step {step + 1}: |{a} - {b}| > {tol:.3g}"
        for a, b, tol in zip(jax.tree.leaves(params), jax.tree.leaves(full_params), param_tols,
                             strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=tol, err_msg=name)
        for a, b in zip(jax.tree.leaves(frozen_after), jax.tree.leaves(frozen)):
            # exact by construction: the frozen reference is carried through, never updated
            np.testing.assert_array_equal(a, b)


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
        policy, batch, reference=ref)
    sums, counts = {}, {}
    for name, model in (("policy", policy), ("ref", ref)):
        for side in ("chosen", "rejected"):
            ids = np.asarray(batch[f"{side}_input_ids"])
            logp = _numpy_logps(model, ids, np.asarray(batch[f"{side}_segment_ids"]))
            row_sums, row_counts = [], []
            for r, e in enumerate(examples):
                c, w = list(e["chosen_ids"]), list(e["rejected_ids"])
                fork = next((k for k in range(max(len(c), len(w)))
                             if k >= min(len(c), len(w)) or c[k] != w[k]), None)
                resp = e[f"{side}_ids"]
                keep = len(resp) if fork is None else min(fork + 1, len(resp))
                start = len(e["prompt_ids"])  # response token k sits at index start + k
                row_sums.append(sum(logp[r, start + k - 1, resp[k]] for k in range(keep)))
                row_counts.append(keep)
            sums[name, side] = np.array(row_sums)
            counts[name, side] = row_counts
    h = (sums["policy", "chosen"] - sums["ref", "chosen"]) - (
        sums["policy", "rejected"] - sums["ref", "rejected"])
    want = np.sum(np.log1p(np.exp(-beta * h)))
    # float32 against float64 from model()'s logits: each pair's softplus(-beta h) moves by
    # at most beta times the four log-prob sums' bounds (their own span lengths), plus its
    # rounding; summed over the pairs.
    tol_h = sum(np.array([f32_tolerance(**llama_logp_bound(m, LENGTH, tokens=max(k, 1)))
                          for k in counts[name, side]])
                for name, m in (("policy", policy), ("ref", ref)) for side in ("chosen", "rejected"))
    tol = float(np.sum(beta * tol_h + f32_tolerance(3 + 2 * TRANSCENDENTAL_TERMS,
                                                      beta * np.abs(h) + np.log(2.0))))
    assert abs(float(out.total) - want) <= tol, (float(out.total), want, tol)
    # exact by construction: identical responses give identical float64 sums, h = x - x
    assert abs(h[0]) == 0.0
    full = make_dpo_loss(DPOConfig(beta=beta))(
        policy, batch, reference=ref)
    assert abs(float(full.total) - want) > 2 * tol  # the span changed what is scored, beyond it


@pytest.mark.parametrize("span", ["response", "to_first_difference"])
def test_precomputed_reference_equals_in_step(models, span):
    policy, ref = models
    examples = _examples(8, seed=3) if span == "response" else _forked_examples(8)
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    params = {"policy": params_of(policy)}
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
        recipe = dpo_recipe.recipe(DPOConfig(beta=0.3, reference=mode, span=span))
        models = RunModels(recipe.roles, {r.name: CONFIG for r in recipe.roles})
        fixed = {"reference": params_of(ref)} if mode == "in_step" else None
        out, g = jax.jit(lambda p, f, b, fn=recipe.loss_fn, ms=models: accumulate(
            fn, ms, p, f, b, rng, 1, mesh=mesh))(params, fixed, batch)
        results[mode] = (float(out.total / out.weight), g["policy"])
    (a, ga), (b, gb) = results["in_step"], results["precomputed"]
    # The reference's log-probs from other programs (batches of 3, then the step's own
    # forward), the policy's from two compiled steps: the DPO bounds above, for the mean
    # loss and for the summed (not yet divided by the pairs) gradient.
    loss_tol, grad_tols, _ = _dpo_bounds(policy, ref, batch, 0.3, span)
    assert abs(a - b) <= loss_tol, (a, b, loss_tol)
    for x, y, tol in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), grad_tols, strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=len(examples) * tol)  # a sum over pairs


def test_orpo_adds_per_token_nll_of_chosen(models):
    policy, _ = models
    batch = jax.tree.map(jnp.asarray, _batch(_examples(4, seed=5)))
    beta = 0.2
    plain = make_dpo_loss(DPOConfig(loss_type="orpo", beta=beta))(policy, batch)
    with_sft = make_dpo_loss(DPOConfig(loss_type="orpo", beta=beta, sft_weight=1.0))(policy, batch)
    # Independent path: sft_loss on each chosen row alone gives its per-token NLL.
    nll = 0.0
    for r in range(4):
        row = {"input_ids": batch["chosen_input_ids"][r:r + 1],
               "loss_mask": batch["chosen_loss_mask"][r:r + 1],
               "segment_ids": batch["chosen_segment_ids"][r:r + 1]}
        out = sft_loss(policy, row)
        nll += float(out.total / out.weight)
    assert float(with_sft.weight) == float(plain.weight) == 4  # exact: float32(4) pairs
    # Each chosen row's per-token NLL, from the pair forward and from sft_loss alone (two
    # programs): one mean log-prob's bound m per pair. The pair losses in with_sft and plain
    # come from their own forwards too; ORPO's slope in each side's average log-prob is at
    # most beta / (1 - e^avg). Then the totals' rounding (a few additions of terms up to
    # the totals' size), which the difference of two totals exposes.
    pc, pr, lc, lr = (np.asarray(x, np.float64) for x in pair_logps(policy, batch))
    slope = beta / (1 - np.exp(np.maximum(pc / lc, pr / lr)))
    m = np.array([f32_tolerance(**llama_logp_bound(policy, LENGTH, tokens=int(k), mean=True))
                  for k in np.maximum(lc, lr)])
    totals = abs(float(with_sft.total)) + abs(float(plain.total))
    tol = float(np.sum(m * (1 + 2 * slope))) + f32_tolerance(5, totals)
    diff = float(with_sft.total - plain.total)
    assert abs(diff - nll) <= tol, (diff, nll, tol)


def test_missing_reference_is_a_clear_error(models):
    policy, _ = models
    batch = jax.tree.map(jnp.asarray, _batch(_examples(2)))
    with pytest.raises(ValueError, match="needs the frozen reference"):
        make_dpo_loss(DPOConfig())(policy, batch)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        make_dpo_loss(DPOConfig(reference="precomputed"))(policy, batch)
    # SimPO needs no reference at all.
    out = make_dpo_loss(DPOConfig(loss_type="simpo", beta=2.0))(policy, batch)
    assert np.isfinite(float(out.total))
    with pytest.raises(ValueError, match="loss_type"):
        DPOConfig(loss_type="kto")
    with pytest.raises(ValueError, match="span"):
        DPOConfig(span="tokens")
