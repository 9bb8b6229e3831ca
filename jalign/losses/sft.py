"""Supervised fine-tuning loss: next-token cross-entropy on trainable targets only.

The vocabulary projection and softmax are computed chunk by chunk over tokens, in
float32, each chunk rematerialised in the backward pass: the full [batch, length, vocab]
logits (2 GB in fp32 for 4 x 1024 tokens of a 128k vocabulary) never exist at once.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jalign.losses import sequences
from jalign.losses.types import LossOutput
from jalign.sharding import constrain

DEFAULT_CHUNK_TOKENS = 2048
# Bytes per vocabulary entry of one token that a log-prob's backward keeps: its float32
# logit and softmax probability (the backward's own float32 gradient of the logits comes
# on top while it runs: the budget bounds what is kept, not the peak).
LOGITS_KEPT_PER_VOCAB = 8


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


def _batch_shards(rows: int) -> int:
    """How many ways the active mesh splits ``rows`` batch rows (1 without a mesh)."""
    from jalign.sharding import active_mesh, logical_to_spec
    active = active_mesh()
    if active is None:
        return 1
    mesh, rules = active
    axes = logical_to_spec(("batch",), (rows,), mesh, rules)[0] if rows else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


# With remat asked for, a device's tokens still run as one chunk, their logits kept for
# the backward, where those come to at most this: recomputing them costs a third more of
# the head's FLOPs (the GRPO benchmark's loss and gradient, 4096 completion tokens of an
# 8192 vocabulary: 5.93 -> 5.78 s, docs/benchmarks.md). A 128k vocabulary's kept logits
# reach it at 256 tokens, below the default chunk.
KEEP_LOGITS_BYTES = 256 * 2**20


def map_token_chunks(fn, hidden_btd, targets_bt, chunk: int, *, remat: bool = False,
                     kept_bytes_per_token: int | None = None):
    """``fn(hidden [c, D], targets [c]) -> pytree of [c]`` over [B, T] tokens (or [N] of a
    2-D ``hidden``), about ``chunk`` tokens of each device's rows at a time; results [B, T]
    (or [N]): a vocabulary projection per chunk, so the [tokens, vocab] logits never exist
    at once. A device's tokens that fit one chunk run as one, their logits kept for the
    backward. ``remat``: recompute each of several chunks in the backward pass instead of
    storing its logits, unless the device's tokens times ``kept_bytes_per_token`` (what the
    backward keeps of a token's projection) fit ``KEEP_LOGITS_BYTES``: then they too run
    as one chunk, kept.

    Chunks run along each row's tokens (all rows at once), so every device projects its
    own rows of a batch sharded over the mesh: chunking the flattened batch instead makes
    every device run every chunk of the global batch (measured on TPU: the head's partial
    logits all-reduced, ~1 TiB per step and chip for 8B on 256 chips)."""
    flat = hidden_btd.ndim == 2  # tokens of no known rows: chunked as they lie
    if flat:
        hidden_btd, targets_bt = hidden_btd[None], targets_bt[None]
    b, t, d = hidden_btd.shape
    local = 1 if flat else max(1, b // _batch_shards(b))  # rows on each device
    kept = (kept_bytes_per_token is not None
            and local * t * kept_bytes_per_token <= KEEP_LOGITS_BYTES)
    if local * t <= chunk or (remat and kept):
        out = fn(hidden_btd.reshape(-1, d), targets_bt.reshape(-1))
        return jax.tree.map(lambda x: x.reshape(t) if flat else x.reshape(b, t), out)
    n = -(-t // max(1, chunk // local))     # chunks per row
    c = -(-t // n)                          # tokens of each row per chunk (padding < n)
    pad = n * c - t
    hidden = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, d)
    targets = jnp.pad(targets_bt, ((0, 0), (0, pad))).reshape(b, n, c)
    hidden, targets = hidden.transpose(1, 0, 2, 3), targets.transpose(1, 0, 2)
    if not flat:
        hidden = constrain(hidden, (None, "batch", None, None))
        targets = constrain(targets, (None, "batch", None))

    def one(args):
        h, tg = args
        return fn(h.reshape(-1, d), tg.reshape(-1))

    out = jax.lax.map(jax.checkpoint(one) if remat else one, (hidden, targets))
    # [chunks, B * c] -> [B, chunks * c] -> [B, T]
    out = jax.tree.map(lambda x: x.reshape(n, b, c).transpose(1, 0, 2).reshape(b, -1)[:, :t],
                       out)
    return jax.tree.map(lambda x: x[0], out) if flat else out


def chunked_log_probs(hidden_btd, w_dv, targets_bt, chunk: int = DEFAULT_CHUNK_TOKENS):
    """log p(target) for [B, T] (or [N]) hidden states, ``chunk`` tokens of logits at a
    time per device."""
    def one(h_cd, t_c):
        return token_log_probs(_logits(h_cd, w_dv)[None], t_c[None])[0]

    return map_token_chunks(one, hidden_btd, targets_bt, chunk, remat=True,
                            kept_bytes_per_token=LOGITS_KEPT_PER_VOCAB * w_dv.shape[-1])


def next_token_log_probs(model, hidden_btd, ids_bt, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
    """log p(token t+1 | hidden state t) [B, T-1] from the backbone's hidden states."""
    w_dv = model.lm_head_weight().astype(hidden_btd.dtype)
    return chunked_log_probs(hidden_btd[:, :-1], w_dv, ids_bt[:, 1:], chunk_tokens)


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
