"""DPO-family losses against independent numpy formulas, plus finite-difference gradients."""

import math

import jax
import numpy as np
import pytest

from jalign.losses.dpo import dpo_loss

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
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=1e-5, atol=1e-6)
    assert aux["rewards/accuracy"].shape == (4,)


@pytest.mark.parametrize("name,kw", CASES)
def test_gradients_match_finite_differences(name, kw):
    def total(pc, pr, rc, rr):
        return _call(name, kw, pc, pr, rc, rr)[0].sum()

    grads = jax.grad(total, argnums=(0, 1, 2, 3))(*(x.astype(np.float32) for x in (PC, PR, RC, RR)))
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
            assert abs(float(grads[i][j]) - fd) <= 1e-3 * max(1.0, abs(fd)), (name, i, j)


def test_policy_equal_to_reference_gives_ln2():
    x = np.array([-5.0, -9.0, -1.0])
    y = np.array([-4.0, -2.0, -8.0])
    losses, aux = dpo_loss(x, y, x, y, beta=0.1)
    np.testing.assert_allclose(np.asarray(losses), math.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(aux["rewards/margin"]), 0.0, atol=1e-7)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(PC, PR, RC, RR, loss_type="simpo")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, label_smoothing=0.5)
