"""What a run reports: FLOP counts and MFU, JSONL + TensorBoard logs, the loss-curve PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax

# Declared dense peak FLOP/s per device, by device_kind substring (bf16 for accelerators):
# MFU is comparable between runs only against a fixed peak, never one timed at each start
# (a loaded machine reads low). TrainConfig.peak_flops overrides it.
KNOWN_PEAKS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
               "TPU v6": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
# A CPU core's declared float32 peak: FLOPs per cycle by vector ISA (two FMA units of
# 16, 8 or 4 lanes, 2 FLOPs each) at a declared 2.5 GHz: the ISA is read, the clock (which
# turbo and load move) is not.
CPU_FLOPS_PER_CYCLE = {"avx512f": 64, "avx2": 32, "sse2": 16}
CPU_DECLARED_HZ = 2.5e9


def train_flops_per_token(config, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 x matmul parameters (the LM head included,
    the embedding lookup not) + attention scores and values, 12 x layers x q-width x T."""
    d, f, h = config.hidden_size, config.intermediate_size, config.resolved_head_dim
    nq, nkv, layers = config.num_heads, config.num_kv_heads, config.num_layers
    per_layer = d * h * (nq + 2 * nkv) + nq * h * d + 3 * d * f
    matmul_params = layers * per_layer + config.vocab_size * d
    return 6.0 * matmul_params + 12.0 * layers * nq * h * seq_len


def cpu_peak_per_core() -> tuple[float, str]:
    """(declared float32 FLOP/s of one core, the ISA it assumes) from /proc/cpuinfo."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith(("flags", "Features"))), [])
    except OSError:
        flags = []
    isa = next((k for k in CPU_FLOPS_PER_CYCLE if k in flags), "sse2")
    return CPU_FLOPS_PER_CYCLE[isa] * CPU_DECLARED_HZ, isa


def peak_flops_per_device(configured: float | None) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where it comes from): configured, else the declared
    table (a CPU device: its cores' declared peak)."""
    if configured:
        return configured, "configured"
    kind = jax.devices()[0].device_kind
    for name, peak in KNOWN_PEAKS.items():
        if name in kind:
            return peak, f"declared ({kind})"
    if jax.default_backend() == "cpu":
        import os
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        per_core, isa = cpu_peak_per_core()
        # The devices share the process's cores (the forced host device count splits them).
        return (per_core * cores / len(jax.devices()),
                f"declared CPU float32: {cores} cores x {isa} at {CPU_DECLARED_HZ / 1e9:g} GHz")
    return None, f"unknown device {kind!r} (set TrainConfig.peak_flops)"


# What the console shows of a step (and of the latest evaluation), in this order: the
# progress bar's postfix, or a line per logged step without it.
CONSOLE_METRICS = (("loss", "loss", "{:.4f}"), ("rewards/accuracy", "acc", "{:.3f}"),
                   ("rewards/ties", "ties", "{:.2f}"), ("accuracy", "acc", "{:.3f}"),
                   ("reward", "reward", "{:.3f}"), ("kl", "kl", "{:.3g}"),
                   ("eval_loss", "eval_loss", "{:.4f}"),
                   ("eval_rewards/accuracy", "eval_acc", "{:.3f}"),
                   ("eval_accuracy", "eval_acc", "{:.3f}"),
                   ("eval_reward", "eval_reward", "{:.3f}"), ("mfu", "mfu", "{:.1%}"))


def console_fields(*records: dict) -> dict:
    """{label: text} of the CONSOLE_METRICS the records hold (the first record holding a
    key gives it)."""
    out = {}
    for key, label, fmt in CONSOLE_METRICS:
        for record in records:
            if record and key in record and label not in out:
                out[label] = fmt.format(record[key])
                break
    return out


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
