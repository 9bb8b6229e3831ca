"""What each ``TrainConfig.algorithm`` trains: its loss, its model, its data and its
reference model. The loop reads these fields and never imports a loss itself."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from jalign.losses import dpo, rm, sft


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    loss_fn: Callable                  # (model, batch, ctx) -> LossOutput
    model_kind: str = "causal_lm"      # the trained model: causal_lm or scalar_head
    data_kind: str = "conversation"    # what DataConfig.format must produce
    # A frozen copy of the initial policy: "in_step" (in the train state, run inside the
    # jitted step), "precomputed" (one pass before training, stored with the data) or None.
    reference: str | None = None
    reference_scores: Callable | None = None  # (model, batch) -> {field: [pairs]}
    config: object | None = None  # the algorithm's config dataclass (compared on resume)

    @property
    def rows_per_example(self) -> int:
        """Sequences per batch entry (a preference pair is two)."""
        return 2 if self.data_kind == "preference" else 1

    @property
    def frozen_models(self) -> tuple[str, ...]:
        """Names of the frozen models the train state carries (copies of the initial model)."""
        return (dpo.REFERENCE_NAME,) if self.reference == "in_step" else ()

    @property
    def weight_name(self) -> str:
        """What the loss weight counts (the metrics' name for it)."""
        return "target_tokens" if self.data_kind == "conversation" else "pairs"

    def flops_per_token(self, model_config, seq_len: int) -> float:
        """Training FLOPs per row token, for MFU: forward + backward of the trained model,
        plus a forward (a third of that) per frozen model run in the step."""
        from jalign.train.metrics import train_flops_per_token
        return train_flops_per_token(model_config, seq_len) * (1 + len(self.frozen_models) / 3)


def custom(loss_fn: Callable) -> Algorithm:
    """A plain loss function on conversation data (tests, user code)."""
    return Algorithm(getattr(loss_fn, "__name__", "custom"), loss_fn)


def sft_algorithm() -> Algorithm:
    return Algorithm("sft", sft.sft_loss)


def rm_algorithm(config: rm.RMConfig) -> Algorithm:
    return Algorithm("rm", functools.partial(rm.rm_loss, center_coef=config.center_coef),
                     model_kind="scalar_head", data_kind="preference", config=config)


def dpo_algorithm(config: dpo.DPOConfig) -> Algorithm:
    reference = config.reference if config.needs_reference else None
    scores = (functools.partial(dpo.reference_scores, chunk_tokens=config.chunk_tokens,
                                span=config.span)
              if reference == "precomputed" else None)
    # The name keys the precomputed-reference cache, so it names the span scored.
    name = f"dpo/{config.loss_type}" + ("" if config.span == "response" else f"/{config.span}")
    return Algorithm(name, dpo.make_dpo_loss(config), data_kind="preference",
                     reference=reference, reference_scores=scores, config=config)


NAMES = ("sft", "rm", "dpo")


def from_gin(name: str) -> Algorithm:
    """The algorithm ``name`` with its loss settings read from the parsed gin config."""
    from jalign import config as jconfig

    if name == "sft":
        return sft_algorithm()
    if name == "rm":
        return rm_algorithm(jconfig.build("RMConfig"))
    if name == "dpo":
        return dpo_algorithm(jconfig.build("DPOConfig"))
    raise jconfig.ConfigError(f"TrainConfig.algorithm={name!r}; one of {NAMES} "
                              "(SimPO and ORPO are DPOConfig.loss_type values)")
