"""Per-target gradients, and the float32 bound of a gradient assembled from them.

A token-level loss L = Σ_t g_t ℓ_t (g_t = dL/dℓ_t: 1/N for a mean, IFT's weights and
their derivatives for IFT) has dL/dθ = Σ_t g_t dℓ_t/dθ. With every dℓ_t/dθ computed on its
own, that sum can be taken in float64 (an independent reference for the gradient), and
its terms' magnitudes Σ_t |g_t dℓ_t/dθ| are the ``scale`` of the float32 bound of any
evaluation of it (tests/numerics.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jalign.losses.sft import next_token_log_probs
from jalign.models.build import abstract_model
from tests.numerics import abs_sum, f32_tolerance, llama_grad_bound


@functools.lru_cache(maxsize=None)
def _per_target_fn(config):
    graphdef, _ = abstract_model(config)

    def one(params, batch, embeds, r, c):
        """d ℓ(row r, target at position c) / d params; ``embeds`` (or None): the row's
        fixed input embeddings instead of its token ids."""
        row = {k: jax.lax.dynamic_slice_in_dim(v, r, 1) for k, v in batch.items()}

        def loss(p):
            model = nnx.merge(graphdef, p)
            if embeds is None:
                hidden = model.backbone(row["input_ids"], row.get("positions"),
                                        row.get("segment_ids"))
            else:
                hidden = model.backbone(positions=row.get("positions"),
                                        segment_ids=row.get("segment_ids"),
                                        inputs_embeds=jax.lax.dynamic_slice_in_dim(embeds, r, 1))
            return -next_token_log_probs(model, hidden, row["input_ids"])[0, c]

        return jax.grad(loss)(params)

    return jax.jit(jax.vmap(one, in_axes=(None, None, None, 0, 0)))


def gradient_and_bounds(model, params, batch, coeffs, *, embeds=None, extra_depth: int = 0):
    """(Σ_t g_t dℓ_t/dθ in float64, its float32 bound) per parameter leaf.

    ``coeffs`` [B, T-1]: g_t at each loss position (0 where no target). ``extra_depth``:
    chained reductions the loss adds after the token losses (IFT's weights)."""
    coeffs = np.asarray(coeffs, np.float64)
    rows, cols = np.nonzero(coeffs)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    per = _per_target_fn(model.config)(params, batch, embeds, jnp.asarray(rows),
                                       jnp.asarray(cols))
    length = batch["input_ids"].shape[1]
    tokens = int(np.asarray(batch["input_ids"]).size)
    g = coeffs[rows, cols]
    grads, tols = [], []
    for leaf in jax.tree.leaves(per):
        terms = np.asarray(leaf, np.float64) * g.reshape(-1, *([1] * (leaf.ndim - 1)))
        grads.append(terms.sum(0))
        bound = llama_grad_bound(model, length, tokens, abs_sum(terms))
        tols.append(f32_tolerance(**dict(bound, depth=bound["depth"] + extra_depth)))
    return grads, tols


def assert_grads_close(got, want, tols, err_msg=""):
    for i, (a, b, tol) in enumerate(zip(jax.tree.leaves(got), want, tols, strict=True)):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=0, atol=tol,
                                   err_msg=f"{err_msg} leaf {i}")
