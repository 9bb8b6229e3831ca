"""What a run reports: FLOP counts and MFU, JSONL + TensorBoard logs, the loss-curve PNG."""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# Dense peak FLOP/s per device by device_kind substring (bf16 unless noted).
KNOWN_PEAKS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
               "TPU v6": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def train_flops_per_token(config, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 x matmul parameters (the LM head included,
    the embedding lookup not) + attention scores and values, 12 x layers x q-width x T."""
    d, f, h = config.hidden_size, config.intermediate_size, config.resolved_head_dim
    nq, nkv, layers = config.num_heads, config.num_kv_heads, config.num_layers
    per_layer = d * h * (nq + 2 * nkv) + nq * h * d + 3 * d * f
    matmul_params = layers * per_layer + config.vocab_size * d
    return 6.0 * matmul_params + 12.0 * layers * nq * h * seq_len


@functools.lru_cache(maxsize=None)  # once per process: it takes about a second on CPU
def measure_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a jitted float32 n x n matmul on the default device (for CPU MFU)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / float(np.median(times))


def peak_flops_per_device(configured: float | None) -> tuple[float | None, str]:
    if configured:
        return configured, "configured"
    kind = jax.devices()[0].device_kind
    for name, peak in KNOWN_PEAKS.items():
        if name in kind:
            return peak, f"spec sheet ({kind})"
    if jax.default_backend() == "cpu":
        # One CPU device spans all cores; measure what one matmul reaches here.
        return measure_matmul_peak() / len(jax.devices()), "measured fp32 matmul"
    return None, f"unknown device {kind!r}"


class MetricsWriter:
    """Per-step metrics to ``metrics.jsonl`` (the record of the run) and TensorBoard."""

    def __init__(self, run_dir: Path, *, resume_step: int, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        if enabled and self.path.exists():
            # Drop what a killed run logged past its last checkpoint: those steps rerun.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a") if enabled else None
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def plot_loss_curve(metrics_path: Path, out_path: Path) -> Path | None:
    """Train (and eval) loss against step, from metrics.jsonl."""
    if not metrics_path.exists():
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = [], []
    for line in metrics_path.read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            train.append((r["step"], r["loss"]))
        if "eval_loss" in r:
            evals.append((r["step"], r["eval_loss"]))
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
