"""Plot RL runs' curves (PPO and the GRPO family) from their metrics logs: rollout
reward, KL to the reference (runs that have one), and held-out exact-match accuracy
(greedy) by rollout and by training time, one line per run.

    python benchmarks/ppo_curves.py runs/experiments/ppo_add runs/experiments/ppo_add_rm \
        --out docs/ppo_curves.png

Prints each run's held-out accuracy at the start, end and best, its rollout reward
(first and last 10 rollouts), its KL over the last 10 rollouts and its final KL
coefficient (n/a without a reference), and its training time (the sum of its steps'
``step_seconds``: sampling, scoring and updates; evaluations not included), as a markdown
table.
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


def training_minutes(run_dir: Path) -> dict[int, float]:
    """step -> minutes of training up to it (the sum of step_seconds); step 0 -> 0."""
    out, total = {0: 0.0}, 0.0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "step_seconds" in r:
            total += r["step_seconds"]
            out[r["step"]] = total / 60
    return out


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
    panels = [("reward", "rollout reward (mean score)"), ("kl", "KL to reference (nats/seq)")]
    print("| run | rollouts | accuracy start | accuracy end | best | reward first 10 -> last 10 "
          "| KL last 10 | KL coef end | training minutes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in args.runs:
        rollouts, evals = read(run)
        x = np.array([r["rollout"] for r in rollouts])
        for ax, (key, title) in zip(axes.flat, panels):
            if not all(key in r for r in rollouts):
                continue  # e.g. no KL without a reference model
            y = np.array([r[key] for r in rollouts])
            k = max(1, min(args.smooth, len(y)))
            smooth = np.convolve(y, np.ones(k) / k, mode="valid")
            ax.plot(x[k - 1:], smooth, label=run.name)
            ax.set_title(title)
            ax.set_xlabel("rollout")
        steps_per_rollout = rollouts[1]["step"] - rollouts[0]["step"] if len(rollouts) > 1 else 1
        acc = [(e["step"] / steps_per_rollout, accuracy(e)) for e in evals
               if accuracy(e) is not None]
        minutes = training_minutes(run)
        if acc:
            axes.flat[2].plot(*zip(*acc), marker="o", label=run.name)
            axes.flat[3].plot([minutes.get(round(r * steps_per_rollout), 0.0) for r, _ in acc],
                              [a for _, a in acc], marker="o", label=run.name)
        rewards = [r["reward"] for r in rollouts]
        has_kl = all("kl" in r for r in rollouts)
        kl = f"{np.mean([r['kl'] for r in rollouts][-10:]):.2f}" if has_kl else "n/a"
        coef = f"{rollouts[-1]['kl_coef']:.4f}" if has_kl else "n/a"
        print(f"| {run.name} | {len(rollouts)} | {acc[0][1]:.1%} | {acc[-1][1]:.1%} | "
              f"{max(a for _, a in acc):.1%} | {np.mean(rewards[:10]):.3f} -> "
              f"{np.mean(rewards[-10:]):.3f} | {kl} | {coef} | {max(minutes.values()):.1f} |")
    axes.flat[2].set_title("held-out exact-match accuracy (greedy)")
    axes.flat[2].set_xlabel("rollout")
    axes.flat[3].set_title("held-out exact-match accuracy by training time")
    axes.flat[3].set_xlabel("minutes (sampling, scoring, updates)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
