"""The DPO family of pairwise preference losses, as pure functions of log-probabilities.

Inputs are *summed* log-probabilities of each response, shape [pairs]: the policy's and
the reference's, for the chosen and the rejected response. With h the difference of
log-ratios, h = (pc - rc) - (pr - rr), and beta the temperature:

- ``sigmoid`` (DPO; Rafailov et al. 2023, "Direct Preference Optimization"):
  -log sigmoid(beta h). ``label_smoothing`` e gives conservative DPO (Mitchell 2023):
  -(1-e) log sigmoid(beta h) - e log sigmoid(-beta h).
- ``ipo`` (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
  Human Preferences"): (h - 1/(2 beta))^2. The paper's h uses log-probabilities averaged
  over response tokens and TRL follows it; others sum. Here h uses the summed inputs,
  unless ``chosen_lengths``/``rejected_lengths`` are given, then the averages.
- ``hinge`` (SLiC; Zhao et al. 2023, "SLiC-HF"): max(0, 1 - beta h).
- ``robust`` (Chowdhury et al. 2024, "Provably Robust DPO"): unbiased under label flips
  with rate e: [(1-e) (-log sigmoid(beta h)) - e (-log sigmoid(-beta h))] / (1 - 2e).
- ``reference_free=True``: rc = rr = 0 in any of the above.
- ``simpo`` (Meng et al. 2024, "SimPO"): no reference, length-normalised:
  -log sigmoid(beta (pc/|yc| - pr/|yr|) - gamma). Needs the lengths.
- ``orpo`` (Hong et al. 2024, "ORPO"): the odds-ratio term only,
  -beta log sigmoid(log odds(pc/|yc|) - log odds(pr/|yr|)), log odds(l) = l - log(1 - e^l);
  the caller adds the SFT loss of the chosen response. Needs the lengths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")


def _lengths(x, name):
    if x is None:
        raise ValueError(f"{name} is required for this loss_type (length normalisation)")
    return jnp.maximum(jnp.asarray(x, jnp.float32), 1.0)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             *, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             reference_free: bool = False, gamma: float = 0.5, chosen_lengths=None,
             rejected_lengths=None):
    """(per-pair losses [pairs], aux dict of per-pair metrics). See the module docstring."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}; one of {LOSS_TYPES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    pc = jnp.asarray(policy_chosen_logps, jnp.float32)
    pr = jnp.asarray(policy_rejected_logps, jnp.float32)
    rc = jnp.zeros_like(pc) if reference_free else jnp.asarray(ref_chosen_logps, jnp.float32)
    rr = jnp.zeros_like(pr) if reference_free else jnp.asarray(ref_rejected_logps, jnp.float32)
    chosen_reward = beta * (pc - rc)
    rejected_reward = beta * (pr - rr)
    h = (pc - rc) - (pr - rr)
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - e) * jax.nn.log_sigmoid(beta * h) - e * jax.nn.log_sigmoid(-beta * h)
    elif loss_type == "robust":
        losses = ((1 - e) * -jax.nn.log_sigmoid(beta * h)
                  - e * -jax.nn.log_sigmoid(-beta * h)) / (1 - 2 * e)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * h)
    elif loss_type == "ipo":
        if chosen_lengths is not None or rejected_lengths is not None:
            lc = _lengths(chosen_lengths, "chosen_lengths")
            lr = _lengths(rejected_lengths, "rejected_lengths")
            h = (pc - rc) / lc - (pr - rr) / lr
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        lc = _lengths(chosen_lengths, "chosen_lengths")
        lr = _lengths(rejected_lengths, "rejected_lengths")
        avg_c, avg_r = pc / lc, pr / lr
        if loss_type == "simpo":
            losses = -jax.nn.log_sigmoid(beta * (avg_c - avg_r) - gamma)
            chosen_reward, rejected_reward = beta * avg_c, beta * avg_r
        else:  # orpo; log(1 - e^l) computed stably for l < 0
            def log_odds(l):
                return l - jnp.log(-jnp.expm1(jnp.minimum(l, -1e-6)))
            ratio = log_odds(avg_c) - log_odds(avg_r)
            losses = -beta * jax.nn.log_sigmoid(ratio)
            chosen_reward, rejected_reward = beta * avg_c, beta * avg_r
    aux = {
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/accuracy": (chosen_reward > rejected_reward).astype(jnp.float32),
        "rewards/margin": chosen_reward - rejected_reward,
        "logps/chosen": pc,
        "logps/rejected": pr,
        # How far the policy moved from the reference (a sampled KL-style statistic).
        "kl/chosen": pc - rc,
        "kl/rejected": pr - rr,
    }
    return losses, aux
