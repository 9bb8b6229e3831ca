"""``TrainConfig``: the run's length, cadence, seed and algorithm name.

Its own module so that ``jalign.config`` can register it with gin without importing the
training loop (the loop imports the registry, which must not import the loop back).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_name: str = "run"
    output_root: str = "runs"
    steps: int = 1000
    accum_steps: int = 1
    seed: int = 0
    save_every: int = 500
    keep: int = 3
    async_save: bool = True
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 16  # at most; 0: no evaluation
    eval_at_start: bool = False  # also evaluate the initial model (step 0) of a fresh run
    log_every: int = 10
    nan_policy: str = "abort"
    algorithm: str = "sft"
    peak_flops: float | None = None  # per device; None: spec sheet, or measured on CPU
    progress: bool = True

    def __post_init__(self):
        if self.nan_policy not in ("abort", "skip"):
            raise ValueError(f"TrainConfig.nan_policy={self.nan_policy!r}; 'abort' or 'skip'")
        for name in ("steps", "accum_steps", "save_every", "keep", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.eval_batches < 0 or self.eval_every < 0:
            raise ValueError("TrainConfig.eval_batches and eval_every must be >= 0 "
                             "(eval_batches=0: no evaluation)")
