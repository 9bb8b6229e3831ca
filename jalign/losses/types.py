"""The value every loss returns.

``total`` is an unreduced sum over the units counted by ``weight`` (trainable tokens,
pairs, sequences). The training loop sums both over micro-batches (and devices) and
divides once, so an accumulated step equals the full-batch step exactly, whatever the
token counts of the micro-batches.
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class LossOutput(NamedTuple):
    total: jax.Array   # float32 scalar: sum of per-unit losses
    weight: jax.Array  # float32 scalar: number of units
    aux: dict          # metric name -> (sum, count) pairs, reduced the same way
    #                    (a name ending in MAX_SUFFIX: (largest value, 1), reduced by max)

    def mean(self) -> jax.Array:
        return self.total / self.weight


# Metrics that are a largest value, not a mean, say so by name; the sums of their parts
# would mean nothing, so combining parts (micro-batches, eval batches) takes the larger.
MAX_SUFFIX = "_max"


def combine_aux(a: dict, b: dict, add=None, maximum=None) -> dict:
    """The aux metrics of two parts of a batch, combined: (sum, count) pairs added, those
    named ``*_max`` (largest values, never negative: a zero start is neutral) by the
    larger value. ``add``/``maximum``: jnp's (default) or floats'."""
    import jax.numpy as jnp
    add = add or jnp.add
    maximum = maximum or jnp.maximum
    out = {**a, **b}  # a metric only one part has stays as it is
    for name in a.keys() & b.keys():
        (s, c), (s2, c2) = a[name], b[name]
        out[name] = ((maximum(s, s2), maximum(c, c2)) if name.endswith(MAX_SUFFIX)
                     else (add(s, s2), add(c, c2)))
    return out
