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

    def mean(self) -> jax.Array:
        return self.total / self.weight
