"""IFT vs SFT on the bundled addition task, from the same under-trained SFT model.

Runs (each a `jalign train` subprocess, then `jalign eval RUN --task add --n 512`):
  start       configs/experiments/sft_add_weak.gin (trained first if its run is missing)
  SFT         configs/experiments/sftseq_add_weak.gin, --steps steps
  IFT         configs/experiments/ift_add_weak.gin, --steps steps
  SFT (=FLOPs) the SFT config for steps * 4/3: IFT's extra no-gradient forward costs a third
              of a train step's FLOPs (Algorithm.flops_per_token), so this is equal compute
for every seed (DataConfig.seed and TrainConfig.seed: other problems, another order), and
prints a table: held-out exact-match accuracy per seed, its mean and spread, the final
held-out NLL of the true next tokens, and the median step time. ``--plot`` writes the
held-out NLL curves against compute (SFT-step units).

    python benchmarks/ift_effect.py --seeds 0 1 2 --plot docs/ift_curves.png
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START = "configs/experiments/sft_add_weak.gin"
SFT = "configs/experiments/sftseq_add_weak.gin"
IFT = "configs/experiments/ift_add_weak.gin"
TOKEN_SFT = "configs/experiments/sftctl_add_weak.gin"
IFT_COST = 4 / 3  # forward + backward (3 units) + one forward (1 unit), in SFT steps


def _jalign(*args, log: Path) -> str:
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "jalign.cli", *args], cwd=ROOT,
                       capture_output=True, text=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(r.stdout + "\n---- stderr\n" + r.stderr)
    if r.returncode:
        raise SystemExit(f"jalign {' '.join(args)} failed ({r.returncode}); see {log}")
    print(f"  jalign {args[0]} {args[1]} ... {time.time() - t0:.0f} s", flush=True)
    return r.stdout


def _accuracy(run_dir: Path, n: int, log: Path) -> float:
    out = _jalign("eval", str(run_dir), "--task", "add", "--n", str(n), log=log)
    m = re.search(r"accuracy[^0-9]*([0-9.]+)%", out) or re.search(r"accuracy\W+([0-9.]+)", out)
    if not m:
        raise SystemExit(f"no accuracy in the output of jalign eval {run_dir}: {out[-500:]}")
    value = float(m.group(1))
    return value / 100 if "%" in m.group(0) else value


def _has_checkpoint(run_dir: Path) -> bool:
    d = run_dir / "checkpoints"
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def _curves(run_dir: Path) -> tuple[list[tuple[int, float]], float]:
    """(held-out NLL per eval step, median train step seconds)."""
    evals, times = {}, []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "eval_nll" in r:
            evals[r["step"]] = r["eval_nll"]  # a re-run re-evaluates the last step
        if "step_seconds" in r and r["step"] > 2:
            times.append(r["step_seconds"])
    return sorted(evals.items()), statistics.median(times) if times else float("nan")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--n", type=int, default=512, help="held-out problems per accuracy")
    ap.add_argument("--runs", default="runs", help="TrainConfig.output_root")
    ap.add_argument("--plot", default=None, help="write the NLL curves (png) here")
    ap.add_argument("--token-sft", action="store_true",
                    help="also SFT with per-token normalisation (jalign's default)")
    ap.add_argument("--ablations", action="store_true",
                    help="also IFT with lam=0 (weights only) and with gamma=0 (mixing only)")
    ap.add_argument("--json", default=None, help="write all results (json) here")
    args = ap.parse_args(argv)
    runs = Path(args.runs) if os.path.isabs(args.runs) else ROOT / args.runs
    logs = runs / "experiments" / "ift_effect" / "logs"
    start_dir = runs / "experiments" / "sft_add_weak"
    root = [f"TrainConfig.output_root='{runs}'", "TrainConfig.progress=False"]
    gins = lambda b: sum((["--gin", x] for x in b), [])  # noqa: E731
    if not _has_checkpoint(start_dir):
        print(f"training the start model ({START})", flush=True)
        _jalign("train", START, *gins(root), log=logs / "start.log")
    start_acc = _accuracy(start_dir, args.n, logs / "start_eval.log")
    print(f"start: {start_dir}: accuracy {start_acc:.1%}", flush=True)

    # (label, run-name slug, config, steps, cost per step in SFT steps, extra bindings)
    methods = [("SFT", "sft", SFT, args.steps, 1.0, []),
               ("IFT", "ift", IFT, args.steps, IFT_COST, []),
               ("SFT (=FLOPs)", "sft", SFT, round(args.steps * IFT_COST), 1.0, [])]
    if args.token_sft:  # jalign's default normalisation, for reference
        methods.append(("SFT (per token)", "sfttok", TOKEN_SFT, args.steps, 1.0,
                        ["TrainConfig.eval_every=50", "TrainConfig.eval_batches=4"]))
    if args.ablations:  # each half of IFT alone
        methods += [("IFT, λ=0 (weights only)", "iftlam0", IFT, args.steps, IFT_COST,
                     ["IFTConfig.lam=0.0"]),
                    ("IFT, γ=0 (mixed inputs only)", "iftgam0", IFT, args.steps, IFT_COST,
                     ["IFTConfig.gamma=0.0"])]
    results = []
    for seed in args.seeds:
        for label, slug, config, steps, cost, extra in methods:
            name = f"experiments/ift_effect/{slug}{steps}_s{seed}"
            run_dir = runs / name
            bindings = root + [f"TrainConfig.run_name='{name}'", f"TrainConfig.steps={steps}",
                               f"TrainConfig.save_every={steps}", f"DataConfig.seed={seed}",
                               f"TrainConfig.seed={seed}",
                               f"ModelInit.source='jalign:{start_dir}'", *extra]
            print(f"{label}, {steps} steps, seed {seed}", flush=True)
            t0 = time.time()
            if (run_dir / "checkpoints" / str(steps)).is_dir():
                print("  finished before: not trained again", flush=True)
            else:
                _jalign("train", config, *gins(bindings), log=logs / f"{run_dir.name}.log")
            wall = time.time() - t0
            acc = _accuracy(run_dir, args.n, logs / f"{run_dir.name}_eval.log")
            evals, step_s = _curves(run_dir)
            results.append(dict(method=label, seed=seed, steps=steps, cost=cost, accuracy=acc,
                                evals=evals, step_seconds=step_s, wall=wall))
            print(f"  accuracy {acc:.1%}, final held-out NLL {evals[-1][1]:.4f}, "
                  f"{step_s * 1000:.0f} ms/step", flush=True)

    print(f"\nstart (under-trained SFT): {start_acc:.1%} held-out accuracy ({args.n} problems)\n")
    print("| method | steps | compute (SFT steps) | accuracy per seed | mean | sd | "
          "final held-out NLL (mean) | median step |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for label, _, _, steps, cost, _ in methods:
        rows = [r for r in results if r["method"] == label]
        accs = [r["accuracy"] for r in rows]
        nll = statistics.mean(r["evals"][-1][1] for r in rows)
        sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        ms = statistics.median(r["step_seconds"] for r in rows) * 1000
        print(f"| {label} | {steps} | {steps * cost:.0f} | "
              f"{', '.join(f'{a:.1%}' for a in accs)} | {statistics.mean(accs):.1%} | "
              f"{sd:.1%} | {nll:.4f} | {ms:.0f} ms |")
    if args.json:
        Path(args.json).write_text(json.dumps({"start_accuracy": start_acc,
                                               "results": results}, indent=1))
    if args.plot:
        _plot(results, args.plot)


def _plot(results, path):
    """Left: held-out NLL against compute (SFT-step units) for the runs that compare at
    equal compute; right: against steps, with the ablations. One line per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"SFT": "tab:blue", "IFT": "tab:red", "SFT (=FLOPs)": "tab:cyan",
              "SFT (per token)": "tab:gray", "IFT, λ=0 (weights only)": "tab:orange",
              "IFT, γ=0 (mixed inputs only)": "tab:purple"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    panels = ((axes[0], ("SFT", "IFT", "SFT (=FLOPs)", "SFT (per token)"), True),
              (axes[1], ("SFT", "IFT", "IFT, λ=0 (weights only)",
                         "IFT, γ=0 (mixed inputs only)"), False))
    for ax, methods, by_compute in panels:
        seen = set()
        for r in results:
            if r["method"] not in methods:
                continue
            xs = [s * (r["cost"] if by_compute else 1) for s, _ in r["evals"]]
            ax.plot(xs, [v for _, v in r["evals"]], color=colors.get(r["method"], "k"),
                    alpha=0.8, marker=".", label=None if r["method"] in seen else r["method"])
            seen.add(r["method"])
        ax.set_xlabel("compute (SFT train steps; an IFT step counts 4/3)" if by_compute
                      else "optimizer steps")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("held-out NLL per answer token (true inputs)")
    fig.suptitle("IFT vs SFT from the under-trained SFT model (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
