"""Per-sequence bookkeeping for token losses: which tokens belong to one sequence, and
losses normalised per sequence rather than per token.

A packed row holds several sequences (segments); an unpacked row one. Everything here
works on arrays [batch, length] aligned with the token losses, and finds the sequences
from where ``segment_ids`` changes along the row, so it does not depend on the id values
(only on each segment being contiguous, as packing writes them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NORMALIZATIONS = ("tokens", "sequences")


def runs(segment_ids_bt, shape) -> jax.Array:
    """Index (0, 1, ...) of the contiguous segment each position is in, [batch, length]."""
    if segment_ids_bt is None:
        return jnp.zeros(shape, jnp.int32)
    seg = jnp.asarray(segment_ids_bt)
    changes = jnp.concatenate([jnp.zeros_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], 1)
    return jnp.cumsum(changes, axis=1, dtype=jnp.int32)


def run_sums(values_bt, run_bt) -> jax.Array:
    """Each position's sum of ``values`` over its segment, [batch, length]."""
    length = values_bt.shape[1]

    def one(v, r):
        return jax.ops.segment_sum(v, r, num_segments=length)[r]

    return jax.vmap(one)(values_bt, run_bt)


def reduce(token_losses_bt, mask_bt, segment_ids_bt=None, *, normalize: str = "tokens"):
    """(total, weight) of masked token losses.

    ``tokens``: the sum over trainable tokens, weight = their number (the loss is the mean
    over all tokens of the batch). ``sequences``: each sequence's sum divided by its N
    trainable tokens, summed; weight = the number of sequences with N > 0 (the loss is the
    mean over sequences of their mean token loss). Both are sums over a batch, so
    accumulated micro-batches divided once equal the full batch."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r}; one of {NORMALIZATIONS}")
    mask = mask_bt.astype(token_losses_bt.dtype)
    masked = token_losses_bt * mask
    if normalize == "tokens":
        return jnp.sum(masked), jnp.sum(mask)
    run = runs(segment_ids_bt, mask.shape)
    n_t = run_sums(mask, run)
    total = jnp.sum(masked / jnp.maximum(n_t, 1.0))
    # One count per sequence with trainable tokens, at the sequence's first position.
    first = jnp.concatenate([jnp.ones_like(run[:, :1], bool), run[:, 1:] != run[:, :-1]], 1)
    weight = jnp.sum((first & (n_t > 0)).astype(total.dtype))
    return total, weight


def masked_mean(x, mask):
    m = jnp.asarray(mask).astype(jnp.float32)
    return jnp.sum(jnp.where(m > 0, x, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)


def masked_var(x, mask, unbiased: bool = True):
    """Variance over the unmasked entries (Bessel-corrected when ``unbiased``)."""
    m = jnp.asarray(mask).astype(jnp.float32)
    n = jnp.sum(m)
    centred = jnp.where(m > 0, x - masked_mean(x, m), 0.0)
    return jnp.sum(centred ** 2) / jnp.maximum(n - (1.0 if unbiased else 0.0), 1.0)
