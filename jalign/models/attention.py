"""Attention: one entry point, several backends.

Shapes: q_btnh [batch, q_len, q_heads, head_dim], k_bsgh / v_bsgh [batch, kv_len,
kv_heads, head_dim]. Grouped-query attention maps q head n to kv head n // (q_heads /
kv_heads), the same grouping Hugging Face uses.

Masking is by segment ids and causality: a query attends to a key only if both are in the
same segment and the key is not later than the query. Segment id 0 marks padding;
padding attends only to padding, so its rows stay finite and are ignored downstream.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A large finite negative instead of -inf: a fully masked row then gives a uniform
# (finite) distribution rather than NaN, which would poison gradients through the sum.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def make_mask(q_segment_ids, kv_segment_ids, q_index, kv_index, window: int | None = None):
    """Boolean [batch, q_len, kv_len] mask: same segment and key index <= query index
    (and, with a sliding ``window``, less than ``window`` tokens back: query - key < window,
    transformers' rule).

    ``*_index`` are absolute token indices in the row (not RoPE positions, which restart
    per packed segment), so causality holds across segment boundaries too; within one
    segment index and position differences are equal, so the window is the same.
    """
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    back = q_index[:, :, None] - kv_index[:, None, :]
    mask = same & (back >= 0)
    return mask if window is None else mask & (back < window)


def _xla_attention(q_btnh, k_bsgh, v_bsgh, mask_bts, scale):
    b, t, n, h = q_btnh.shape
    g = k_bsgh.shape[2]
    q_btgrh = q_btnh.reshape(b, t, g, n // g, h)
    scores = jnp.einsum("btgrh,bsgh->bgrts", q_btgrh, k_bsgh,
                        preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask_bts[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bsgh.dtype)
    out = jnp.einsum("bgrts,bsgh->btgrh", probs, v_bsgh)
    return out.reshape(b, t, n, h)


def _dpa_attention(q_btnh, k_bsgh, v_bsgh, mask_bts, scale, implementation):
    # jax.nn.dot_product_attention handles GQA itself (q heads a multiple of kv heads).
    return jax.nn.dot_product_attention(
        q_btnh, k_bsgh, v_bsgh, mask=mask_bts[:, None, :, :], scale=scale,
        implementation=implementation)


def attention(q_btnh, k_bsgh, v_bsgh, mask_bts, *, impl: str = "xla"):
    """Softmax attention with a boolean mask; returns [batch, q_len, q_heads, head_dim].

    impl: ``xla`` (plain einsums; measured fastest on CPU), ``cudnn`` (the fused GPU
    kernel via ``jax.nn.dot_product_attention``), or ``auto`` (cudnn on GPU, else xla).
    """
    scale = q_btnh.shape[-1] ** -0.5
    if impl == "auto":
        impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    if impl == "xla":
        return _xla_attention(q_btnh, k_bsgh, v_bsgh, mask_bts, scale)
    if impl == "cudnn":
        backend = "cudnn" if jax.default_backend() == "gpu" else None
        return _dpa_attention(q_btnh, k_bsgh, v_bsgh, mask_bts, scale, backend)
    raise ValueError(f"unknown attention impl {impl!r}; use 'xla', 'cudnn' or 'auto'")
