"""Plot PPO runs' curves from their metrics logs: rollout reward, KL to the reference, KL
coefficient, and held-out exact-match accuracy (greedy), one line per run.

    python benchmarks/ppo_curves.py runs/experiments/ppo_add runs/experiments/ppo_add_rm \
        --out docs/ppo_curves.png

Prints each run's held-out accuracy at the start, end and best, its rollout reward
(first and last 10 rollouts), its KL over the last 10 rollouts and its final KL
coefficient, as a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rollouts, evals = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "eval_reward" in r:
            evals.append(r)
        elif "rollout" in r:
            rollouts.append(r)
    if not rollouts:
        raise SystemExit(f"{run_dir}: no rollout records in metrics.jsonl (not a PPO run?)")
    return rollouts, evals


def accuracy(r: dict) -> float | None:
    return r.get("eval_reward_task")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("ppo_curves.png"))
    ap.add_argument("--smooth", type=int, default=10, help="rollouts per moving average")
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [("reward", "rollout reward (mean score)"), ("kl", "KL to reference (nats/seq)"),
              ("kl_coef", "KL coefficient")]
    print("| run | rollouts | accuracy start | accuracy end | best | reward first 10 -> last 10 "
          "| KL last 10 | KL coef end |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for run in args.runs:
        rollouts, evals = read(run)
        x = np.array([r["rollout"] for r in rollouts])
        for ax, (key, title) in zip(axes.flat, panels):
            y = np.array([r[key] for r in rollouts])
            k = max(1, min(args.smooth, len(y)))
            smooth = np.convolve(y, np.ones(k) / k, mode="valid")
            ax.plot(x[k - 1:], smooth, label=run.name)
            ax.set_title(title)
            ax.set_xlabel("rollout")
        steps_per_rollout = rollouts[1]["step"] - rollouts[0]["step"] if len(rollouts) > 1 else 1
        acc = [(e["step"] / steps_per_rollout, accuracy(e)) for e in evals
               if accuracy(e) is not None]
        if acc:
            axes.flat[3].plot(*zip(*acc), marker="o", label=run.name)
        rewards = [r["reward"] for r in rollouts]
        kls = [r["kl"] for r in rollouts]
        print(f"| {run.name} | {len(rollouts)} | {acc[0][1]:.1%} | {acc[-1][1]:.1%} | "
              f"{max(a for _, a in acc):.1%} | {np.mean(rewards[:10]):.3f} -> "
              f"{np.mean(rewards[-10:]):.3f} | {np.mean(kls[-10:]):.2f} | "
              f"{rollouts[-1]['kl_coef']:.4f} |")
    axes.flat[3].set_title("held-out exact-match accuracy (greedy)")
    axes.flat[3].set_xlabel("rollout")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
