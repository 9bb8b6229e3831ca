"""A PPO iteration's time split, and rollout sharding ``train`` vs ``replicated``.

Runs ``jalign train configs/demo/ppo_add.gin`` for ``--rollouts`` rollouts (one update
each) per setting in subprocesses, alternating the settings ``--repeats`` times so the
machine's noise hits both, on ``--devices`` host CPU devices with the policy's weights
FSDP-sharded over them (``MeshConfig.fsdp=-1``). Reads each run's metrics and prints the
median seconds per rollout of its parts: sampling (``sample_seconds``: prefill plus the
cached decode loop), rewards (host: decode + the answer checker), the scoring pass (policy,
reference and value forwards, GAE), and the update (``step_seconds``); the first two
rollouts (compilation) are left out.

    .venv/bin/python benchmarks/ppo_rollout.py --devices 2
    .venv/bin/python benchmarks/ppo_rollout.py --devices 1 --settings train

The demo SFT run must exist (``jalign demo --stages sft``); ``--source`` names another.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py (scripts run from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("sample_seconds", "reward_seconds", "score_seconds", "step_seconds")


def run_once(setting: str, args, out_root: Path, index: int) -> list[dict]:
    name = f"{setting}_{index}"
    bindings = [f"TrainConfig.steps={args.rollouts}", f"TrainConfig.save_every={args.rollouts}",
                "TrainConfig.eval_every=0", "TrainConfig.eval_at_start=False",
                "TrainConfig.eval_batches=0", "TrainConfig.progress=False",
                "TrainConfig.log_every=1000", f"TrainConfig.output_root='{out_root}'",
                f"TrainConfig.run_name='{name}'", "MeshConfig.fsdp=-1",
                f"PPOConfig.rollout_sharding='{setting}'",
                f"ModelInit.source='jalign:{args.source}'"]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
    cmd = [sys.executable, "-m", "jalign.cli", "train", "configs/demo/ppo_add.gin"]
    cmd += sum((["--gin", b] for b in bindings), [])
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{setting}: exit {r.returncode}\n{r.stderr[-2000:]}")
    records = [json.loads(line) for line in
               (out_root / name / "metrics.jsonl").read_text().splitlines()]
    return [rec for rec in records if "sample_seconds" in rec][2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--rollouts", type=int, default=14)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--settings", nargs="+", default=["train", "replicated"])
    ap.add_argument("--source", default=str(ROOT / "runs" / "demo" / "sft_add"))
    args = ap.parse_args()
    rows: dict[str, list[dict]] = {s: [] for s in args.settings}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for setting in args.settings:
                rows[setting] += run_once(setting, args, Path(tmp), i)
    print(f"machine: {cpu_model()}; {args.devices} CPU device(s), policy FSDP-sharded over "
          f"them; configs/demo/ppo_add.gin (256 prompts x 8 new tokens per rollout, one "
          f"update); {args.repeats} x {args.rollouts - 2} timed rollouts per setting\n")
    print("| rollout sharding | sample | rewards | scoring pass | update | rollout total |")
    print("|---|---:|---:|---:|---:|---:|")
    for setting, recs in rows.items():
        med = {k: statistics.median(r[k] for r in recs) for k in PARTS}
        print(f"| {setting} | " + " | ".join(f"{med[k]:.3f} s" for k in PARTS)
              + f" | {sum(med.values()):.3f} s |")


if __name__ == "__main__":
    main()
