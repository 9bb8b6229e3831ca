"""IFT weights and loss from token losses: the worked example, finite-difference gradients,
late-starting masks, packed segments, γ = 0, the λ schedule; and the model-level loss
against an independent float64 computation."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.losses import ift, sequences
from jalign.losses.ift import IFTConfig, ift_reduce, ift_weights, residual_lambda
from jalign.models.build import create_model
from jalign.models.config import preset
from tests.numerics import assert_f32_close, llama_logp_bound


def reference_weights(losses, mask, gamma, segments=None):
    """The definition, sequence by sequence, in plain Python floats (float64)."""
    n = len(losses)
    segments = segments or [1] * n
    w = [0.0] * n
    start = 0
    while start < n:
        end = start
        while end < n and segments[end] == segments[start]:
            end += 1
        idx = range(start, end)
        big_n = sum(mask[i] for i in idx)
        if big_n:
            c = {i: mask[i] * losses[i] / big_n for i in idx}
            big_w = {t: mask[t] * sum(gamma ** (j - t) * c[j] for j in idx if j >= t) for t in idx}
            total = sum(big_w.values())
            for t in idx:
                w[t] = (1.0 if mask[t] else 0.0) if gamma == 0 else big_w[t] * big_n / total
        start = end
    return w


def reference_loss(losses, mask, gamma, segments=None):
    """Mean over sequences of sum_t w_t l_t / N."""
    w = reference_weights(losses, mask, gamma, segments)
    n = len(losses)
    segments = segments or [1] * n
    per_seq, seen = [], set()
    for s in segments:
        if s in seen:
            continue
        seen.add(s)
        idx = [i for i in range(n) if segments[i] == s]
        big_n = sum(mask[i] for i in idx)
        if big_n:
            per_seq.append(sum(w[i] * losses[i] for i in idx) / big_n)
    return sum(per_seq) / len(per_seq), w


def _mean(**kw):
    total, weight = ift_reduce(**kw)
    return total / weight


LOSSES, MASK = [1.0, 2.0, 0.5, 3.0], [1, 1, 1, 0]


def test_worked_example_by_hand():
    # By hand: N = 3, c = [1/3, 2/3, 1/6, 0]; W_2 = 1/6, W_1 = 2/3 + 0.95/6 = 0.825,
    # W_0 = 1/3 + 0.95 * 0.825 = 1.1170833...; sum W = 2.10875; w = 3 W / 2.10875.
    big_w = [1 / 3 + 0.95 * (2 / 3 + 0.95 / 6), 2 / 3 + 0.95 / 6, 1 / 6, 0.0]
    assert math.isclose(big_w[1], 0.825) and math.isclose(sum(big_w), 2.10875)
    want_w = [3 * x / 2.10875 for x in big_w]
    want_loss = sum(a * b for a, b in zip(want_w, LOSSES)) / 3
    loss_ref, w_ref = reference_loss(LOSSES, MASK, 0.95)
    np.testing.assert_allclose(w_ref, want_w, rtol=1e-14)
    w = ift_weights(jnp.array([LOSSES]), jnp.array([MASK]), gamma=0.95)[0]
    # Each weight: a 4-term discounted sum, its 4-term total and a division (float32).
    assert_f32_close(w, want_w, terms=12, scale=max(want_w))
    assert_f32_close(_mean(token_losses=jnp.array([LOSSES]), mask=jnp.array([MASK]),
                           gamma=0.95), want_loss, terms=16, scale=3.0)
    assert math.isclose(loss_ref, want_loss, rel_tol=1e-14)
    # The module docstring documents the same numbers (to its 7 decimals).
    doc = ift.__doc__
    documented = [float(x) for x in re.search(r"w = \[([^\]]+)\]", doc).group(1).split(",")]
    np.testing.assert_allclose(documented, want_w, atol=1e-7)
    assert f"loss = Σ w ℓ / N = {want_loss:.7f}" in " ".join(doc.split())


@pytest.mark.parametrize("stop", [False, True])
def test_gradients_match_finite_differences(stop):
    """d loss / d token losses, with and without gradients through the weights, against
    central differences in float64 (exact arithmetic up to 1e-16 and the O(h^2) term)."""
    with jax.enable_x64(True):
        x = jnp.array([LOSSES], jnp.float64)
        m = jnp.array([MASK], jnp.float64)
        f = lambda v: _mean(token_losses=v, mask=m, gamma=0.95, stop_gradient=stop)  # noqa: E731
        grad = np.asarray(jax.grad(f)(x))[0]
        if stop:  # weights held fixed: d/dl_t of sum_s w_s l_s / N = w_t / N
            w = np.asarray(ift_weights(x, m, gamma=0.95))[0]
            fd = w / 3
        else:
            h = 1e-6
            fd = np.array([(float(f(x.at[0, i].add(h))) - float(f(x.at[0, i].add(-h)))) / (2 * h)
                           for i in range(4)])
        # Central differences: O(h^2 f''') ~ 1e-12 plus rounding 1e-16 / h = 1e-10.
        np.testing.assert_allclose(grad, fd, rtol=0, atol=1e-8)
        assert grad[3] == 0  # masked: no gradient
        if not stop:  # the weights' own gradient changes the result
            w = np.asarray(ift_weights(x, m, gamma=0.95))[0]
            assert np.abs(grad - w / 3).max() > 1e-3
        # The independent reference's loss, differentiated numerically too.
        ref = lambda v: reference_loss(list(v), MASK, 0.95)[0]  # noqa: E731
        fd_ref = np.array([(ref(np.add(LOSSES, np.eye(4)[i] * 1e-6))
                            - ref(np.add(LOSSES, -np.eye(4)[i] * 1e-6))) / 2e-6 for i in range(4)])
        if not stop:
            np.testing.assert_allclose(grad, fd_ref, rtol=0, atol=1e-8)


def _rows():
    rng = np.random.default_rng(3)
    losses = rng.uniform(0.1, 4.0, (3, 10))
    mask = np.array([[0, 0, 0, 1, 1, 1, 1, 0, 0, 0],    # mask starts late, padding after
                     [0, 1, 1, 1, 0, 0, 1, 1, 1, 1],    # packed: two segments, see below
                     [1, 0, 1, 1, 0, 1, 1, 1, 1, 1]])   # gaps inside one sequence
    segments = np.array([[1] * 7 + [0] * 3, [1] * 4 + [2] * 6, [1] * 10])
    return losses, mask, segments


def test_late_mask_packed_row_and_gaps_match_reference():
    losses, mask, segments = _rows()
    w = np.asarray(ift_weights(jnp.asarray(losses, jnp.float32), jnp.asarray(mask), gamma=0.95,
                               segment_ids=jnp.asarray(segments)))
    total, weight = ift_reduce(token_losses=jnp.asarray(losses, jnp.float32),
                               mask=jnp.asarray(mask), gamma=0.95,
                               segment_ids=jnp.asarray(segments))
    seq_losses = []
    for r in range(3):
        loss_r, w_r = reference_loss(list(losses[r]), list(mask[r]), 0.95, list(segments[r]))
        # Each weight: 10-term sums (the scan, the total) and a division.
        assert_f32_close(w[r], w_r, terms=24, scale=max(w_r), err_msg=f"row {r}")
        for s in sorted(set(segments[r])):
            idx = segments[r] == s
            if mask[r][idx].sum():
                seq_losses.append(sum(np.asarray(w_r)[idx] * losses[r][idx]) / mask[r][idx].sum())
        # Weights average 1 over each sequence's trainable tokens.
        for s in sorted(set(segments[r])):
            idx = (segments[r] == s) & (mask[r] > 0)
            if idx.any():
                assert_f32_close(w[r][idx].mean(), 1.0, terms=24, scale=2.0)
    assert float(weight) == len(seq_losses) == 4  # exact: a count of sequences
    assert_f32_close(total, sum(seq_losses), terms=40, scale=sum(seq_losses))
    # The packed row is its two segments as separate rows, exactly the same weights: the
    # scan restarts at the boundary (no discounted leak from segment 2 into segment 1).
    first = np.asarray(ift_weights(jnp.asarray(losses[1:2, :4], jnp.float32),
                                   jnp.asarray(mask[1:2, :4]), gamma=0.95))[0]
    assert_f32_close(w[1, :4], first, terms=24, scale=2.0)
    leaky = reference_weights(list(losses[1]), list(mask[1]), 0.95)  # one segment
    assert np.abs(np.asarray(leaky[:4]) - w[1, :4]).max() > 1e-3


def test_gamma_zero_gives_unit_weights_and_the_sft_mean():
    losses, mask, segments = _rows()
    w = ift_weights(jnp.asarray(losses), jnp.asarray(mask), gamma=0.0,
                    segment_ids=jnp.asarray(segments))
    np.testing.assert_array_equal(np.asarray(w), mask.astype(np.float32))  # exact: the mask
    for normalize in sequences.NORMALIZATIONS:
        a = ift_reduce(token_losses=jnp.asarray(losses, jnp.float32), mask=jnp.asarray(mask),
                       gamma=0.0, segment_ids=jnp.asarray(segments), normalize=normalize)
        b = sequences.reduce(jnp.asarray(losses, jnp.float32), jnp.asarray(mask),
                             jnp.asarray(segments), normalize=normalize)
        # exact by construction: 1.0 * l is l, the same sums in the same order
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_all_zero_losses_and_empty_rows_give_zero_weights_not_nan():
    w, g = jax.value_and_grad(lambda x: jnp.sum(ift_weights(x, jnp.array([[1, 1, 0], [0, 0, 0]]),
                                                            gamma=0.9)))(jnp.zeros((2, 3)))
    assert float(w) == 0.0 and np.isfinite(np.asarray(g)).all()


def test_lambda_schedule_and_jitter():
    assert float(residual_lambda(IFTConfig(), 7)) == np.float32(0.2)
    lin = IFTConfig(lam=0.4, lam_min=0.1, lam_schedule="linear", lam_warmup_steps=10)
    got = [float(residual_lambda(lin, s)) for s in (0, 5, 10, 50)]
    np.testing.assert_allclose(got, [0.1, 0.25, 0.4, 0.4], rtol=1e-6)
    jit = IFTConfig(lam=0.5, lam_jitter=0.5, lam_jitter_seed=1)
    draws = np.array([float(residual_lambda(jit, s)) for s in range(200)])
    assert draws.min() >= 0.0 and draws.max() <= 1.0 and len(set(draws)) > 100
    # lam (1 + 0.5 z): mean 0.5, std 0.25 before clipping (which is symmetric here).
    assert abs(draws.mean() - 0.5) < 4 * 0.25 / math.sqrt(200)
    assert float(residual_lambda(jit, 3)) == float(residual_lambda(jit, 3))  # per step
    assert float(residual_lambda(jit, 3, train=False)) == np.float32(0.5)  # eval: no jitter
    with pytest.raises(ValueError, match="IFTConfig.lam_warmup_steps"):
        IFTConfig(lam_schedule="linear")
    with pytest.raises(ValueError, match="IFTConfig.gamma"):
        IFTConfig(gamma=1.5)


# ------------------------------------------------------------------ the model-level loss

CONFIG = preset("tiny", vocab_size=64)


def _batch():
    ids = np.array([[5, 9, 3, 7, 2, 11, 4, 0], [4, 4, 8, 1, 6, 6, 2, 9]], np.int32)
    mask = np.array([[0, 0, 1, 1, 1, 1, 0, 0], [0, 1, 0, 1, 1, 1, 1, 1]], np.int32)
    seg = np.array([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
    return {"input_ids": ids, "loss_mask": mask, "segment_ids": seg}


def _log_softmax64(z):
    z = np.asarray(z, np.float64)
    return z - (z.max(-1, keepdims=True)
                + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)))


def test_ift_loss_matches_an_independent_float64_computation():
    model = create_model(CONFIG, seed=2)
    batch = _batch()
    ids, mask, seg = batch["input_ids"], batch["loss_mask"], batch["segment_ids"]
    cfg = IFTConfig(lam=0.3, gamma=0.9)
    out = jax.jit(ift.make_ift_loss(cfg))(model, jax.tree.map(jnp.asarray, batch))

    # Pass 1 on the true tokens: greedy next tokens where a target sits.
    logits1 = np.asarray(model(jnp.asarray(ids), segment_ids=jnp.asarray(seg)), np.float64)
    top2 = np.sort(logits1, -1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-3, "near-tie: argmax is not well defined"
    x_hat = np.concatenate([ids[:, :1], logits1[:, :-1].argmax(-1)], 1)
    x_mix = np.where(mask > 0, x_hat, ids)
    assert (x_mix != ids).any()
    table = np.asarray(model.embedding_table(), np.float64)
    embeds = (1 - 0.3) * table[ids] + 0.3 * table[x_mix]
    logits2 = model(inputs_embeds=jnp.asarray(embeds, jnp.float32), segment_ids=jnp.asarray(seg))
    logp = np.take_along_axis(_log_softmax64(logits2)[:, :-1], ids[:, 1:, None], -1)[..., 0]
    m = mask[:, 1:]
    want = np.mean([reference_loss(list(-logp[r]), list(m[r]), 0.9, list(seg[r, 1:]))[0]
                    for r in range(2)])
    assert float(out.weight) == 2  # exact: two sequences
    # A mean over sequences of weighted mean log-probs: llama_logp_bound's chain (mean)
    # with the weights' sums (8 terms) and normalisations on top.
    bound = llama_logp_bound(model, 8, tokens=int(m.sum()), mean=True)
    assert_f32_close(float(out.total / out.weight), want, **dict(bound, depth=bound["depth"] + 3))
    nll, count = (float(v) for v in out.aux["nll_mixed"])
    assert count == m.sum()
    assert_f32_close(nll / count, -np.sum(logp * m) / m.sum(), **bound)
    # aux nll: pass 1's, the true next tokens given the true inputs (SFT's nll).
    logp1 = np.take_along_axis(_log_softmax64(logits1)[:, :-1], ids[:, 1:, None], -1)[..., 0]
    nll1, count1 = (float(v) for v in out.aux["nll"])
    assert_f32_close(nll1 / count1, -np.sum(logp1 * m) / m.sum(), **bound)
    replaced = float(out.aux["replaced"][0]) / float(out.aux["replaced"][1])
    assert replaced == ((x_mix != ids)[:, 1:] * m).sum() / m.sum()  # exact: counts


def test_ift_loss_is_invariant_to_the_chunk_size():
    """Greedy tokens and log-probs computed chunk by chunk equal the one-chunk result."""
    model = create_model(CONFIG, seed=2)
    batch = jax.tree.map(jnp.asarray, _batch())
    a = ift.make_ift_loss(IFTConfig(chunk_tokens=4))(model, batch)
    b = ift.make_ift_loss(IFTConfig(chunk_tokens=4096))(model, batch)
    assert float(a.aux["replaced"][0]) == float(b.aux["replaced"][0])  # the same argmax
    # Both passes' summed log-probs of the targets: llama_logp_bound's sum over n tokens.
    # (The weighted total itself is checked against float64 in the test above.)
    n = int(float(b.aux["nll"][1]))
    for name in ("nll", "nll_mixed"):
        assert_f32_close(float(a.aux[name][0]), float(b.aux[name][0]),
                         **llama_logp_bound(model, 8, tokens=n), err_msg=name)
