"""Which parameters a run trains, and the frozen base the rest of the model reads.

Full fine-tuning trains every parameter: ``TrainState.params`` is the whole model. With
LoRA the state splits the model in two: ``params`` holds only what trains (the adapters,
and a reward/value model's score head) — so the optimizer keeps moments for those alone,
gradients are taken for those alone and checkpoints store those alone — and
``TrainState.base`` holds the frozen rest (plain or quantised weights), rebuilt from the
run's source on restore instead of saved.

The frozen reference policy of DPO and PPO is then the base itself read without
adapters: no second copy of the model. PPO's value model keeps its own adapters and
score head on the policy's base (``LoraConfig.value_base='shared'``: one base in memory)
or on a base of its own (``'own'``).
"""

from __future__ import annotations

import dataclasses

from flax import traverse_util

from jalign.models.config import LlamaConfig
from jalign.models.lora import is_adapter

SCORE = "score"
# A policy_value model's parts, and the parameters a scalar head's backbone shares with a
# causal LM of the same architecture (everything but the LM head).
POLICY, VALUE, BACKBONE, LM_HEAD = "policy", "value", "backbone", "lm_head"


def is_trained(path: tuple) -> bool:
    """With adapters: an adapter or a score head (a fresh head has nothing to adapt)."""
    return is_adapter(str(path[-1])) or path[-1] == SCORE


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """How a run's model maps onto ``TrainState.params`` / ``base`` / ``frozen``.

    ``config``: the trained model's config (``config.lora`` set when adapters train).
    ``frozen_names``: the frozen models the algorithm reads (a DPO/PPO reference); with
    adapters each is the base with adapters off, otherwise a copy in ``state.frozen``."""

    config: LlamaConfig
    model_kind: str = "causal_lm"
    frozen_names: tuple[str, ...] = ()

    @property
    def adapters(self) -> bool:
        return self.config.lora is not None and self.config.lora.enabled

    @property
    def shared_value_base(self) -> bool:
        return (self.adapters and self.model_kind == "policy_value"
                and self.config.lora.value_base == "shared")

    @property
    def reference_config(self) -> LlamaConfig:
        """The frozen reference's config: the base without adapters."""
        if not self.adapters:
            return self.config
        return self.config.replace(lora=self.config.lora.adapters_off())

    def split(self, params: dict) -> tuple[dict, dict | None]:
        """(trained, base) nested dicts of a full parameter tree; base None when all train."""
        if not self.adapters:
            return params, None
        flat = traverse_util.flatten_dict(params)
        trained = {k: v for k, v in flat.items() if is_trained(k)}
        base = {k: v for k, v in flat.items() if not is_trained(k)
                and not (self.shared_value_base and k[:2] == (VALUE, BACKBONE))}
        return traverse_util.unflatten_dict(trained), traverse_util.unflatten_dict(base)

    def base_entries(self, base: dict | None) -> dict:
        """{full-tree path: array} of the frozen base (the shared value backbone's entries
        pointing at the policy's arrays)."""
        if base is None:
            return {}
        flat = traverse_util.flatten_dict(base)
        if self.shared_value_base:
            flat.update({(VALUE, BACKBONE, *k[1:]): v for k, v in list(flat.items())
                         if k[0] == POLICY and k[1] != LM_HEAD})
        return flat

    def join(self, trained: dict, base: dict | None) -> dict:
        """The full parameter tree (what ``nnx.merge`` with the model's graphdef takes)."""
        if base is None:
            return trained
        flat = self.base_entries(base)
        flat.update(traverse_util.flatten_dict(trained))
        return traverse_util.unflatten_dict(flat)

    def reference_params(self, base: dict) -> dict:
        """The base's causal LM (a policy_value model's policy part): the adapters-off
        reference."""
        return base[POLICY] if self.model_kind == "policy_value" else base

    def frozen_params(self, state) -> dict:
        """name -> params of each frozen model, for the step and the rollout source."""
        if not self.frozen_names:
            return {}
        if self.adapters:
            ref = self.reference_params(state.base)
            return {name: ref for name in self.frozen_names}
        return {name: state.frozen[name] for name in self.frozen_names}

    def full_params(self, state) -> dict:
        return self.join(state.params, state.base)
