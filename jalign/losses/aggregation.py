"""How per-token policy losses become one loss, by name (``AGGREGATIONS``; ``get``).

Each is ``fn(per_token, mask, *, max_length) -> (total, weight)`` over tokens where ``mask``
is 1 (``per_token`` and ``mask`` [batch, length]); the loss is Σ total / Σ weight over the
micro-batches of a step (``LossOutput``'s contract: the train step sums both over
accumulated micro-batches and divides once, and a micro-batch is the global one, all
devices together). ``max_length``: the longest completion a rollout can sample.

- ``token_mean`` (alias ``dapo``; Yu et al. 2025, "DAPO", token-level policy gradient
  loss): Σ ℓ / the active tokens of the whole global, accumulated batch. Long completions
  weigh in proportion to their tokens, and accumulated steps equal the full batch exactly.
- ``grpo`` (Shao et al. 2024, "DeepSeekMath"): each row's token mean, then the mean over
  all rows (a completion left with no token, e.g. masked as truncated, counts as 0, as in
  TRL). ``seq_mean_token_mean`` (PPO's): the same over the sequences with tokens.
- ``seq_mean_token_sum``: each sequence's token sum, then the mean over sequences.
- ``bnpo`` (TRL's name: token mean over the local batch): Σ ℓ / the active tokens of each
  micro-batch, then the mean over micro-batches (with no accumulation, ``token_mean``).
- ``dr_grpo`` (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
  Perspective", Dr. GRPO): Σ ℓ / (rows × max_length), a constant normaliser (every row
  counted, with tokens or not), so no length bias.
"""

from __future__ import annotations

import jax.numpy as jnp

from jalign.losses import sequences


def _masked(per_token, mask):
    m = jnp.asarray(mask).astype(jnp.float32)
    # where, not a product: a NaN or inf at a masked position (a sentinel, padding) must
    # not reach the sum.
    return jnp.where(m > 0, jnp.asarray(per_token, jnp.float32), 0.0), m


def _sequences(m):
    """The rows with at least one active token."""
    return jnp.sum((jnp.sum(m, axis=1) > 0).astype(jnp.float32))


def token_mean(per_token, mask, *, max_length=None):
    x, m = _masked(per_token, mask)
    return sequences.reduce(x, m, normalize="tokens")


def seq_mean_token_mean(per_token, mask, *, max_length=None):
    x, m = _masked(per_token, mask)
    return sequences.reduce(x, m, normalize="sequences")


def seq_mean_token_sum(per_token, mask, *, max_length=None):
    x, m = _masked(per_token, mask)
    return jnp.sum(x * m), _sequences(m)


def grpo(per_token, mask, *, max_length=None):
    x, m = _masked(per_token, mask)
    per_row = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    return jnp.sum(per_row), jnp.float32(m.shape[0])


def bnpo(per_token, mask, *, max_length=None):
    x, m = _masked(per_token, mask)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0), jnp.float32(1.0)


def dr_grpo(per_token, mask, *, max_length=None):
    if max_length is None or max_length < 1:
        raise ValueError(f"the dr_grpo aggregation needs max_length >= 1, got {max_length}")
    x, m = _masked(per_token, mask)
    return jnp.sum(x * m) / float(max_length), jnp.float32(m.shape[0])


# name -> (function, what its weight counts)
AGGREGATIONS = {
    "token_mean": (token_mean, "response_tokens"),
    "dapo": (token_mean, "response_tokens"),
    "seq_mean_token_mean": (seq_mean_token_mean, "sequences"),
    "grpo": (grpo, "sequences"),
    "seq_mean_token_sum": (seq_mean_token_sum, "sequences"),
    "bnpo": (bnpo, "batches"),
    "dr_grpo": (dr_grpo, "sequences"),
}


def get(name: str):
    if name not in AGGREGATIONS:
        raise ValueError(f"aggregation {name!r}; one of {tuple(AGGREGATIONS)}")
    return AGGREGATIONS[name][0]


def weight_name(name: str) -> str:
    get(name)
    return AGGREGATIONS[name][1]


def aggregate(per_token, mask, how: str = "token_mean", *, max_length=None):
    """(total, weight) of masked per-token losses by the aggregation ``how``."""
    return get(how)(per_token, mask, max_length=max_length)
