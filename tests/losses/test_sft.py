"""SFT loss: hand-checked values, chunked == full logits, masks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jalign.losses import sft
from jalign.losses.sft import chunked_log_probs, sft_loss, token_log_probs
from jalign.models.build import create_model
from jalign.models.config import preset
from tests.numerics import TRANSCENDENTAL_TERMS, assert_f32_close, llama_logp_bound


def _chunk_loops(fn, *args) -> tuple[int, int]:
    """(token-chunk loops: ``lax.map``'s scans, rematerialised blocks) of the gradient
    program of ``fn``."""
    jaxpr = str(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(*args))
    return jaxpr.count("scan["), jaxpr.count("remat") + jaxpr.count("checkpoint[")


@pytest.mark.keep_logits
def test_logits_within_the_budget_run_as_one_chunk_kept(monkeypatch):
    """37 tokens over a 50-entry vocabulary keep 37 x 50 x 8 bytes (logit and probability,
    float32): within the budget the tokens run as one chunk, nothing recomputed; one byte
    under it, in chunks of 8 recomputed in the backward. The same values either way (the
    chunked path's equality with one block: test_chunked_equals_full_values_and_gradients)."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(37, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 50, 37), jnp.int32)

    def loss(h, w):
        return jnp.sum(chunked_log_probs(h, w, t, 8) * jnp.arange(37))

    kept = 37 * 50 * sft.LOGITS_KEPT_PER_VOCAB
    monkeypatch.setattr(sft, "KEEP_LOGITS_BYTES", kept)
    assert _chunk_loops(loss, h, w) == (0, 0)
    one = jax.grad(loss, argnums=(0, 1))(h, w)
    monkeypatch.setattr(sft, "KEEP_LOGITS_BYTES", kept - 1)
    loops, remat = _chunk_loops(loss, h, w)
    assert loops >= 1 and remat >= 1, (loops, remat)
    chunked = jax.grad(loss, argnums=(0, 1))(h, w)
    # dL/dh_n = a_n (w[:, t_n] - sum_v p_nv w[:, v]): at most 36 x 2 max|w|; dL/dw[:, v] =
    # sum_n a_n h_n (onehot - p): at most sum_n a_n max|h| (a_n = n).
    bound = dict(terms=50 + 2 * TRANSCENDENTAL_TERMS, depth=3)
    max_h, max_w = float(jnp.max(jnp.abs(h))), float(jnp.max(jnp.abs(w)))
    assert_f32_close(one[0], chunked[0], **bound, scale=36 * 2 * max_w, err_msg="dL/dh")
    assert_f32_close(one[1], chunked[1], **bound, scale=sum(range(37)) * max_h,
                     err_msg="dL/dw")


def test_token_log_probs_by_hand():
    logits = jnp.array([[[0.0, math.log(3.0)], [2.0, 2.0]]])  # p = [1/4, 3/4], [1/2, 1/2]
    lp = token_log_probs(logits, jnp.array([[1, 0]]))
    # A 2-term logsumexp (with its exps and log) minus the picked logit, against exact values:
    # its terms are the picked logit and the logsumexp, log 3 + log 4 and 2 + log 4 at most.
    z = np.asarray(logits, np.float64)[0]
    lse = np.log(np.exp(z).sum(-1))
    assert_f32_close(lp, [[math.log(0.75), math.log(0.5)]], terms=2 + 2 * TRANSCENDENTAL_TERMS,
                     scale=float(np.max(np.abs(z).max(-1) + np.abs(lse))))


def test_sft_loss_matches_hand_computation():
    """Loss = -sum of log p(next token) over masked targets, from the model's own logits."""
    model = create_model(preset("tiny", vocab_size=64), seed=1)
    ids = jnp.array([[5, 9, 3, 7, 2], [4, 4, 8, 1, 0]], jnp.int32)
    mask = jnp.array([[0, 0, 1, 1, 1], [0, 1, 0, 1, 0]], jnp.int32)
    out = sft_loss(model, {"input_ids": ids, "loss_mask": mask})
    logits = np.asarray(model(ids), np.float64)
    expected = 0.0
    for b in range(2):
        for t in range(1, 5):
            if mask[b, t]:
                row = logits[b, t - 1]
                expected -= row[ids[b, t]] - np.log(np.exp(row - row.max()).sum()) - row.max()
    # exact by construction: a float32 sum of five 1.0 mask entries (integers below 2**24)
    assert float(out.weight) == 5
    # sft_loss's own forward and logsumexp against float64 on model(ids)'s float32 logits:
    # 5 summed log-probs over a 64-entry vocabulary, after the tiny model's logits chain.
    assert_f32_close(float(out.total), expected, **llama_logp_bound(model, 5, tokens=5))
    # exact by construction: the same five 1.0 entries
    assert float(out.aux["nll"][1]) == 5


def test_chunked_equals_full_values_and_gradients():
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(37, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 50, 37), jnp.int32)

    def loss(h, w, chunk):
        return jnp.sum(chunked_log_probs(h, w, t, chunk) * jnp.arange(37))

    full, g_full = jax.value_and_grad(loss, argnums=(0, 1))(h, w, 1000)
    part, g_part = jax.value_and_grad(loss, argnums=(0, 1))(h, w, 8)  # 5 chunks, padded

    # Magnitudes of the summed terms, in float64 from the same inputs.
    h64, w64, t64 = np.asarray(h, np.float64), np.asarray(w, np.float64), np.asarray(t)
    a = np.arange(37.0)
    z = h64 @ w64                                           # [37, 50], 16-term dot products
    lse = z.max(-1) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))
    p = np.exp(z - lse[:, None])
    onehot = np.eye(50)[t64]
    # Every value below: 16-term dot products, a 50-term logsumexp over the vocabulary (its
    # exp and log counted too), then one more sum (over tokens or the vocabulary).
    bound = dict(terms=50 + 2 * TRANSCENDENTAL_TERMS, depth=3)
    # loss = sum_n a_n (z_n,t - lse_n): terms of magnitude a_n (|z_n,t| + lse_n).
    assert_f32_close(float(part), float(full), **bound,
                     scale=float(np.sum(a * (np.abs(z[np.arange(37), t64]) + np.abs(lse)))))
    # dL/dh_n = a_n (w[:, t_n] - sum_v p_nv w[:, v]): a 50-term sum over the vocabulary;
    # dL/dw[:, v] = sum_n a_n h_n (onehot_nv - p_nv): a 37-term sum over tokens. Both cancel
    # (values reach ~140 of terms adding to ~1e3), so the scale is the terms' magnitudes.
    scale_h = float(np.max(a[:, None] * (np.abs(w64[:, t64]).T + p @ np.abs(w64).T)))
    scale_w = float(np.max((a[:, None] * np.abs(h64)).T @ (onehot + p)))
    for name, got, want, scale in (("dL/dh", g_part[0], g_full[0], scale_h),
                                   ("dL/dw", g_part[1], g_full[1], scale_w)):
        assert_f32_close(got, want, **bound, scale=scale, err_msg=name)


