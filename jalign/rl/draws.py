"""How a sampler draws one token per row from its (filtered, temperature-scaled) logits,
by name: ``get(name)(logits [B, V] float32, key) -> tokens [B] int32``.

- ``gumbel``: ``jax.random.categorical`` (argmax of logits + Gumbel noise): one random
  number per vocabulary entry and row, two logs each. The sampler's historical draw: runs
  that sampled with it (PPO) keep sampling the same tokens.
- ``inverse_cdf``: one uniform number per row, located in the cumulative distribution
  (exp(logits − max), summed in blocks of ``BLOCK`` entries, then within the block it
  falls in). The same distribution (up to float32 rounding of the cumulative sums) at a
  fraction of the work: measured 0.24 vs 7.0 ms per token for 32 rows of an 8192-entry
  vocabulary on the 2-core CPU (docs/benchmarks.md). Entries of probability 0 (filtered
  by top-k / top-p) are never drawn, whatever the rounding.

Both read the key's random bits as a function of the batch shape: a row's token depends
on its row index, not on what other rows hold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 128


def gumbel(logits_bv, key):
    return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


def _first_above(cum_bk, u_b, weights_bk):
    """The first index of positive weight whose cumulative sum exceeds u. Never one of
    weight 0: XLA sums a cumsum as a tree, so a zero-weight entry's sum may round above
    its predecessor's, and the sums need not even be monotone; and rounding can leave u
    at or past the last sum (then the last index of positive weight)."""
    hit = (cum_bk > u_b[:, None]) & (weights_bk > 0)
    idx = jnp.arange(weights_bk.shape[-1])
    last = jnp.max(jnp.where(weights_bk > 0, idx, 0), axis=-1)
    return jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), last)


def inverse_cdf(logits_bv, key):
    b, v = logits_bv.shape
    block = BLOCK if v % BLOCK == 0 else v  # one block when the vocabulary does not divide
    e_bv = jnp.exp(logits_bv - jnp.max(logits_bv, axis=-1, keepdims=True))
    e_bnk = e_bv.reshape(b, v // block, block)
    sums_bn = jnp.sum(e_bnk, axis=-1)
    cum_bn = jnp.cumsum(sums_bn, axis=-1)
    u_b = jax.random.uniform(key, (b,), jnp.float32) * cum_bn[:, -1]
    j = _first_above(cum_bn, u_b, sums_bn)
    before = jnp.take_along_axis(cum_bn, jnp.maximum(j - 1, 0)[:, None], axis=-1)[:, 0]
    before = jnp.where(j > 0, before, 0.0)
    e_bk = jnp.take_along_axis(e_bnk, j[:, None, None], axis=1)[:, 0]
    k = _first_above(before[:, None] + jnp.cumsum(e_bk, axis=-1), u_b, e_bk)
    return (j * block + k).astype(jnp.int32)


DRAWS = {"gumbel": gumbel, "inverse_cdf": inverse_cdf}


def get(name: str):
    if name not in DRAWS:
        raise ValueError(f"unknown token draw {name!r}; one of {sorted(DRAWS)}")
    return DRAWS[name]
