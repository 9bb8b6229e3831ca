"""Tolerances for float32 comparisons that follow from the arithmetic, not from one CPU.

Two float32 evaluations of the same quantity (chunked vs full, sharded vs single device,
jalign vs PyTorch) differ because they sum in different orders and fuse differently; how
much depends on the CPU's vector width, never on whether the code is right. So a
tolerance here is derived from what is computed: a value that is a sum of ``terms``
terms whose absolute values add up to at most ``scale`` is off by at most
γ_n · scale (Higham, "Accuracy and Stability of Numerical Algorithms", §3.1:
γ_n = n·u / (1 − n·u), u = 2⁻²⁴), whatever the order; two such evaluations differ by at
most twice that. ``depth`` counts chained reductions (layers of a model, a softmax after a
matmul) whose errors carry forward; each transcendental (exp, log) counts as a few terms.

The bound is worst-case and deterministic, so it holds on every CPU; a real bug (a wrong
mask, a dropped chunk, a misrouted shard) moves values by O(scale), far beyond it.

Comparisons that are exact by construction (a resumed run, a save/restore, a format
round trip, a copy) are not float32 tolerances: they use ``assert_array_equal`` and say so.
"""

from __future__ import annotations

import numpy as np

U32 = 2.0 ** -24  # float32 unit roundoff


def f32_tolerance(terms: int, scale, depth: int = 1):
    """Absolute bound on the difference of two float32 evaluations of a quantity that is
    ``depth`` chained sums of ``terms`` terms each, the terms' magnitudes adding to ``scale``
    (a float, or an array of them for one bound per element)."""
    if terms < 1 or depth < 1:
        raise ValueError(f"terms and depth must be >= 1, got {terms}, {depth}")
    n = terms * depth
    gamma = n * U32 / (1 - n * U32)
    if np.ndim(scale):
        return 2 * gamma * np.asarray(scale, np.float64)
    return 2 * gamma * float(scale)


