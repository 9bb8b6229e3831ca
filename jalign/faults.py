"""Fault injection for the robustness tests (and for users checking their own setup), from
``JALIGN_FAULT``: comma-separated ``kind:step`` entries, ``kind:step@P`` for process P
only. ``sigkill_after_save:4`` kills the process with SIGKILL once step 4's checkpoint is
committed; ``sigkill_during_save:8`` right after step 8's async save starts;
``sigterm_at_step:6`` sends this process SIGTERM after step 6; ``nan_at_step:N`` makes
step N's loss non-finite; ``disk_full_at_save:N`` makes step N's checkpoint fail as a full
file system does (tensorstore's own error)."""

from __future__ import annotations

import os

FAULT_ENV = "JALIGN_FAULT"


def fault(kind: str, step: int) -> bool:
    """Whether ``JALIGN_FAULT`` asks for ``kind`` at ``step`` here."""
    import jax
    spec = os.environ.get(FAULT_ENV, "")
    here = f"{kind}:{step}"
    return any(part == here or part == f"{here}@{jax.process_index()}"
               for part in spec.split(","))
