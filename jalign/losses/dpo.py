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
- ``dpop_lambda`` l > 0 (DPO-Positive; Pal et al. 2024, "Smaug: Fixing Failure Modes of
  Preference Optimisation with DPO-Positive"): h - l max(0, rc - pc) in place of h, for
  every loss_type that uses h. With chosen and rejected a few tokens apart (one wrong digit)
  plain DPO can lower the chosen log-prob too; the penalty stops that.
- ``simpo`` (Meng et al. 2024, "SimPO"): no reference, length-normalised:
  -log sigmoid(beta (pc/|yc| - pr/|yr|) - gamma). Needs the lengths.
- ``orpo`` (Hong et al. 2024, "ORPO"): the odds-ratio term only,
  -beta log sigmoid(log odds(pc/|yc|) - log odds(pr/|yr|)), log odds(l) = l - log(1 - e^l);
  the caller adds the SFT loss of the chosen response. Needs the lengths.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jalign.losses.sft import target_log_probs
from jalign.losses.types import LossOutput

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")
# A pair is won (rewards/accuracy) only when its reward margin exceeds this fraction of
# the magnitudes it was computed from (beta x the summed |log-probs| differenced): two
# float32 programs (policy and reference, or two batch layouts) agree on a summed log-prob
# to about 1e-6 of its size, so at the start, where the policy is the reference, margins
# of that size are noise, not preference. 2^-13 (~1.2e-4) leaves a factor of ~100 over
# that noise; smaller margins are counted as rewards/ties.
TIE_RTOL = 2.0 ** -13


def _lengths(x, name):
    if x is None:
        raise ValueError(f"{name} is required for this loss_type (length normalisation)")
    return jnp.maximum(jnp.asarray(x, jnp.float32), 1.0)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             *, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             reference_free: bool = False, gamma: float = 0.5, chosen_lengths=None,
             rejected_lengths=None, dpop_lambda: float = 0.0, tie_rtol: float = TIE_RTOL):
    """(per-pair losses [pairs], aux dict of per-pair metrics). See the module docstring;
    ``tie_rtol``: see TIE_RTOL."""
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
    # DPO-Positive: the chosen falling below the reference is penalised in h (summed
    # log-probs; IPO's averaged h below gets the averaged penalty).
    penalty = dpop_lambda * jax.nn.relu(rc - pc) if dpop_lambda else 0.0
    h = h - penalty
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
            h = (pc - rc) / lc - (pr - rr) / lr - penalty / lc
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
    if loss_type in ("simpo", "orpo"):
        magnitude = beta * (jnp.abs(avg_c) + jnp.abs(avg_r))
    else:
        magnitude = beta * (jnp.abs(pc) + jnp.abs(rc) + jnp.abs(pr) + jnp.abs(rr))
    margin = chosen_reward - rejected_reward
    tie = jnp.abs(margin) <= tie_rtol * magnitude
    aux = {
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/accuracy": ((margin > 0) & ~tie).astype(jnp.float32),
        "rewards/ties": tie.astype(jnp.float32),
        "rewards/margin": margin,
        "logps/chosen": pc,
        "logps/rejected": pr,
        # How far the policy moved from the reference (a sampled KL-style statistic).
        "kl/chosen": pc - rc,
        "kl/rejected": pr - rr,
    }
    return losses, aux


# ------------------------------------------------------------------ the training loss

