"""What a model outputs: its head. ``lm``: next-token logits (the family's causal LM);
``scalar``: one score per sequence (reward and value models).

The scalar head's layout matches transformers' ``*ForSequenceClassification`` with
``num_labels=1``: the backbone (``model.*``) plus ``score.weight`` of shape [1, hidden], no
bias, applied to the final-norm hidden state. A sequence's score is read at its last real
token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jalign.models.families import family_of

LM, SCALAR = "lm", "scalar"
HEADS = (LM, SCALAR)
LM_HEAD_PARAM = "lm_head"   # a causal LM's untied output projection
SCORE_PARAM = "score"       # a scalar head's score vector
BACKBONE = "backbone"       # where a scalar head keeps the causal LM's backbone


def check_head(head: str) -> str:
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; one of {HEADS}")
    return head


def last_token_index(segment_ids_bt):
    """Index of the last real (segment id > 0) token of each right-padded row."""
    t = segment_ids_bt.shape[1]
    idx_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids_bt.shape)
    return jnp.max(jnp.where(segment_ids_bt > 0, idx_bt, 0), axis=1)


def _init_score(key, config):
    # Small init: a fresh head starts near score 0 for every sequence.
    d = config.hidden_size
    return jax.random.normal(key, (d,), config.weight_dtype) * (0.1 * d ** -0.5)


class ScalarHeadModel(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs):
        self.config = config
        self.backbone = family_of(config).lm_class(config, rngs=rngs, lm_head=False)
        self.score = nnx.Param(_init_score(rngs.params(), config), logical_axes=("embed",))

    def __call__(self, input_ids, positions=None, segment_ids=None):
        """Scores at every position, [batch, length], float32."""
        hidden_btd = self.backbone.backbone(input_ids, positions, segment_ids)
        return jnp.einsum("btd,d->bt", hidden_btd.astype(jnp.float32),
                          self.score[...].astype(jnp.float32))

    def sequence_scores(self, input_ids, segment_ids, positions=None):
        """One score per right-padded row, read at its last real token: [batch]."""
        scores_bt = self(input_ids, positions, segment_ids)
        last = last_token_index(segment_ids)
        return jnp.take_along_axis(scores_bt, last[:, None], axis=1)[:, 0]


def model_class(head: str, config):
    """The NNX class of a model with ``head`` in ``config``'s family."""
    return family_of(config).lm_class if check_head(head) == LM else ScalarHeadModel


def head_of(model) -> str:
    """The head of a jalign model instance."""
    if isinstance(model, ScalarHeadModel):
        return SCALAR
    if isinstance(model, family_of(model.config).lm_class):
        return LM
    raise TypeError(f"{type(model).__name__} is not a jalign model class")


def fresh_score(config, seed: int = 0) -> jax.Array:
    """A newly initialised score vector [hidden], as ScalarHeadModel would make it."""
    return _init_score(jax.random.key(seed), config)


def lm_backbone(lm_params: dict) -> dict:
    """The part of a scalar head's tree a causal LM of the same architecture provides:
    ``{"backbone": <everything but the LM head>}``."""
    return {BACKBONE: {k: v for k, v in lm_params.items() if k != LM_HEAD_PARAM}}


def scalar_params_from_lm(lm_params: dict, score) -> dict:
    """ScalarHeadModel params (pure dict) from a causal LM's: the LM head is dropped (a
    reward model starting from an SFT or HF policy), ``score`` fills the new head."""
    return {**lm_backbone(lm_params), SCORE_PARAM: score}
