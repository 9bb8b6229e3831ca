"""Causal self-attention in query blocks, with its own backward: the portable fused path.

The rows' T queries are split into ``blocks`` blocks; block i attends to the keys up to its
own end only, so the fully masked upper triangle of key blocks is never computed ((n + 1) / 2n of
the score FLOPs remain with n blocks) and no [T, T] array exists, only
one block's [Tq, keys] scores at a time. The backward (``jax.custom_vjp``) keeps the
output and each query's log-sum-exp from the forward, recomputes each block's
probabilities from them, and normalises nothing of size [T, T] twice: the score
gradient is p * (dp - rowsum(do * o)).

Masking is the same as the XLA path's (``make_mask``: same segment, key not later than
the query, and the sliding window); a query's own key is always visible, so no row is
empty. Grouped-query attention keeps the kv heads unrepeated: q heads are grouped
[kv_heads, q_per_kv] against their kv head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jalign.models.masks import MASK_VALUE

BLOCKS = None  # query blocks per row; None: blocks_for(T)


def blocks_for(t: int) -> int:
    """Query blocks for rows of ``t`` tokens: one per 128 queries, 2 to 8. More skip more of
    the masked triangle ((n - 1) / 2n of the scores) but make smaller dots and a longer
    program: at 512 tokens on CPU 8 blocks took one layer's forward + backward from 92 to
    77 ms alone, but the whole SFT step only from 3.24 to 3.21 s, for 2.4 s more compile
    (benchmarks/attention_kernels.py, docs/benchmarks.md)."""
    return BLOCKS or max(2, min(8, t // 128))


def _edges(t: int, blocks: int | None) -> list[tuple[int, int]]:
    n = max(1, min(blocks or blocks_for(t), t))
    cuts = [round(i * t / n) for i in range(n + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _block_mask(seg_bt, start: int, end: int, window):
    """[B, end - start, end] visibility of keys 0..end-1 from queries start..end-1."""
    qi = jnp.arange(start, end)[:, None]
    ki = jnp.arange(end)[None, :]
    back = qi - ki
    ok = (back >= 0) if window is None else (back >= 0) & (back < window)
    return ok[None] & (seg_bt[:, start:end, None] == seg_bt[:, None, :end])


def _heads_first(q, k, v):
    """Heads ahead of tokens, once per call: every block's dots then read contiguous rows
    of one head instead of transposing each block's slice again (6% of the layer's
    forward + backward on CPU, benchmarks/attention_kernels.py)."""
    b, t, n, h = q.shape
    g = k.shape[2]
    qh = q.reshape(b, t, g, n // g, h).transpose(0, 2, 3, 1, 4)   # [B, G, R, T, H]
    return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)   # [B, G, T, H]


def _scores(qh, kh, mask, scale):
    s = jnp.einsum("bgrqh,bgkh->bgrqk", qh, kh, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask[:, None, None], s, MASK_VALUE)


def _forward(q, k, v, seg, window, blocks):
    b, t, n, h = q.shape
    scale = h ** -0.5
    qh, kh, vh = _heads_first(q, k, v)
    outs, lses = [], []
    for start, end in _edges(t, blocks):
        mask = _block_mask(seg, start, end, window)
        s = _scores(qh[:, :, :, start:end], kh[:, :, :end], mask, scale)
        m = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.exp(s - m)
        denom = jnp.sum(e, axis=-1, keepdims=True)
        lses.append((m + jnp.log(denom))[..., 0])                       # [B, G, R, Tq]
        p = (e / denom).astype(v.dtype)
        outs.append(jnp.einsum("bgrqk,bgkh->bgrqh", p, vh[:, :, :end]))
    return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=-1)   # [B, G, R, T, H]


def _to_btnh(oh):
    b, g, r, t, h = oh.shape
    return oh.transpose(0, 3, 1, 2, 4).reshape(b, t, g * r, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def blockwise_attention(q_btnh, k_btgh, v_btgh, segment_ids_bt, window=None,
                        blocks: int | None = None):
    """Causal self-attention of rows at indices 0..T-1 masked by segment (and ``window``);
    [batch, T, q_heads, head_dim] like ``attention``."""
    return _to_btnh(_forward(q_btnh, k_btgh, v_btgh, segment_ids_bt, window, blocks)[0])


def _fwd(q, k, v, seg, window, blocks):
    oh, lse = _forward(q, k, v, seg, window, blocks)
    out = _to_btnh(oh)
    # The residual is the returned output itself (the output projection keeps it anyway),
    # not a second, heads-first copy of it (XLA:CPU's step needed the same temporaries either
    # way: 1385.6 MiB on the benchmark shape).
    return out, (q, k, v, seg, out, lse)


def _bwd(window, blocks, res, d_out):
    q, k, v, seg, out, lse = res
    b, t, n, h = q.shape
    g = k.shape[2]
    scale = h ** -0.5
    qh, kh, vh = _heads_first(q, k, v)
    dog = d_out.reshape(b, t, g, n // g, h)
    doh = dog.transpose(0, 2, 3, 1, 4)
    # rowsum(do * o): the softmax backward's per-query term, [B, G, R, T]
    delta = jnp.einsum("bqgrh,bqgrh->bgrq", dog.astype(jnp.float32),
                       out.reshape(b, t, g, n // g, h).astype(jnp.float32))
    dq = []
    # dk and dv are summed transposed, [B, G, H, T]: on CPU the dot do^T p (its output rows
    # the head dims) ran 1.7x faster than p^T do (rows the keys), both contracting queries.
    dk_t = jnp.zeros((b, g, h, t), jnp.float32)
    dv_t = jnp.zeros((b, g, h, t), jnp.float32)
    for start, end in _edges(t, blocks):
        qb = qh[:, :, :, start:end]
        s = _scores(qb, kh[:, :, :end], _block_mask(seg, start, end, window), scale)
        p = jnp.exp(s - lse[..., start:end, None])                      # [B, G, R, Tq, K]
        do = doh[:, :, :, start:end]
        dv_t = dv_t.at[..., :end].add(jnp.einsum("bgrqh,bgrqk->bghk", do, p.astype(v.dtype),
                                                 preferred_element_type=jnp.float32))
        dp = jnp.einsum("bgrqh,bgkh->bgrqk", do, vh[:, :, :end], preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., start:end, None]) * scale).astype(q.dtype)
        dq.append(jnp.einsum("bgrqk,bgkh->bgrqh", ds, kh[:, :, :end],
                             preferred_element_type=jnp.float32))
        dk_t = dk_t.at[..., :end].add(jnp.einsum("bgrqh,bgrqk->bghk", qb, ds,
                                                 preferred_element_type=jnp.float32))
    dq = _to_btnh(jnp.concatenate(dq, axis=3))
    zero_seg = jnp.zeros(seg.shape, jax.dtypes.float0)
    return (dq.astype(q.dtype), dk_t.transpose(0, 3, 1, 2).astype(k.dtype),
            dv_t.transpose(0, 3, 1, 2).astype(v.dtype), zero_seg)


blockwise_attention.defvjp(_fwd, _bwd)
