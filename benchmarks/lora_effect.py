"""LoRA vs full fine-tuning vs full-then-LoRA on the bundled preference experiment.

RPO (DPO + chosen NLL, 64 bundled pairs per step) from the under-trained SFT model
(configs/experiments/sft_add_weak.gin, trained first if missing), equal steps:
  full            configs/experiments/rpo_add_weak.gin (lr 3e-4, precomputed reference)
  LoRA            configs/experiments/rpo_add_weak_lora.gin (rank 16 on every projection,
                  lr --lora-lr, reference = the base without adapters, in the step)
  full-then-LoRA  configs/experiments/rpo_add_weak_full100.gin (the first --full-steps of
                  the full run's schedule), then rpo_add_weak_full100_lora.gin (the rest as
                  LoRA on that frozen result, which is also its reference)
Each run is a `jalign train` subprocess, judged by `jalign eval RUN --task add --n 512`
(held-out greedy exact match). Prints a table: accuracy before -> after, trained
parameters, wall time.

    python benchmarks/lora_effect.py --json docs/lora_results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ift_effect import ROOT, START, _accuracy, _has_checkpoint, _jalign  # noqa: E402

FULL = "configs/experiments/rpo_add_weak.gin"
LORA = "configs/experiments/rpo_add_weak_lora.gin"
STAGE1 = "configs/experiments/rpo_add_weak_full100.gin"
STAGE2 = "configs/experiments/rpo_add_weak_full100_lora.gin"


def _train(config: str, name: str, bindings: list[str], logs: Path) -> tuple[Path, float]:
    args = ["train", config, "--gin", f"TrainConfig.run_name='{name}'",
            "--gin", "TrainConfig.progress=False", *sum((["--gin", b] for b in bindings), [])]
    t0 = time.time()
    _jalign(*args, log=logs / f"{name.replace('/', '_')}.log")
    return ROOT / "runs" / name, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--full-steps", type=int, default=100,
                    help="full fine-tuning steps before the switch to LoRA")
    ap.add_argument("--lora-lr", type=float, default=3e-3)
    ap.add_argument("--n", type=int, default=512, help="held-out problems to judge by")
    ap.add_argument("--prefix", default="experiments/lora_effect", help="run names' prefix")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    logs = ROOT / "runs" / args.prefix / "logs"
    start = ROOT / "runs" / "experiments" / "sft_add_weak"
    if not _has_checkpoint(start):
        _train(START, "experiments/sft_add_weak", [], logs)
    before = _accuracy(start, args.n, logs / "eval_start.log")
    steps = [f"TrainConfig.steps={args.steps}", f"TrainConfig.save_every={args.steps}",
             f"TrainConfig.eval_every={args.steps}"]
    lr = f"OptimizerConfig.learning_rate={args.lora_lr}"
    rows = []
    run, secs = _train(FULL, f"{args.prefix}/full", steps, logs)
    rows.append(("full fine-tuning", run, secs))
    run, secs = _train(LORA, f"{args.prefix}/lora", steps + [lr], logs)
    rows.append(("LoRA r16", run, secs))
    k = args.full_steps
    s1 = f"{args.prefix}/full{k}"
    run1, secs1 = _train(STAGE1, s1, [f"TrainConfig.steps={k}", f"TrainConfig.save_every={k}",
                                      f"TrainConfig.eval_every={k}",
                                      f"OptimizerConfig.decay_steps={args.steps}"], logs)
    rest = args.steps - k
    run2, secs2 = _train(STAGE2, f"{args.prefix}/full{k}_lora",
                         [f"TrainConfig.steps={rest}", f"TrainConfig.save_every={rest}",
                          f"TrainConfig.eval_every={rest}", lr,
                          f"ModelInit.source='jalign:{run1}'"], logs)
    rows.append((f"full {k} steps, then LoRA {rest}", run2, secs1 + secs2))
    results = {"before": before, "steps": args.steps, "lora_lr": args.lora_lr, "runs": []}
    print(f"\nstart: {start.name}, held-out accuracy {before:.1%} ({args.n} problems)")
    print(f"| schedule ({args.steps} steps) | accuracy after | change | wall time |")
    print("|---|---:|---:|---:|")
    for label, run, secs in rows:
        acc = _accuracy(run, args.n, logs / f"eval_{run.name}.log")
        results["runs"].append({"schedule": label, "run": str(run.relative_to(ROOT)),
                                "accuracy": acc, "seconds": secs})
        print(f"| {label} | {acc:.1%} | {100 * (acc - before):+.1f} | {secs:.0f} s |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
