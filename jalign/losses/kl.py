"""Estimators of KL(π ‖ π_ref) from a sampled token, with x = log π(y) − log π_ref(y)
(Schulman 2020, "Approximating KL Divergence"):
- ``k1`` = x (unbiased, high variance, can be negative),
- ``k2`` = ½ x² (biased, low variance, ≥ 0),
- ``k3`` = exp(−x) − 1 + x (unbiased, low variance, ≥ 0).
"""

from __future__ import annotations

import jax.numpy as jnp

ESTIMATORS = ("k1", "k2", "k3")


def kl_per_token(logp, ref_logp, kind: str = "k1"):
    """The per-token KL estimate ``kind`` from the sampled tokens' log-probs."""
    if kind not in ESTIMATORS:
        raise ValueError(f"KL estimator {kind!r}; one of {ESTIMATORS}")
    x = jnp.asarray(logp, jnp.float32) - jnp.asarray(ref_logp, jnp.float32)
    if kind == "k1":
        return x
    if kind == "k2":
        return 0.5 * x * x
    return jnp.expm1(-x) + x
