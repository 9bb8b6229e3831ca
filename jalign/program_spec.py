"""``ProgramSpec``: a jitted program of a run and what ``jalign plan`` compiles it on (kept
apart from ``jalign.plan`` so that a recipe can describe its programs without importing
the planner)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class ProgramSpec:
    """A jitted program of a run and what to compile it on: abstract arguments laid out on
    the target's mesh, and for the roofline its analytic FLOPs per chip and unit of work
    (``unit``: a step, a rollout, a decode step; the program runs ``units`` of them)."""

    fn: object
    args: tuple
    flops: float
    unit: str = "step"
    units: int = 1
    read_bytes: float | None = None  # HBM bytes per chip and unit; None: arguments + outputs
