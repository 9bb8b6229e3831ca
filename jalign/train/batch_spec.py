"""The abstract layout of a train step's batch (``Recipe.batch_spec``) and its check."""

from __future__ import annotations

import jax
import numpy as np


def int32(*shape):
    return jax.ShapeDtypeStruct(shape, np.dtype(np.int32))


def float32(*shape):
    return jax.ShapeDtypeStruct(shape, np.dtype(np.float32))


def check_batch(spec: dict, batch: dict, what: str) -> None:
    """RuntimeError (a bug in a batch source, not a user's problem) when ``batch`` differs
    from ``spec`` in its fields, shapes or dtypes."""
    got = {k: (tuple(v.shape), str(v.dtype)) for k, v in batch.items()}
    want = {k: (tuple(v.shape), str(v.dtype)) for k, v in spec.items()}
    if got != want:
        diff = sorted(f"{k}: {want.get(k, 'absent')} expected, {got.get(k, 'absent')} given"
                      for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise RuntimeError(f"{what}'s batch is not the recipe's batch_spec: " + "; ".join(diff))
