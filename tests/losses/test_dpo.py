"""DPO-family losses against independent numpy formulas, plus finite-difference gradients."""

import math

import jax
import numpy as np
import pytest

from jalign.losses.dpo import dpo_loss
from tests.numerics import TRANSCENDENTAL_TERMS, assert_f32_close, f32_tolerance

PC = np.array([-10.0, -3.0, -7.5, -20.0])
PR = np.array([-12.0, -2.0, -7.5, -15.0])
RC = np.array([-11.0, -3.5, -7.0, -19.0])
RR = np.array([-11.5, -2.5, -8.0, -14.0])
LC = np.array([5.0, 2.0, 4.0, 10.0])
LR = np.array([6.0, 3.0, 4.0, 8.0])
BETA = 0.3


def logsig(x):
    return -np.logaddexp(0.0, -x)


def reference(loss_type, pc, pr, rc, rr, eps=0.0, free=False, gamma=0.5, dpop=0.0):
    if free:
        rc, rr = 0 * rc, 0 * rr
    h = (pc - rc) - (pr - rr) - dpop * np.maximum(0.0, rc - pc)
    if loss_type == "sigmoid":
        return -(1 - eps) * logsig(BETA * h) - eps * logsig(-BETA * h)
    if loss_type == "robust":
        return ((1 - eps) * -logsig(BETA * h) + eps * logsig(-BETA * h)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - BETA * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * BETA)) ** 2
    if loss_type == "ipo_avg":
        return ((pc - rc) / LC - (pr - rr) / LR - dpop * np.maximum(0.0, rc - pc) / LC
                - 1 / (2 * BETA)) ** 2
    if loss_type == "simpo":
        return -logsig(BETA * (pc / LC - pr / LR) - gamma)
    if loss_type == "orpo":
        odds = lambda l: l - np.log(1 - np.exp(l))  # noqa: E731
        return -BETA * logsig(odds(pc / LC) - odds(pr / LR))
    raise AssertionError(loss_type)


# Every formula here is a short chain of float32 steps on exact inputs (the log-probs are
# small multiples of 1/2): h sums four log-probs (a penalty and length divisions add at most
# three steps), then a scale by beta, a log-sigmoid or a square (ORPO: expm1 and a log
# first) and a smoothing mix. Counted generously: 4 terms x a depth of 4 + 3 transcendentals.
FORMULA = dict(terms=4, depth=4 + 3 * TRANSCENDENTAL_TERMS)


def _sensitivity(values, derivs, args):
    """max over elements of |v| + sum_i |dv/dx_i| |x_i|: to first order, a relative error e
    in any input or step moves v by at most e times this (the scale of the bound)."""
    sens = sum(np.abs(np.asarray(d, np.float64)) @ np.abs(np.asarray(x, np.float64))
               for d, x in zip(derivs, args))
    return float(np.max(np.abs(np.asarray(values, np.float64)) + sens))


CASES = [("sigmoid", {}), ("sigmoid", {"label_smoothing": 0.1}), ("robust", {"label_smoothing": 0.2}),
         ("hinge", {}), ("ipo", {}), ("sigmoid", {"reference_free": True}),
         ("ipo_avg", {}), ("simpo", {"gamma": 0.5}), ("orpo", {}),
         ("sigmoid", {"dpop_lambda": 5.0}), ("ipo_avg", {"dpop_lambda": 5.0})]


def _call(name, kw, pc, pr, rc, rr):
    loss_type = "ipo" if name == "ipo_avg" else name
    if name in ("ipo_avg", "simpo", "orpo"):
        kw = dict(kw, chosen_lengths=LC, rejected_lengths=LR)
    return dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=loss_type, **kw)


@pytest.mark.parametrize("name,kw", CASES)
def test_values_match_independent_formula(name, kw):
    losses, aux = _call(name, kw, PC, PR, RC, RR)
    expected = reference(name, PC, PR, RC, RR, eps=kw.get("label_smoothing", 0.0),
                         free=kw.get("reference_free", False), gamma=kw.get("gamma", 0.5),
                         dpop=kw.get("dpop_lambda", 0.0))
    # float32 against float64 on the same exact inputs; scale: the losses' sensitivity to
    # their inputs (IPO squares h, ORPO's log odds steepen towards 0).
    args = [x.astype(np.float32) for x in (PC, PR, RC, RR)]
    jac = jax.jacfwd(lambda *a: _call(name, kw, *a)[0], argnums=(0, 1, 2, 3))(*args)
    assert_f32_close(losses, expected, **FORMULA, scale=_sensitivity(expected, jac, args))
    assert aux["rewards/accuracy"].shape == (4,)


