"""Memory readings shared by the LoRA memory workers (standard library only: the workers
run in different virtual environments)."""

from __future__ import annotations

import re
import resource


def peak_rss() -> int:
    """The process's peak resident memory in bytes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def status(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak since the last reset) in bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024


def reset_peak() -> None:
    """Restart VmHWM from the current RSS (Linux: write 5 to clear_refs), so the peak of
    the train steps is told apart from the peak of building the model."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
