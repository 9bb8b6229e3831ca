"""Supervised fine-tuning loss: next-token cross-entropy on trainable targets only.

The vocabulary projection and softmax are computed chunk by chunk over tokens, in
float32, each chunk rematerialised in the backward pass: the full [batch, length, vocab]
logits (2 GB in fp32 for 4 x 1024 tokens of a 128k vocabulary) never exist at once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jalign.losses import sequences
from jalign.losses.types import LossOutput

DEFAULT_CHUNK_TOKENS = 2048


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """SFT loss settings (gin: ``SFTConfig.normalize = 'sequences'``).

    ``normalize``: ``tokens`` (default): the mean over every trainable token of the batch,
    so long responses weigh more; ``sequences``: the mean over sequences of each one's mean
    token loss (the IFT paper's SFT baseline; IFT's default), packed segments counted as
    sequences."""

    normalize: str = "tokens"
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def __post_init__(self):
        if self.normalize not in sequences.NORMALIZATIONS:
            raise ValueError(f"SFTConfig.normalize={self.normalize!r}; one of "
                             f"{sequences.NORMALIZATIONS}")
        if self.chunk_tokens <= 0:
            raise ValueError(f"SFTConfig.chunk_tokens must be positive, got {self.chunk_tokens}")


def token_log_probs(logits_btv, targets_bt):
    """log p(target) per position from full logits, computed in float32."""
    logits = logits_btv.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _logits(h_nd, w_dv):
    # Accumulate in float32 even when computing in bf16: the softmax needs the precision.
    return jnp.dot(h_nd, w_dv, preferred_element_type=jnp.float32)


def map_token_chunks(fn, hidden_nd, targets_n, chunk: int, *, remat: bool = False):
    """``fn(hidden [c, D], targets [c]) -> pytree of [c]`` applied ``chunk`` tokens at a
    time over N tokens (the last chunk padded), results [N]: a vocabulary projection per
    chunk, so the [N, vocab] logits never exist at once. ``remat``: recompute each chunk in
    the backward pass instead of storing its logits."""
    n, d = hidden_nd.shape
    if n <= chunk:
        return fn(hidden_nd, targets_n)
    pad = (-n) % chunk
    hidden = jnp.pad(hidden_nd, ((0, pad), (0, 0))).reshape(-1, chunk, d)
    targets = jnp.pad(targets_n, (0, pad)).reshape(-1, chunk)
    one = lambda args: fn(*args)  # noqa: E731
    out = jax.lax.map(jax.checkpoint(one) if remat else one, (hidden, targets))
    return jax.tree.map(lambda x: x.reshape(-1)[:n], out)


def chunked_log_probs(hidden_nd, w_dv, targets_n, chunk: int = DEFAULT_CHUNK_TOKENS):
    """log p(target) for N tokens of hidden states, ``chunk`` tokens of logits at a time."""
    def one(h_cd, t_c):
        return token_log_probs(_logits(h_cd, w_dv)[None], t_c[None])[0]

    return map_token_chunks(one, hidden_nd, targets_n, chunk, remat=True)


def next_token_log_probs(model, hidden_btd, ids_bt, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
    """log p(token t+1 | hidden state t) [B, T-1] from the backbone's hidden states."""
    b, t, d = hidden_btd.shape
    w_dv = model.lm_head_weight().astype(hidden_btd.dtype)
    logp = chunked_log_probs(hidden_btd[:, :-1].reshape(-1, d), w_dv,
                             ids_bt[:, 1:].reshape(-1), chunk_tokens)
    return logp.reshape(b, t - 1)


def target_log_probs(model, ids_bt, mask_bt, segment_ids_bt=None, positions_bt=None,
                     chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
    """(log p of each next token [B, T-1], its target mask [B, T-1] in float32).

    Position t predicts token t+1; the mask of token t+1 says whether it is a target.
    """
    hidden_btd = model.backbone(ids_bt, positions_bt, segment_ids_bt)
    return (next_token_log_probs(model, hidden_btd, ids_bt, chunk_tokens),
            mask_bt[:, 1:].astype(jnp.float32))


def sft_loss(model, batch, ctx=None, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
             normalize: str = "tokens") -> LossOutput:
    """Sum of -log p over targets where ``loss_mask`` is 1; weight = number of targets
    (``normalize='sequences'``: each sequence's mean, weight = number of sequences).

    Position t predicts token t+1; the mask of token t+1 says whether it is a target.
    Packed rows are safe: the first token of every segment has mask 0, so no target is
    predicted from the previous segment. ``aux["nll"]`` is always the per-token mean.
    """
    seg = batch.get("segment_ids")
    logp, mask = target_log_probs(model, batch["input_ids"], batch["loss_mask"],
                                  seg, batch.get("positions"), chunk_tokens)
    nll = (-jnp.sum(logp * mask), jnp.sum(mask))
    if normalize == "tokens":
        return LossOutput(*nll, {"nll": nll})
    total, weight = sequences.reduce(-logp, mask, None if seg is None else seg[:, 1:],
                                     normalize=normalize)
    return LossOutput(total, weight, {"nll": nll})
