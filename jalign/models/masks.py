"""Attention masks: the dense [batch, q, kv] boolean mask and the undrawn ``SelfMask``.

Masking is by segment ids and causality: a query attends to a key only if both are in the
same segment and the key is not later than the query. Segment id 0 marks padding;
padding attends only to padding, so its rows stay finite and are ignored downstream.
"""

from __future__ import annotations

import dataclasses
import functools

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


@functools.partial(jax.tree_util.register_dataclass, data_fields=["segment_ids"],
                   meta_fields=["window"])
@dataclasses.dataclass(frozen=True)
class SelfMask:
    """The mask of self-attention over a row's tokens at indices 0..T-1, undrawn: what the
    fused kernels read instead of a [batch, T, T] boolean mask. A pytree whose window
    stays static through scans and remat."""

    segment_ids: jax.Array        # [batch, T]
    window: int | None = None     # a model config's sliding window

    def dense(self):
        index = jnp.broadcast_to(jnp.arange(self.segment_ids.shape[1], dtype=jnp.int32),
                                 self.segment_ids.shape)
        return make_mask(self.segment_ids, self.segment_ids, index, index, self.window)