REFERENCE_MODES = ("in_step", "precomputed")
SPANS = ("response", "to_first_difference")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """The DPO-family loss of a training run (gin: ``DPOConfig.beta = 0.05``).

    ``reference``: ``in_step`` keeps a frozen copy of the initial policy in the train
    state and runs its forward inside the jitted step; ``precomputed`` runs it once over
    the dataset before training and stores each pair's reference log-probs with the data
    (halves model memory; same loss). ``sft_weight`` adds that multiple of the chosen
    response's per-token NLL to each pair's loss (ORPO's SFT term; also RPO-style DPO).
    ``ipo_average``: IPO on log-probs averaged over response tokens (the IPO paper, TRL)
    instead of summed.
    ``span``: ``response`` scores each whole response; ``to_first_difference`` scores both
    responses only up to and including the first token where they differ (Step-DPO; Lai
    et al. 2024, "Step-DPO", with one token as the step). The shared prefix cancels in h
    either way; what the option drops is everything after the fork, where the two sides
    condition on different prefixes. At the fork both sides see the same context, so the
    logit gradient of h is exactly e_chosen - e_rejected there: probability moves from the
    wrong token to the right one and nowhere else, while pushing down a wrong answer's
    later tokens spreads probability over unrelated tokens (docs/preference.md).
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference_free: bool = False
    gamma: float = 0.5
    ipo_average: bool = False
    dpop_lambda: float = 0.0
    sft_weight: float = 0.0
    reference: str = "in_step"
    span: str = "response"
    chunk_tokens: int = 2048
    tie_rtol: float = TIE_RTOL  # margins within this of their magnitude are ties

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"DPOConfig.loss_type={self.loss_type!r}; one of {LOSS_TYPES}")
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"DPOConfig.reference={self.reference!r}; one of {REFERENCE_MODES}")
        if self.span not in SPANS:
            raise ValueError(f"DPOConfig.span={self.span!r}; one of {SPANS}")
        if self.dpop_lambda < 0 or (self.dpop_lambda and self.loss_type in ("simpo", "orpo")):
            raise ValueError(f"DPOConfig.dpop_lambda={self.dpop_lambda}: must be >= 0, and 0 "
                             "for simpo/orpo (no reference to stay above)")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPOConfig.label_smoothing must be in [0, 0.5), got "
                             f"{self.label_smoothing}")
        if self.sft_weight < 0 or self.chunk_tokens <= 0:
            raise ValueError(f"DPOConfig: sft_weight must be >= 0 and chunk_tokens > 0, got "
                             f"{self.sft_weight}, {self.chunk_tokens}")
        if self.beta <= 0:
            raise ValueError(f"DPOConfig.beta must be positive, got {self.beta}")
        if not 0 <= self.tie_rtol < 1:
            raise ValueError(f"DPOConfig.tie_rtol must be in [0, 1), got {self.tie_rtol}")

    @property
    def needs_reference(self) -> bool:
        return not self.reference_free and self.loss_type not in ("simpo", "orpo")


def response_logps(model, ids_bt, mask_bt, segment_ids_bt, positions_bt=None,
                   chunk_tokens: int = 2048):
    """(summed log p of each row's response tokens [B], response lengths [B]).

    Token t+1 is a response token when ``mask_bt[t+1]`` is 1; it is predicted at t.
    """
    logp, mask = target_log_probs(model, ids_bt, mask_bt, segment_ids_bt, positions_bt,
                                  chunk_tokens)
    return jnp.sum(logp * mask, axis=1), jnp.sum(mask, axis=1)


def to_first_difference(batch: dict) -> dict:
    """The pair batch with both loss masks cut after the first response token where the
    chosen and rejected rows differ (token or mask), that token included. The two rows
    share the prompt and are right-padded, so response token t sits at index t in both.
    Identical responses keep their whole masks (h = 0 either way). A side whose response
    starts with unscored context tokens (a prompt end tokenized differently for the two
    replies, see tokenize_preference) forks only once both sides score."""
    c_ids, r_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
    c_m, r_m = batch["chosen_loss_mask"], batch["rejected_loss_mask"]
    t = c_ids.shape[1]
    idx_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), c_ids.shape)
    started_bt = (jnp.cumsum(c_m, axis=1) > 0) & (jnp.cumsum(r_m, axis=1) > 0)
    fork_bt = (((c_ids != r_ids) & (c_m > 0) & (r_m > 0))
               | ((c_m != r_m) & started_bt))
    first_b = jnp.min(jnp.where(fork_bt, idx_bt, t), axis=1)
    keep_bt = (idx_bt <= first_b[:, None]).astype(c_m.dtype)
    return {**batch, "chosen_loss_mask": c_m * keep_bt, "rejected_loss_mask": r_m * keep_bt}


def scored_span(batch: dict, span: str) -> dict:
    """The pair batch with its loss masks covering what ``span`` scores."""
    if span == "to_first_difference":
        return to_first_difference(batch)
    if span != "response":
        raise ValueError(f"span={span!r}; one of {SPANS}")
    return batch


def pair_logps(model, batch: dict, chunk_tokens: int = 2048):
    """Chosen and rejected rows scored in ONE forward over 2N rows (the pair's two sides
    see identical weights and numerics; one matmul shape instead of two).
    Returns (chosen logps [N], rejected logps [N], chosen lengths, rejected lengths)."""
    n = batch["chosen_input_ids"].shape[0]

    def both(key):
        return jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])

    positions = both("positions") if "chosen_positions" in batch else None
    logps, lengths = response_logps(model, both("input_ids"), both("loss_mask"),
                                    both("segment_ids"), positions, chunk_tokens)
    return logps[:n], logps[n:], lengths[:n], lengths[n:]


def make_dpo_loss(config: DPOConfig):
    """``loss_fn(model, batch, ctx=None, reference=None) -> LossOutput``: weight = pairs.

    The reference log-probs come from the ``reference`` model (in_step) or from the
    batch's ``ref_chosen_logps``/``ref_rejected_logps`` (precomputed)."""

    def loss_fn(model, batch, ctx=None, reference=None) -> LossOutput:
        batch = scored_span(batch, config.span)  # once, for policy and reference alike
        pc, pr, lc, lr = pair_logps(model, batch, config.chunk_tokens)
        if not config.needs_reference:
            rc = rr = jnp.zeros_like(pc)
        elif config.reference == "precomputed":
            if "ref_chosen_logps" not in batch:
                raise ValueError("DPOConfig.reference='precomputed' but the batch has no "
                                 "ref_chosen_logps (the data was not annotated)")
            rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            if reference is None:
                raise ValueError("DPOConfig.reference='in_step' needs the frozen reference "
                                 "model")
            rc, rr, _, _ = pair_logps(reference, batch, config.chunk_tokens)
            rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
        use_lengths = config.loss_type in ("simpo", "orpo") or (
            config.loss_type == "ipo" and config.ipo_average)
        losses, aux = dpo_loss(pc, pr, rc, rr, beta=config.beta, loss_type=config.loss_type,
                               label_smoothing=config.label_smoothing,
                               reference_free=config.reference_free, gamma=config.gamma,
                               dpop_lambda=config.dpop_lambda, tie_rtol=config.tie_rtol,
                               chosen_lengths=lc if use_lengths else None,
                               rejected_lengths=lr if use_lengths else None)
        n = jnp.asarray(pc.shape[0], jnp.float32)
        out_aux = {name: (jnp.sum(v), n) for name, v in aux.items()}
        out_aux["pair_loss"] = (jnp.sum(losses), n)
        if config.sft_weight:
            nll = -pc / jnp.maximum(lc, 1.0)  # per-token NLL of each chosen response
            losses = losses + config.sft_weight * nll
            out_aux["nll/chosen"] = (jnp.sum(nll), n)
        return LossOutput(jnp.sum(losses), n, out_aux)

    return loss_fn


def reference_scores(model, batch: dict, chunk_tokens: int = 2048,
                     span: str = "response") -> dict:
    """Per-pair fields a precomputed-reference pass stores with the data."""
    rc, rr, _, _ = pair_logps(model, scored_span(batch, span), chunk_tokens)
    return {"ref_chosen_logps": rc, "ref_rejected_logps": rr}