@pytest.mark.parametrize("name,kw", CASES)
def test_gradients_match_finite_differences(name, kw):
    def total(pc, pr, rc, rr):
        return _call(name, kw, pc, pr, rc, rr)[0].sum()

    args32 = [x.astype(np.float32) for x in (PC, PR, RC, RR)]
    grads = jax.grad(total, argnums=(0, 1, 2, 3))(*args32)
    # float32 gradients against float64 central differences: the float32 bound of the
    # gradient formula (the chain and its derivative: twice as deep), scaled by the
    # gradient's sensitivity to the inputs (the Hessian times the inputs), plus the
    # differences' own float64 error: truncation step^2 |f'''|/6 < 1e-10 and cancellation
    # 2.2e-16 |f| / (2 step) < 1e-9 (|f| < 40 here).
    hess = jax.hessian(total, argnums=(0, 1, 2, 3))(*args32)
    tols = [f32_tolerance(FORMULA["terms"], _sensitivity(grads[i], hess[i], args32),
                          2 * FORMULA["depth"]) + 1e-9 for i in range(4)]
    args = [PC, PR, RC, RR]
    step = 1e-5
    for i in range(4):
        for j in range(4):
            up = [a.copy() for a in args]
            down = [a.copy() for a in args]
            up[i][j] += step
            down[i][j] -= step
            eps = kw.get("label_smoothing", 0.0)
            free = kw.get("reference_free", False)
            dpop = kw.get("dpop_lambda", 0.0)
            fd = (reference(name, *up, eps=eps, free=free, dpop=dpop).sum()
                  - reference(name, *down, eps=eps, free=free, dpop=dpop).sum()) / (2 * step)
            assert abs(float(grads[i][j]) - fd) <= tols[i], (name, i, j, float(grads[i][j]), fd)


def test_policy_equal_to_reference_gives_ln2():
    x = np.array([-5.0, -9.0, -1.0])
    y = np.array([-4.0, -2.0, -8.0])
    losses, aux = dpo_loss(x, y, x, y, beta=0.1)
    # h = (x - x) - (y - y) is exactly 0, so each loss is float32 softplus(0): one exp and
    # one log of exact values, against log 2.
    assert_f32_close(losses, np.full(3, math.log(2.0)), terms=1 + 2 * TRANSCENDENTAL_TERMS)
    # exact by construction: beta (x - x) - beta (y - y) is 0 - 0 in any float arithmetic
    np.testing.assert_array_equal(np.asarray(aux["rewards/margin"]), 0.0)


def test_float_noise_margins_are_ties_not_wins():
    """Policy == reference computed by two programs: the log-probs differ by float noise
    (1e-6 of ~50); those pairs are ties, neither won nor lost. A margin above the
    tolerance (TIE_RTOL x beta x the summed |log-probs|) is a win or a loss."""
    from jalign.losses.dpo import TIE_RTOL
    pc = np.array([-50.0, -50.0, -50.0, -50.0, -50.0], np.float32)
    pr = np.array([-60.0, -60.0, -60.0, -60.0, -60.0], np.float32)
    noise = np.array([1e-6, -1e-6, 3e-6, 0.0, 0.0], np.float32) * 50
    # the fifth pair is clearly preferred: its chosen log-prob rose by 0.1
    rc = pc - noise - np.array([0, 0, 0, 0, 0.1], np.float32)
    _, aux = dpo_loss(pc, pr, rc, pr, beta=0.1)
    np.testing.assert_array_equal(np.asarray(aux["rewards/ties"]), [1, 1, 1, 1, 0])
    np.testing.assert_array_equal(np.asarray(aux["rewards/accuracy"]), [0, 0, 0, 0, 1])
    # the tolerance is relative to the magnitudes: 0.1 x 2^-13 x 220 = 2.7e-3 here
    assert 0.1 * TIE_RTOL * 220 < 0.1 * 0.1
    _, aux = dpo_loss(pc, pr, rc, pr, beta=0.1, tie_rtol=0.0)  # every nonzero margin counts
    np.testing.assert_array_equal(np.asarray(aux["rewards/accuracy"]), [1, 0, 1, 0, 1])
    # SimPO/ORPO: the length-normalised log-probs are the magnitudes
    lengths = np.full(5, 10.0, np.float32)
    zero = np.zeros(5, np.float32)  # no reference
    _, aux = dpo_loss(pc, pc + noise, zero, zero, beta=2.0, loss_type="simpo",
                      chosen_lengths=lengths, rejected_lengths=lengths)
    np.testing.assert_array_equal(np.asarray(aux["rewards/ties"]), [1, 1, 1, 1, 1])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(PC, PR, RC, RR, loss_type="simpo")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, label_smoothing=0.5)
