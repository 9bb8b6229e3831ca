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

BLOCKS = None  # query blocks per row; None: one per 128 queries, 2 to 8 (blocks_for)


def blocks_for(t: int) -> int:
    """Query blocks for rows of ``t`` tokens: 2, 3 and 4 blocks measured alike at 512
    tokens on CPU (benchmarks/attention_kernels.py); more skip more of the masked
    triangle ((n - 1) / 2n of the scores) as rows grow."""
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


def _scores(q_bqgrh, k_bkgh, mask, scale):
    s = jnp.einsum("bqgrh,bkgh->bgrqk", q_bqgrh, k_bkgh,
                   preferred_element_type=jnp.float32) * scale
    return jnp.where(mask[:, None, None], s, MASK_VALUE)


def _forward(q, k, v, seg, window, blocks):
    b, t, n, h = q.shape
    g = k.shape[2]
    scale = h ** -0.5
    qg = q.reshape(b, t, g, n // g, h)
    outs, lses = [], []
    for start, end in _edges(t, blocks):
        s = _scores(qg[:, start:end], k[:, :end], _block_mask(seg, start, end, window), scale)
        m = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.exp(s - m)
        denom = jnp.sum(e, axis=-1, keepdims=True)
        lses.append((m + jnp.log(denom))[..., 0])                       # [B, G, R, Tq]
        p = (e / denom).astype(v.dtype)
        outs.append(jnp.einsum("bgrqk,bkgh->bqgrh", p, v[:, :end]))
    out = jnp.concatenate(outs, axis=1).reshape(b, t, n, h)
    return out, jnp.concatenate(lses, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def blockwise_attention(q_btnh, k_btgh, v_btgh, segment_ids_bt, window=None,
                        blocks: int | None = None):
    """Causal self-attention of rows at indices 0..T-1 masked by segment (and ``window``);
    [batch, T, q_heads, head_dim] like ``attention``."""
    return _forward(q_btnh, k_btgh, v_btgh, segment_ids_bt, window, blocks)[0]


def _fwd(q, k, v, seg, window, blocks):
    out, lse = _forward(q, k, v, seg, window, blocks)
    return out, (q, k, v, seg, out, lse)


def _bwd(window, blocks, res, d_out):
    q, k, v, seg, out, lse = res
    b, t, n, h = q.shape
    g = k.shape[2]
    scale = h ** -0.5
    qg = q.reshape(b, t, g, n // g, h)
    dog = d_out.reshape(b, t, g, n // g, h)
    # rowsum(do * o): the softmax backward's per-query term, [B, G, R, T]
    delta = jnp.einsum("bqgrh,bqgrh->bgrq", dog.astype(jnp.float32),
                       out.reshape(b, t, g, n // g, h).astype(jnp.float32))
    dq = []
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for start, end in _edges(t, blocks):
        s = _scores(qg[:, start:end], k[:, :end], _block_mask(seg, start, end, window), scale)
        p = jnp.exp(s - lse[..., start:end, None])                      # [B, G, R, Tq, K]
        do = dog[:, start:end]
        dv = dv.at[:, :end].add(jnp.einsum("bgrqk,bqgrh->bkgh", p.astype(v.dtype), do,
                                           preferred_element_type=jnp.float32))
        dp = jnp.einsum("bqgrh,bkgh->bgrqk", do, v[:, :end], preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., start:end, None]) * scale).astype(q.dtype)
        dq.append(jnp.einsum("bgrqk,bkgh->bqgrh", ds, k[:, :end],
                             preferred_element_type=jnp.float32))
        dk = dk.at[:, :end].add(jnp.einsum("bgrqk,bqgrh->bkgh", ds, qg[:, start:end],
                                           preferred_element_type=jnp.float32))
    dq = jnp.concatenate(dq, axis=1).reshape(b, t, n, h)
    zero_seg = jnp.zeros(seg.shape, jax.dtypes.float0)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zero_seg


blockwise_attention.defvjp(_fwd, _bwd)
