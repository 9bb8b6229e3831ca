"""One GRPO iteration (sample + score + update) on CPU: jalign vs TRL's GRPOTrainer and
Tunix's GRPOLearner.

Every implementation trains the same Llama shape as benchmarks/train_step.py (vocab 8192,
hidden 512, intermediate 1408, 8 layers, 8 q / 8 kv heads, untied; 34.1M parameters,
float32, random init) on the same prompts: ``--prompts`` prompts per iteration (4) of
``--prompt-len`` random words (64; a toy word-level tokenizer, one token per word),
``--group`` completions each (G = 8), at most ``--completion`` sampled tokens (128;
temperature 1, no top-k / top-p), the reward ``common.even_word_reward`` on the decoded
text, group advantages (mean and std of the group), and one AdamW update (lr 1e-4,
betas 0.9/0.95, no clipping) of the token-level ("dapo") clipped loss, clip 0.2, beta 0
(no reference model) on the prompts x G rows:

  jalign            jalign's GRPO run as ``jalign train`` opens it (configs/algo/dapo.gin;
                    the rollout source + the jitted train step; the command's allocator
                    default, ``jalign.cli.allocator_env``: glibc huge pages where the
                    kernel gives them on request)
  jalign (stock)    the same with glibc's malloc as it comes (``JALIGN_KEEP_MALLOC=1``)
  jalign (tuned)    the same with the glibc malloc tunables ``JALIGN_TUNE_MALLOC=1`` sets
  TRL GRPOTrainer   ``trl.GRPOTrainer.train()``, its own generation backend (transformers'
                    ``generate`` on CPU), gradient checkpointing off (TRL's default is on)
  Tunix GRPOLearner ``tunix.rl.grpo.GRPOLearner.train()`` on Tunix's NNX Llama3 (the same
                    shape, float32), an ``RLCluster`` with no reference model and Tunix's
                    "vanilla" rollout (its own sampler) sharing the actor's one-device mesh,
                    ``loss_agg_mode='token-mean'`` (= dapo), epsilon 0.2, beta 0

The worker protocol and the driver are benchmarks/harness.py's, as for the train steps
(long-lived workers, the order rotating every round, a wait for a quiet machine before each
timed iteration, other processes' CPU use and each worker's peak RSS recorded). Each worker also reports its iteration's phases:
sampling, rewards, the scoring before the update, and the update (details in
train_step_impls/jalign_grpo_worker.py, trl_grpo_worker.py and tunix_grpo_worker.py).
TRL's and Tunix's venvs: see benchmarks/train_step.py (``--trl-python``,
``--tunix-python``); Tunix's GRPO path needs nothing beyond the packages listed there
for its SFT row.

    .venv/bin/python benchmarks/grpo_iteration.py
    .venv/bin/python benchmarks/grpo_iteration.py --only jalign,trl --rounds 2 --completion 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import train_step as ts  # benchmarks/train_step.py: venvs, rows, paths
from machine import cpu_model

sys.path.insert(0, str(ts.IMPLS_DIR))
from common import (GRPO_COMPLETION, GRPO_GROUP, GRPO_PROMPT, GRPO_PROMPTS,  # noqa: E402
                    SHAPE, grpo_flops)
from harness import ALLOCATOR_VARS, command_env, first_step, run_rounds  # noqa: E402

ROWS = ("jalign", "jalign-stock", "jalign-tuned", "trl", "tunix")
PHASES = ("sample", "reward", "score", "update")


def plan(args) -> list:
    """(key, label, command, extra env, reason not run) per row."""
    shape = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in SHAPE]
    common = shape + [f"--warmup={args.warmup}", f"--threads={args.threads}",
                      f"--max-steps={args.warmup + args.rounds + 10}",
                      f"--prompts={args.prompts}", f"--group={args.group}",
                      f"--prompt-len={args.prompt_len}", f"--completion={args.completion}"]
    jpy, tpy, xpy = args.jalign_python, args.trl_python, args.tunix_python

    def missing(py, key):
        if Path(py).exists():
            return None
        how = ts.HOWTO.get(key, "").format(venv=Path(py).parent.parent)
        return f"{py} not found" + (f"; create it: {how}" if how else "")

    sys.path.insert(0, str(ts.REPO))
    from jalign.cli import GLIBC_TUNING
    jw = str(ts.IMPLS_DIR / "jalign_grpo_worker.py")
    env = {"PYTHONPATH": str(ts.REPO)}
    rows = [("jalign", "jalign", [jpy, jw] + common, env, missing(jpy, "")),
            ("jalign-stock", "jalign, stock glibc malloc (JALIGN_KEEP_MALLOC=1)",
             [jpy, jw] + common, dict(env, JALIGN_KEEP_MALLOC="1"), missing(jpy, "")),
            ("jalign-tuned", "jalign + glibc malloc tunables (JALIGN_TUNE_MALLOC=1)",
             [jpy, jw] + common, dict(env, GLIBC_TUNABLES=GLIBC_TUNING), missing(jpy, "")),
            ("trl", "TRL GRPOTrainer", [tpy, str(ts.IMPLS_DIR / "trl_grpo_worker.py")] + common,
             {}, missing(tpy, "trl")),
            ("tunix", "Tunix GRPOLearner",
             [xpy, str(ts.IMPLS_DIR / "tunix_grpo_worker.py")] + common, {},
             missing(xpy, "tunix"))]
    return ts.select(rows, args.only, ROWS)


def start(rows, args, logs: Path) -> tuple[list, dict]:
    workers, skipped = [], {}
    for key, label, cmd, env_extra, reason in rows:
        env = dict(os.environ, **env_extra)
        if key.startswith("jalign"):  # each its own allocator, whatever this shell has set
            env = dict({k: v for k, v in os.environ.items() if k not in ALLOCATOR_VARS},
                       **env_extra)
        if key == "jalign":  # the command's default
            env = command_env(env)
        t0 = time.perf_counter()
        w = ts.launch(key, label, cmd, env, reason, logs / f"grpo-{key}.log",
                      args.start_timeout, skipped)
        if w is None:
            continue
        warm = ", ".join(f"{t:.1f}" for t in w.info.get("warmup_times", []))
        print(f"[{label}] ready in {time.perf_counter() - t0:.0f} s (warmup iterations: "
              f"{warm} s)", flush=True)
        workers.append(w)
    return workers, skipped


def table(workers, skipped, rows, args) -> None:
    fl = grpo_flops(args.vocab, args.hidden, args.intermediate, args.layers, args.heads,
                    args.kv_heads, args.prompts * args.group, args.prompt_len, args.completion)
    med = {w.key: statistics.median(w.times) for w in workers if w.times}
    base = med.get("trl")
    print(f"\nGRPO iteration: {args.prompts} prompts x G {args.group} = "
          f"{args.prompts * args.group} rows of {args.prompt_len} prompt + <= {args.completion} "
          f"sampled tokens; update {fl['total'] / 1e9:.1f} GFLOP (fwd + bwd over every row's "
          f"{args.prompt_len + args.completion} slots); {args.rounds} rounds\n")
    print("| implementation | median s/iteration | min | max | speed vs TRL | "
          + " | ".join(f"{p} s" for p in PHASES)
          + " | sampled tokens/iteration | sampled tokens/s | update GFLOP/s | peak RSS GiB | "
          "compile s | others' CPU (cores) |")
    print("|---|" + "---:|" * (10 + len(PHASES)))
    for key in [r[0] for r in rows]:
        w = next((w for w in workers if w.key == key and w.times), None)
        if w is None:
            label, reason = skipped.get(key, (key, "no timed iterations"))
            print(f"| {label} | not run: {reason} |" + " |" * (9 + len(PHASES)))
            continue
        ph = {p: statistics.median(x.get(p, 0.0) for x in w.phases) for p in PHASES}
        tokens = statistics.median(x.get("completion_tokens", float("nan")) for x in w.phases)
        vs = f"{base / med[key]:.2f}x" if base else "n/a"
        print(f"| {w.label} | {med[key]:.3f} | {min(w.times):.3f} | {max(w.times):.3f} | {vs} | "
              + " | ".join(f"{ph[p]:.3f}" for p in PHASES)
              + f" | {tokens:.0f} | {tokens / ph['sample']:.0f} | "
              f"{fl['total'] / ph['update'] / 1e9:.1f} | {w.peak_rss:.2f} | {first_step(w)} | "
              f"{statistics.median(w.others):.2f} |")
    print("\nspeed vs TRL = TRL's median / the row's median (>1: faster). Phases: medians "
          "over the rounds; sample = generating the completions (jalign: one prefill per "
          "prompt, G completions from its cache; TRL and Tunix: their samplers on the "
          "prompts repeated G times), reward = the reward function (jalign: also decoding), "
          "score = what runs between rewards and the update (jalign: the scoring program, "
          "advantages; TRL: the rest of _generate_and_score_completions; Tunix: the rest of "
          "_generate_and_compute_advantage), update = loss, backward, AdamW. peak RSS: the "
          "worker's VmHWM after its iterations; compile s: the first warm-up iteration minus "
          "the median one (~ what compiling or a first call cost).")
    print("\nversions / settings:")
    for w in workers:
        keep = {k: w.info[k] for k in ("versions", "threads", "gradient_checkpointing",
                                       "loss_type", "input_shape", "prompt_tokens",
                                       "first_response_length", "reference_model")
                if k in w.info}
        print(f"  {w.label}: {json.dumps(keep)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for k, v in SHAPE.items():
        if k not in ("batch", "seq"):
            ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    ap.add_argument("--prompts", type=int, default=GRPO_PROMPTS)
    ap.add_argument("--group", type=int, default=GRPO_GROUP)
    ap.add_argument("--prompt-len", type=int, default=GRPO_PROMPT)
    ap.add_argument("--completion", type=int, default=GRPO_COMPLETION)
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations (compile incl.)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--jalign-python", default=os.environ.get("JALIGN_BENCH_PYTHON", sys.executable))
    ap.add_argument("--trl-python", default=os.environ.get("JALIGN_BENCH_TRL_PYTHON",
                                                          str(ts.VENVS / "trl/bin/python")))
    ap.add_argument("--tunix-python", default=os.environ.get("JALIGN_BENCH_TUNIX_PYTHON",
                                                            str(ts.VENVS / "tunix/bin/python")))
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--quiet-below", type=float, default=0.3)
    ap.add_argument("--quiet-wait", type=float, default=5)
    ap.add_argument("--logs", default=os.environ.get(
        "JALIGN_BENCH_LOGS", str(Path(tempfile.gettempdir()) / "jalign_train_step_bench")))
    ap.add_argument("--json", default="", help="write raw per-iteration times and phases here")
    args = ap.parse_args()
    args.batch, args.seq = args.prompts * args.group, args.prompt_len + args.completion
    t_start = time.perf_counter()
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}, {ts.mem_gib():.1f} GiB RAM, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    rows = plan(args)
    workers, skipped = start(rows, args, logs)
    run_rounds(workers, args.rounds, lambda w: 1, args.quiet_below, args.quiet_wait,
               unit="s/iteration", timeout_s=1800, timeout_per_step_s=0)
    table(workers, skipped, rows, args)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"rows": {w.key: {"label": w.label, "times": w.times, "phases": w.phases,
                              "others_cores": w.others, "info": w.info, "error": w.error,
                              "peak_rss_gib": w.peak_rss, "compile": first_step(w)}
                      for w in workers}, "skipped": skipped}, indent=1))


if __name__ == "__main__":
    main()
