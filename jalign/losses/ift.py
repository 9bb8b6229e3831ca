"""Intuitive Fine-Tuning (IFT; Hua et al. 2024, "Intuitive Fine-Tuning: Towards
Simplifying Alignment into a Single Process", arXiv 2405.11870): SFT data only, no
reference model, one extra forward pass without gradient.

Per batch:
1. Pass 1 (no gradient) on the ground-truth tokens x: the greedy prediction
   x̂_t = argmax p(. | x_<t) (float32 logits), placed at position t (position 0 keeps x_0).
2. x'_t = x̂_t where token t is a trainable target, else x_t.
3. Temporal residual connection: e_t = (1 - λ) E[x_t] + λ E[x'_t], E the input embedding
   table. As in the reference implementation, E is read without gradient (its frozen copy
   there is refreshed after every optimizer step, i.e. equal to the live table);
   ``IFTConfig.embedding_gradient=True`` lets the gradient flow into E through both terms.
4. Pass 2 (with gradient) on e: ℓ_t = -log p(x_{t+1} | e_<=t) at trainable targets (m_t).
5. Relation-propagation weights per sequence: N = Σ m_t, c_t = m_t ℓ_t / N,
   W_t = m_t Σ_{j>=t} γ^(j-t) c_j, w_t = W_t N / Σ_s W_s (mean 1 over the N targets);
   γ = 0 gives w ≡ 1. Gradients flow through w unless ``stop_gradient_weights``.
6. Loss = mean over sequences of Σ_t w_t ℓ_t / N (``normalize='sequences'``, the paper's),
   or Σ w ℓ over all targets of the batch / their number (``normalize='tokens'``, jalign's
   SFT default). λ = 0 and γ = 0 give the SFT loss with the same normalisation exactly,
   and SFT's gradients with ``embedding_gradient=True`` (by default the input table gets
   none through the lookup; an untied table then gets none at all).

Where jalign departs from the reference implementation, on purpose:
- with gradient accumulation the reference averages the micro-batches' means; jalign sums
  over all sequences of the step and divides once (accumulated == full batch exactly,
  also when packed micro-batches hold different numbers of sequences);
- λ's linear warmup has its own length (``lam_warmup_steps``; the reference reuses the
  learning rate's warmup), and evaluation uses λ without jitter (the reference jitters
  evaluation too);
- the weights of a sequence whose losses are all 0 are 0, not 0/0.

Worked example (tests/losses/test_ift.py checks it independently): ℓ = [1, 2, 0.5, 3],
m = [1, 1, 1, 0], γ = 0.95: N = 3, c = [1/3, 2/3, 1/6, 0], W = [1.1170833, 0.825,
0.1666667, 0], Σ W = 2.1087500, w = [1.5892116, 1.1736811, 0.2371073, 0],
loss = Σ w ℓ / N = 1.3517091.

Packed rows: the sums and the reverse scan restart at every segment (N is per segment).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jalign.losses import sequences
from jalign.losses.sft import (DEFAULT_CHUNK_TOKENS, _logits, map_token_chunks,
                                next_token_log_probs, token_log_probs)
from jalign.losses.types import LossOutput

LAMBDA_SCHEDULES = ("constant", "linear")


@dataclasses.dataclass(frozen=True)
class IFTConfig:
    """IFT settings (gin: ``IFTConfig.gamma = 0.95``); defaults are the reference's.

    ``lam``: the residual mix λ (the reference's max_lambda). ``lam_schedule='linear'``
    goes from ``lam_min`` to ``lam`` over ``lam_warmup_steps`` optimizer steps, then stays.
    ``lam_jitter`` > 0: each step's λ is multiplied by (1 + lam_jitter z), z ~ N(0, 1)
    drawn per optimizer step from ``lam_jitter_seed`` (the reference's lambda_disturb with
    disturb_std), then clipped to [0, 1]; evaluation uses λ without jitter. The jitter
    depends only on the step and ``lam_jitter_seed`` (not on TrainConfig.seed): runs that
    differ in their seed share the λ sequence unless this differs too."""

    lam: float = 0.2
    gamma: float = 0.95
    lam_schedule: str = "constant"
    lam_min: float = 0.0
    lam_warmup_steps: int = 0
    lam_jitter: float = 0.0
    lam_jitter_seed: int = 0
    stop_gradient_weights: bool = False
    embedding_gradient: bool = False
    normalize: str = "sequences"
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def __post_init__(self):
        for name in ("lam", "lam_min", "gamma"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"IFTConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.lam_schedule not in LAMBDA_SCHEDULES:
            raise ValueError(f"IFTConfig.lam_schedule={self.lam_schedule!r}; one of "
                             f"{LAMBDA_SCHEDULES}")
        if self.lam_schedule == "linear" and self.lam_warmup_steps <= 0:
            raise ValueError("IFTConfig.lam_warmup_steps must be > 0 with lam_schedule='linear'")
        if self.lam_jitter < 0:
            raise ValueError(f"IFTConfig.lam_jitter must be >= 0, got {self.lam_jitter}")
        if self.normalize not in sequences.NORMALIZATIONS:
            raise ValueError(f"IFTConfig.normalize={self.normalize!r}; one of "
                             f"{sequences.NORMALIZATIONS}")
        if self.chunk_tokens <= 0:
            raise ValueError(f"IFTConfig.chunk_tokens must be positive, got {self.chunk_tokens}")

    @property
    def weight_name(self) -> str:
        return "sequences" if self.normalize == "sequences" else "target_tokens"


def residual_lambda(config: IFTConfig, step, *, train: bool = True) -> jax.Array:
    """λ at optimizer step ``step`` (0 for the first step), float32."""
    lam = jnp.float32(config.lam)
    if config.lam_schedule == "linear":
        frac = jnp.minimum(jnp.asarray(step, jnp.float32) / config.lam_warmup_steps, 1.0)
        lam = config.lam_min + (config.lam - config.lam_min) * frac
    if config.lam_jitter and train:
        key = jax.random.fold_in(jax.random.key(config.lam_jitter_seed), step)
        lam = lam * (1.0 + config.lam_jitter * jax.random.normal(key, (), jnp.float32))
    return jnp.clip(lam, 0.0, 1.0)


def _float(x):
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def discounted_reverse_cumsum(c_bt, gamma: float, run_bt) -> jax.Array:
    """W_t = Σ_{j>=t, same segment} γ^(j-t) c_j, restarting at every segment boundary.

    A linear recurrence W_t = c_t + a_t W_{t+1} (a_t = γ inside a segment, 0 at its last
    position), solved with an associative scan over the reversed row: O(log T) depth."""
    same_next = jnp.concatenate([run_bt[:, 1:] == run_bt[:, :-1],
                                 jnp.zeros_like(run_bt[:, :1], bool)], 1)
    a = jnp.where(same_next, jnp.asarray(gamma, c_bt.dtype), 0.0)

    def combine(earlier, later):  # on the reversed row: apply `earlier`, then `later`
        a1, b1 = earlier
        a2, b2 = later
        return a1 * a2, b2 + a2 * b1

    # Reversed (s = T-1-t): W'_s = c'_s + a'_s W'_{s-1}, a prefix composition of the
    # affine maps x -> c'_s + a'_s x, and a'_0 = a_{T-1} = 0 starts it from zero.
    _, w_rev = jax.lax.associative_scan(combine, (jnp.flip(a, 1), jnp.flip(c_bt, 1)), axis=1)
    return jnp.flip(w_rev, 1)


def ift_weights(token_losses, mask, *, gamma: float, segment_ids=None,
                stop_gradient: bool = False) -> jax.Array:
    """Relation-propagation weights w [batch, length], averaging 1 over each sequence's
    trainable tokens (0 elsewhere). ``token_losses``, ``mask`` and ``segment_ids`` are
    aligned [batch, length] (position t: the loss of the token it predicts)."""
    losses = _float(token_losses)
    m = jnp.asarray(mask).astype(losses.dtype)
    if gamma == 0:
        return m
    if stop_gradient:
        losses = jax.lax.stop_gradient(losses)
    run = sequences.runs(segment_ids, m.shape)
    n_t = sequences.run_sums(m, run)
    c = m * losses / jnp.maximum(n_t, 1.0)
    big_w = discounted_reverse_cumsum(c, gamma, run) * m
    total = sequences.run_sums(big_w, run)
    ok = (total > 0) & (m > 0)
    # Double where: no NaN gradient from the branch not taken.
    return jnp.where(ok, big_w * n_t / jnp.where(ok, total, 1.0), 0.0)


def ift_reduce(token_losses, mask, *, gamma: float, segment_ids=None,
               stop_gradient: bool = False, normalize: str = "sequences"):
    """(total, weight) of the IFT loss from token losses: Σ_t w_t ℓ_t reduced by
    ``sequences.reduce`` (per sequence by default). Its mean is the IFT loss."""
    losses = _float(token_losses)
    w = ift_weights(losses, mask, gamma=gamma, segment_ids=segment_ids,
                    stop_gradient=stop_gradient)
    return sequences.reduce(w * losses, mask, segment_ids, normalize=normalize)


def greedy_and_log_probs(hidden_btd, w_dv, targets_bt, chunk: int = DEFAULT_CHUNK_TOKENS):
    """(argmax [B, T], log p(target) [B, T]) of the float32 logits of [B, T] hidden states,
    ``chunk`` tokens at a time (the logits of all tokens never exist at once). No gradient."""
    def one(h_cd, t_c):
        z = _logits(h_cd, w_dv)
        return jnp.argmax(z, axis=-1).astype(jnp.int32), token_log_probs(z[None], t_c[None])[0]

    return map_token_chunks(one, hidden_btd, targets_bt, chunk)


def mixed_inputs(model, ids_bt, mask_bt, lam, *, positions_bt=None, segment_ids_bt=None,
                 embedding_gradient: bool = False, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
    """Steps 1-3: (the residual-mixed input embeddings [B, T, D] in float32, the tokens x'
    [B, T] they mix in, pass 1's log p of the true next tokens [B, T-1])."""
    sg = jax.lax.stop_gradient
    hidden = sg(model.backbone(ids_bt, positions_bt, segment_ids_bt))
    w_dv = sg(model.lm_head_weight()).astype(hidden.dtype)
    pred, logp_true = greedy_and_log_probs(hidden[:, :-1], w_dv, ids_bt[:, 1:], chunk_tokens)
    x_hat = jnp.concatenate([ids_bt[:, :1], pred], axis=1)
    x_mix = jnp.where(mask_bt > 0, x_hat, ids_bt)
    table = model.embedding_table()
    table = table if embedding_gradient else sg(table)
    embed = jnp.take(table, ids_bt, axis=0).astype(jnp.float32)
    embed_mix = jnp.take(table, x_mix, axis=0).astype(jnp.float32)
    return (1.0 - lam) * embed + lam * embed_mix, x_mix, logp_true


def make_ift_loss(config: IFTConfig):
    """``loss_fn(model, batch, ctx) -> LossOutput`` on conversation batches.

    aux: ``nll`` the per-token NLL of the true next tokens given the true inputs (pass 1:
    what SFT's ``nll`` measures, so eval perplexities compare), ``nll_mixed`` that of
    pass 2 (on the mixed inputs), ``lambda`` the λ used, ``replaced`` the fraction of
    targets whose greedy token differs from x."""

    def loss_fn(model, batch, ctx=None) -> LossOutput:
        ids, mask_tok = batch["input_ids"], batch["loss_mask"]
        seg, pos = batch.get("segment_ids"), batch.get("positions")
        step = 0 if ctx is None else ctx.step
        lam = residual_lambda(config, step, train=ctx is None or ctx.train)
        embeds, x_mix, logp_true = mixed_inputs(model, ids, mask_tok, lam, positions_bt=pos,
                                     segment_ids_bt=seg,
                                     embedding_gradient=config.embedding_gradient,
                                     chunk_tokens=config.chunk_tokens)
        hidden = model.backbone(positions=pos, segment_ids=seg, inputs_embeds=embeds)
        logp = next_token_log_probs(model, hidden, ids, config.chunk_tokens)
        mask = mask_tok[:, 1:].astype(jnp.float32)
        total, weight = ift_reduce(-logp, mask, gamma=config.gamma,
                                   segment_ids=None if seg is None else seg[:, 1:],
                                   stop_gradient=config.stop_gradient_weights,
                                   normalize=config.normalize)
        n_targets = jnp.sum(mask)
        replaced = jnp.sum((x_mix[:, 1:] != ids[:, 1:]) * mask)
        aux = {"nll": (-jnp.sum(logp_true * mask), n_targets),
               "nll_mixed": (-jnp.sum(logp * mask), n_targets),
               "lambda": (lam, jnp.float32(1.0)),
               "replaced": (replaced.astype(jnp.float32), n_targets)}
        return LossOutput(total, weight, aux)

    return loss_fn
