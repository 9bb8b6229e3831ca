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


class ScalarHeadModel(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.backbone = Llama(config, rngs=rngs, lm_head=False)
        d = config.hidden_size
        # Small init: a fresh head starts near score 0 for every sequence.
        self.score = nnx.Param(jax.random.normal(rngs.params(), (d,), config.weight_dtype)
                               * (0.1 * d ** -0.5), logical_axes=("embed",))

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
