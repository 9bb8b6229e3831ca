"""A scalar head on the Llama backbone: reward models and value models.

The layout matches transformers' ``LlamaForSequenceClassification`` with ``num_labels=1``:
the backbone (``model.*``) plus ``score.weight`` of shape [1, hidden], no bias, applied to
the final-norm hidden state. A sequence's score is read at its last real token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jalign.models.config import LlamaConfig
from jalign.models.llama import Llama


def last_token_index(segment_ids_bt):
    """Index of the last real (segment id > 0) token of each right-padded row."""
    t = segment_ids_bt.shape[1]
    idx_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids_bt.shape)
    return jnp.max(jnp.where(segment_ids_bt > 0, idx_bt, 0), axis=1)


def _init_score(key, config: LlamaConfig):
    # Small init: a fresh head starts near score 0 for every sequence.
    d = config.hidden_size
    return jax.random.normal(key, (d,), config.weight_dtype) * (0.1 * d ** -0.5)


class ScalarHeadModel(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.backbone = Llama(config, rngs=rngs, lm_head=False)
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


class PolicyValueModel(nnx.Module):
    """A policy and a separate value model trained together (PPO): one parameter tree
    ``{"policy": <causal LM>, "value": <scalar head>}``, so the generic train step updates
    both with one optimizer. The value model has the policy's architecture and its own
    backbone (initialised from the policy or from a reward model, by config)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.policy = Llama(config, rngs=rngs)
        self.value = ScalarHeadModel(config, rngs=rngs)


# ------------------------------------------------------------------ model kinds

# What a checkpoint holds, recorded in its metadata so loaders build the right class.
MODEL_KINDS = {"causal_lm": Llama, "scalar_head": ScalarHeadModel,
               "policy_value": PolicyValueModel}
# The part of a policy_value model each single-model kind is read from (loading a PPO
# run's checkpoint as a causal LM gives its policy).
PARTS = {"causal_lm": "policy", "scalar_head": "value"}


def model_class(kind: str):
    try:
        return MODEL_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r}; one of {sorted(MODEL_KINDS)}") from None


def kind_of(model) -> str:
    for kind, cls in MODEL_KINDS.items():
        if type(model) is cls:
            return kind
    raise TypeError(f"{type(model).__name__} is not a jalign model class")


def fresh_score(config: LlamaConfig, seed: int = 0) -> jax.Array:
    """A newly initialised score vector [hidden], as ScalarHeadModel would make it."""
    return _init_score(jax.random.key(seed), config)


def scalar_params_from_lm(lm_params: dict, score) -> dict:
    """ScalarHeadModel params (pure dict) from a causal LM's: the LM head is dropped (a
    reward model starting from an SFT or HF policy), ``score`` fills the new head."""
    return {"backbone": {k: v for k, v in lm_params.items() if k != "lm_head"}, "score": score}
