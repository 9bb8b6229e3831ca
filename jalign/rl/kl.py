"""KL to the reference policy: per-token estimators, controllers for its coefficient, and
the KL as a per-token reward penalty.

The per-token estimators (k1, k2, k3) are ``jalign.losses.kl``.

Controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"):
``FixedKLController(coef)`` keeps its value; ``AdaptiveKLController(init_coef, target,
horizon)`` moves it toward a target KL: e = clip(current_kl / target − 1, −0.2, 0.2),
coef ← coef · (1 + e · n_steps / horizon). Both are plain Python state with
``get_state``/``set_state`` so that a run's checkpoint restores them exactly.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jalign.losses.kl import ESTIMATORS, kl_per_token  # noqa: F401 (re-exported)


def penalized_rewards(scores, logp, ref_logp, mask, *, coef, kind: str = "k1"):
    """Per-token rewards [batch, length]: −coef · KL_t on every unmasked token, plus each
    row's score [batch] on its last unmasked token (0 at masked positions)."""
    m = jnp.asarray(mask) > 0
    kl = jnp.where(m, kl_per_token(logp, ref_logp, kind), 0.0)
    length = m.shape[1]
    idx = jnp.arange(length)
    last = jnp.max(jnp.where(m, idx, -1), axis=1)  # -1: no response token
    at_last = (idx[None, :] == last[:, None]) & m
    return jnp.where(at_last, jnp.asarray(scores, jnp.float32)[:, None], 0.0) - coef * kl


class FixedKLController:
    def __init__(self, coef: float):
        if coef < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def get_state(self) -> dict:
        return {"value": self.value}

    def set_state(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    def __init__(self, init_coef: float, target: float, horizon: int):
        if init_coef <= 0 or target <= 0 or horizon <= 0:
            # (a coefficient of 0 could never move: the update multiplies it)
            raise ValueError(f"AdaptiveKLController(init_coef={init_coef}, target={target}, "
                             f"horizon={horizon}): need init_coef > 0, target > 0, horizon > 0")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        if not math.isfinite(current_kl):
            raise ValueError(f"AdaptiveKLController.update: the KL is {current_kl}; the "
                             "coefficient is left at its value")
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def get_state(self) -> dict:
        return {"value": self.value}

    def set_state(self, state: dict) -> None:
        self.value = float(state["value"])