def assert_f32_close(actual, expected, *, terms: int, scale: float | None = None,
                     depth: int = 1, err_msg: str = "") -> None:
    """``actual`` equals ``expected`` up to f32_tolerance. ``scale`` defaults to the largest
    |expected| (right when the summed terms do not cancel; pass the terms' magnitude
    otherwise)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if scale is None:
        scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    tol = f32_tolerance(terms, max(scale, np.finfo(np.float32).tiny), depth)
    np.testing.assert_allclose(
        actual, expected, rtol=0, atol=tol,
        err_msg=f"{err_msg} (float32 bound: {terms} terms x depth {depth}, scale {scale:.3g} "
                f"-> atol {tol:.3g})")


# ------------------------------------------------------------------ what the bounds count
#
# Elementwise steps count like terms of a sum: each rounds once. An exp or a log (XLA's are
# polynomial approximations accurate to a few ulp) counts as TRANSCENDENTAL_TERMS.
TRANSCENDENTAL_TERMS = 4

# Chained reductions in one pre-norm Llama decoder layer, in order: the attention RMSNorm's
# mean of squares, the q/k/v projection, the q.k scores, the softmax (a max, then a sum of
# exps), probs.v, the output projection, the MLP RMSNorm's mean, the gate/up projection,
# the down projection.
LLAMA_LAYER_REDUCTIONS = 9


def abs_sum(per_term, axis: int = 0) -> float:
    """max over elements of sum_k |per_term[k]|: the ``scale`` of a sum over ``axis`` whose
    terms are given (per-token or per-pair gradients, say), cancellation included."""
    return float(np.max(np.sum(np.abs(np.asarray(per_term, np.float64)), axis=axis)))


def _llama_parts(model):
    """(config, final norm weight, head [embed, outputs]) of a jalign Llama or
    ScalarHeadModel (whose head is its score vector)."""
    if hasattr(model, "score"):  # ScalarHeadModel: score = final hidden . score vector
        lm = model.backbone
        head = np.asarray(model.score[...], np.float64)[:, None]
    else:
        lm = model
        head = np.asarray(lm.lm_head_weight(), np.float64)
    return lm.config, np.asarray(lm.final_norm[...], np.float64), head


def llama_logits_bound(model, length: int) -> dict:
    """``terms``, ``depth`` and ``scale`` (for assert_f32_close) of the logits of a jalign
    Llama over ``length`` tokens, or of a ScalarHeadModel's scores; computed from its config
    and weights, so equally valid for a transformers model holding the same weights.

    terms: the longest reduction: hidden size (projections, RMSNorm), intermediate size
    (down projection), q_heads*head_dim (output projection) or the keys attended (length),
    plus one for a bias.
    depth: LLAMA_LAYER_REDUCTIONS per layer, then the final RMSNorm and the head.
    scale: a logit is sum_d h_d W_dv with h the final RMSNorm output, whose 2-norm is at most
    sqrt(d) max|norm weight|; so sum_d |h_d W_dv| <= sqrt(d) max|g| max_v ||W_:v||_2
    (Cauchy-Schwarz). A relative error e in h moves a logit by at most e * scale, which is
    how the earlier reductions' errors reach the logits.
    """
    cfg, norm, head = _llama_parts(model)
    d = cfg.hidden_size
    terms = max(d, cfg.intermediate_size, cfg.num_heads * cfg.resolved_head_dim, length)
    terms += int(cfg.attention_bias or cfg.mlp_bias or cfg.qkv_bias)  # a bias adds one term
    # Qwen3's q and k norms: one more reduction (a mean of squares over head_dim) per layer.
    depth = cfg.num_layers * (LLAMA_LAYER_REDUCTIONS + int(cfg.qk_norm)) + 2
    scale = np.sqrt(d) * np.abs(norm).max() * np.linalg.norm(head, axis=0).max()
    return {"terms": int(terms), "depth": int(depth), "scale": float(scale)}


def llama_hidden_bound(model, length: int) -> dict:
    """The bound of llama_logits_bound for the final-norm hidden states themselves: a
    component of g * x / rms(x) is at most max|g| sqrt(d) (all of x in one component)."""
    cfg, norm, _ = _llama_parts(model)
    b = llama_logits_bound(model, length)
    return dict(b, depth=b["depth"] - 1,
                scale=float(np.sqrt(cfg.hidden_size) * np.abs(norm).max()))


def llama_logp_bound(model, length: int, tokens: int = 1, *, mean: bool = False,
                     temperature: float = 1.0) -> dict:
    """The bound for a sum of ``tokens`` next-token log-probabilities (log_softmax of the
    logits / temperature at the target), e.g. a summed SFT loss, or their mean (``mean``).

    Each log p = z_t/T - logsumexp(z/T): a logsumexp over the vocabulary (its exp and log
    counted as TRANSCENDENTAL_TERMS each) after the logits' chain, then the token sum. Its
    terms have magnitudes |z_t/T| + logsumexp <= 2 S/T + log V (S the logits' scale), and a
    logit error e moves it by at most 2e/T: so scale = tokens * (2 S/T + log V), or without
    the factor ``tokens`` for the mean.
    """
    b = llama_logits_bound(model, length)
    v = _llama_parts(model)[0].vocab_size
    per_token = 2 * b["scale"] / temperature + np.log(v)
    return {"terms": max(b["terms"], v + 2 * TRANSCENDENTAL_TERMS, int(tokens)),
            "depth": b["depth"] + 2,
            "scale": float(per_token if mean else tokens * per_token)}


def llama_grad_bound(model, length: int, batch_tokens: int, scale: float) -> dict:
    """The bound for a parameter gradient of a loss built from llama_logp_bound's chain:
    the forward chain, the logsumexp, the token sum and the backward chain (as long as the
    forward), whose weight-gradient contractions run over all ``batch_tokens`` rows.
    ``scale``: abs_sum of the per-term (per-token, per-pair) gradients of that parameter."""
    b = llama_logp_bound(model, length)
    return {"terms": max(b["terms"], int(batch_tokens)), "depth": 2 * b["depth"],
            "scale": float(scale)}
