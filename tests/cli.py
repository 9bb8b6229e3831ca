"""Running `jalign` as a user does (a subprocess), and checking how it fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_TORCH = Path(__file__).resolve().parent / "no_torch"  # its sitecustomize hides torch

# XLA flags of every test process. The suite's programs are tiny and run a few steps, so
# compiling dominates: LLVM's backend at -O0 compiles them ~30% faster (their results are
# compared within float32 bounds or against runs with the same flags, never across).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def env(devices: int | None = None, **extra) -> dict:
    """The test environment for a `jalign` subprocess: CPU, the suite's compilation cache
    (conftest.py puts it in os.environ), ``devices`` simulated host devices (None: one, as
    a user's single-host run)."""
    e = dict(os.environ, JAX_PLATFORMS="cpu", **{k: str(v) for k, v in extra.items()})
    e["PYTHONPATH"] = os.pathsep.join([str(NO_TORCH), str(ROOT)] + (
        [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    e["XLA_FLAGS"] = TEST_XLA_FLAGS + (
        f" --xla_force_host_platform_device_count={devices}" if devices else "")
    return e


def run_jalign(*args, devices: int | None = None, cwd=ROOT, timeout: int = 600,
               **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jalign.cli", *map(str, args)],
                          capture_output=True, text=True, env=env(devices, **extra_env),
                          cwd=cwd, timeout=timeout)


def assert_clean_error(r: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """The command failed with ``code`` and one `jalign ...: error: ...` line naming every
    needle, and no traceback. Returns that line."""
    assert r.returncode == code, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, r.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def run_losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} of a run's metrics.jsonl."""
    import json
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out