def test_sft_loss_chunking_does_not_change_the_model_loss():
    model = create_model(preset("tiny", vocab_size=64), seed=2)
    rng = np.random.default_rng(1)
    batch = {"input_ids": jnp.asarray(rng.integers(0, 64, (2, 24)), jnp.int32),
             "loss_mask": jnp.asarray(rng.integers(0, 2, (2, 24)), jnp.int32)}
    full = nnx.jit(lambda m: sft_loss(m, batch, chunk_tokens=4096))(model)
    chunked = nnx.jit(lambda m: sft_loss(m, batch, chunk_tokens=10))(model)
    # Two programs (one logits block vs 5 chunks): the summed log-probs of the masked
    # targets over a 64-entry vocabulary, after the tiny model's logits chain over 24 tokens.
    tokens = int(np.asarray(batch["loss_mask"])[:, 1:].sum())
    assert_f32_close(float(chunked.total), float(full.total),
                     **llama_logp_bound(model, 24, tokens=tokens))


def test_sequence_normalisation_by_hand():
    """normalize='sequences': the mean over sequences (packed segments count) of each
    one's mean token loss; 'tokens': the mean over all targets."""
    from jalign.losses import sequences
    losses = jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [0.5, 1.5, 9.0, 9.0, 9.0, 9.0]])
    mask = jnp.array([[0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 0, 0]])
    seg = jnp.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 0, 0, 0]])  # row 0: two segments
    total, weight = sequences.reduce(losses, mask, seg, normalize="sequences")
    # Sequences: (2+3)/2, (5+6)/2, (0.5+1.5)/2 -> sum 2.5 + 5.5 + 1 = 9, three of them;
    # the padding segment of row 1 has no targets and is not counted.
    assert float(weight) == 3.0  # exact: a count
    assert_f32_close(float(total), 9.0, terms=6)
    total, weight = sequences.reduce(losses, mask, seg, normalize="tokens")
    assert float(weight) == 6.0 and float(total) == 18.0  # exact: small integers and halves
    # Unpacked rows (segment_ids None) are one sequence each.
    total, weight = sequences.reduce(losses, mask, None, normalize="sequences")
    assert float(weight) == 2.0
    assert_f32_close(float(total), (2 + 3 + 5 + 6) / 4 + 1.0, terms=6)


