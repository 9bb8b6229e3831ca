"""What the console shows of a run: the progress bar's fields, and a declared MFU peak."""

import os

import jax

from jalign.train import metrics as M


def test_console_shows_eval_accuracy_rewards_and_mfu():
    step = {"loss": 0.69, "rewards/accuracy": 0.25, "rewards/ties": 0.5, "mfu": 0.123,
            "grad_norm": 1.0}
    last_eval = {"step": 4, "eval_loss": 0.71, "eval_rewards/accuracy": 0.5}
    fields = M.console_fields(step, last_eval)
    assert fields == {"loss": "0.6900", "acc": "0.250", "ties": "0.50",
                      "eval_loss": "0.7100", "eval_acc": "0.500", "mfu": "12.3%"}
    rl = M.console_fields({"loss": 0.1, "reward": 0.75, "kl": 0.002}, {"eval_reward": 0.8})
    assert rl == {"loss": "0.1000", "reward": "0.750", "kl": "0.002", "eval_reward": "0.800"}
    rm = M.console_fields({"loss": 0.6, "accuracy": 0.75}, {"eval_accuracy": 0.625})
    assert rm["acc"] == "0.750" and rm["eval_acc"] == "0.625"


def test_the_cpu_peak_is_declared_not_timed():
    """MFU's denominator: the same on every call (never a matmul timed under load), from
    the declared per-core table and the cores this process may use; configured wins."""
    per_core, isa = M.cpu_peak_per_core()
    assert per_core == M.CPU_FLOPS_PER_CYCLE[isa] * M.CPU_DECLARED_HZ
    peak, where = M.peak_flops_per_device(None)
    cores = len(os.sched_getaffinity(0))
    assert peak == per_core * cores / len(jax.devices())
    assert where.startswith("declared CPU float32") and isa in where
    assert M.peak_flops_per_device(None) == (peak, where)
    assert M.peak_flops_per_device(3e12) == (3e12, "configured")
    assert not hasattr(M, "measure_matmul_peak")