def test_sft_loss_sequence_normalisation_matches_per_sequence_means():
    model = create_model(preset("tiny", vocab_size=64), seed=1)
    ids = jnp.array([[5, 9, 3, 7, 2], [4, 4, 8, 1, 0]], jnp.int32)
    mask = jnp.array([[0, 0, 1, 1, 1], [0, 1, 0, 1, 0]], jnp.int32)
    batch = {"input_ids": ids, "loss_mask": mask, "segment_ids": jnp.ones_like(ids)}
    tokens = sft_loss(model, batch)
    seqs = sft_loss(model, batch, normalize="sequences")
    logits = np.asarray(model(ids), np.float64)
    per_seq = []
    for b in range(2):
        lp = [logits[b, t - 1, ids[b, t]] - np.log(np.exp(logits[b, t - 1]).sum())
              for t in range(1, 5) if mask[b, t]]
        per_seq.append(-np.mean(lp))
    assert float(seqs.weight) == 2  # exact: two sequences
    assert_f32_close(float(seqs.total), sum(per_seq), **llama_logp_bound(model, 5, tokens=5))
    # aux nll stays the per-token sum, the same in both normalisations (same program)
    np.testing.assert_array_equal(np.asarray(seqs.aux["nll"]), np.asarray(tokens.aux["nll"]))
    assert float(tokens.weight) == 5


def _sharded_chunk_program(chunk: int, flat: bool = False):
    """grad of a chunked log-prob sum over a batch sharded 8 ways (fsdp), head sharded on
    its embed dim as the model's is: (compiled program, loss function)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jalign.sharding import DEFAULT_RULES, MeshConfig, make_mesh, use_mesh
    mesh = make_mesh(MeshConfig(1, 8, 1), jax.devices()[:8])
    h = jax.ShapeDtypeStruct((8, 64, 8), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    w = jax.ShapeDtypeStruct((8, 50), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    t = jax.ShapeDtypeStruct((8, 64), jnp.int32, sharding=NamedSharding(mesh, P("fsdp")))

    def loss(h, w, t):
        with use_mesh(mesh, DEFAULT_RULES):
            if flat:  # the batch flattened into one row of tokens, chunked across rows
                return jnp.sum(chunked_log_probs(h.reshape(-1, 8), w, t.reshape(-1), chunk)
                               * jnp.tile(jnp.arange(64.0), 8))
            return jnp.sum(chunked_log_probs(h, w, t, chunk) * jnp.arange(64.0))

    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w, t).compile(), loss


def test_each_device_projects_only_its_own_rows():
    """Chunks run along each row, so a batch-sharded device never computes (and the mesh
    never all-reduces) other devices' logits: what moves is the head's weight and its
    gradient (8 x 50 floats), once per chunk of a row. Chunking the flattened batch made every
    device run every chunk of the global batch (32 here)."""
    from jalign.hlo_collectives import collectives
    compiled, _ = _sharded_chunk_program(chunk=16)  # 4 chunks of 16 tokens per row
    found = collectives(compiled.as_text())
    # per chunk: the head's weight gathered (forward) and its gradient reduced (backward)
    assert all(v["bytes"] <= 4 * 8 * 50 * 4 for v in found.values()), found
    # Across rows instead, every device runs all 32 chunks of the global batch: XLA:CPU
    # gathers all the hidden states (8 x 64 x 8 floats) to every device (XLA:TPU reduced
    # partial logits instead); the row chunks move less than a tenth of that.
    flat = collectives(_sharded_chunk_program(chunk=16, flat=True)[0].as_text())
    hidden = 8 * 64 * 8 * 4
    assert sum(v["bytes"] for v in flat.values()) >= hidden, flat
    assert sum(v["bytes"] for v in found.values()) < hidden, found


def test_row_chunks_on_a_sharded_batch_equal_one_block():
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(8, 64, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 50, (8, 64)), jnp.int32)
    compiled, loss = _sharded_chunk_program(chunk=16)
    g_part = compiled(h, w, t)
    g_full = jax.grad(lambda h, w: jnp.sum(chunked_log_probs(h, w, t, 1 << 20)
                                           * jnp.arange(64.0)), argnums=(0, 1))(h, w)
    # As in test_chunked_equals_full_values_and_gradients: per-token 8-term dots and a
    # 50-term logsumexp, then a sum over the vocabulary (dL/dh) or 8 x 64 tokens (dL/dw).
    h64, w64, t64 = (np.asarray(x, np.float64) for x in (h, w, t))
    a = np.arange(64.0)[None, :, None]
    z = h64 @ w64
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(50)[t64.astype(int)]
    bound = dict(terms=512 + 2 * TRANSCENDENTAL_TERMS, depth=3)
    scale_h = float(np.max(a * (np.abs(w64).max() * 2)))
    scale_w = float(np.max(np.einsum("btd,btv->dv", a * np.abs(h64), onehot + p)))
    assert_f32_close(g_part[0], g_full[0], **bound, scale=scale_h, err_msg="dL/dh")
    assert_f32_close(g_part[1], g_full[1], **bound, scale=scale_w, err_msg="dL/dw")
