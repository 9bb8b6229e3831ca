"""SFT train step on CPU: jalign vs transformers+PyTorch, TRL's SFTTrainer and Tunix.

Every implementation trains the same Llama shape (vocab 8192, hidden 512, intermediate
1408, 8 layers, 8 q / 8 kv heads of 64, untied LM head; 34.1M parameters) on the same
random batch of 4 x 512 tokens, float32, AdamW (lr 1e-4, betas 0.9/0.95, eps 1e-8, no
weight decay, constant lr, no gradient clipping), every token but the first a target:

  jalign (unrolled)   jalign's jitted ``make_train_step(sft_loss, ...)``, scan_layers=False
  jalign (scan)       the same with scan_layers=True (layers under ``lax.scan``)
  jalign + jemalloc   jalign (unrolled, and scan) with jemalloc preloaded (LD_PRELOAD,
                      MALLOC_CONF=thp:always,metadata_thp:always,dirty_decay_ms:-1,muzzy_decay_ms:-1)
  jalign + glibc      jalign (unrolled) with stock glibc malloc told never to mmap or trim
                      (GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=
                      4294967296:glibc.malloc.arena_max=1, what JALIGN_TUNE_MALLOC=1 sets;
                      --glibc-tunables times another): the same effect without jemalloc
  transformers+torch  ``LlamaForCausalLM`` + ``torch.optim.AdamW``, hand-written loop
  TRL SFTTrainer      ``trl.SFTTrainer.train()``, timed by a TrainerCallback
  Tunix PeftTrainer   ``tunix.sft.PeftTrainer.train()`` on Tunix's NNX Llama3, timed by a hook

plus the JAX fp32 matmul rate (jitted 4096x4096 @ 4096x4096) as the MFU reference.
Each runs in its own process (TRL and Tunix each in their own virtual environment, see
below) that stays alive for the whole run: all are started and warmed up (compile
included) one after the other, then the driver runs ``--rounds`` rounds, each giving
every implementation ``--steps`` timed steps in turn (the order rotates every round), so
the noise of this shared machine hits all of them alike; before each timed run it also
waits (at most ``--quiet-wait`` s) until other processes use fewer than ``--quiet-below``
cores, and it records how much CPU other processes used during each row's steps (the
"others' CPU" column: 0 means a clean measurement). Per-step wall times are
pooled over rounds; the table shows median and min seconds per step, tokens/s
(batch*seq / median), model GFLOP/s and MFU (the same FLOP count for every row, see
``common.flops_per_step``) and speed relative to TRL (TRL's median / the row's median).
The driver is benchmarks/harness.py's (shared with grpo_iteration.py); worker protocol and
timing details: benchmarks/train_step_impls/*.py. The table also shows each worker's peak
RSS and its compile time (jalign's ahead-of-time compile; for the others the first
warm-up step beyond the median). jalign rows run the library's defaults (blockwise
attention on CPU) with the ``jalign`` command's allocator default (``harness.command_env``:
glibc huge pages where the kernel gives them on request), except the rows that name their
own allocator; ``jalign-xla`` is the materialised-scores attention path.

``--algo dpo`` times a DPO train step instead, on the same model shape: ``--batch`` pairs
(default 4), each a ``--prompt``-token prompt (128) followed by a chosen and a rejected
response of ``seq - prompt`` tokens (384; the same random ids for everyone, common.pair_ids),
sigmoid loss, beta 0.1, the same AdamW, fp32, and a frozen reference model = a copy of
the initial policy whose forward runs every step:

  jalign (unrolled)   ``make_train_step(make_dpo_loss(DPOConfig(beta=0.1)), ...,
                      frozen_graphdefs={"reference": graphdef})``: the reference forward
                      inside the same jitted, donating step; also (scan), and (unrolled)
                      + the glibc tunables of the SFT glibc row
  TRL DPOTrainer      ``trl.DPOTrainer.train()`` with ``ref_model`` = a second identical
                      model, ``precompute_ref_log_probs=False``; gradient checkpointing off
                      (the others recompute nothing), and on as TRL's configs default to
  Tunix DPOTrainer    ``tunix.sft.dpo.DPOTrainer.train()`` on Tunix's Llama3 with a reference
                      copy (Tunix runs its forward as a separate jitted call per step)

The table then shows pairs/s, and the FLOPs are ``common.dpo_flops_per_step``: the SFT
count for the 2 x pairs sequences (policy fwd + bwd) plus a third of it (the reference's
forward). Every DPO timed interval includes the reference forward (details in
train_step_impls/*_dpo_worker.py).

Virtual environments (outside the repo; TRL and Tunix would change jalign's packages,
e.g. ``pip install google-tunix`` downgrades transformers), under $JALIGN_BENCH_VENVS
(default ~/.cache/jalign/bench-venvs). Exact commands used:

    python3.11 -m venv $JALIGN_BENCH_VENVS/trl
    $JALIGN_BENCH_VENVS/trl/bin/pip install --upgrade pip
    $JALIGN_BENCH_VENVS/trl/bin/pip install trl torch==2.13.0   # pin torch: else a CUDA build

    python3.11 -m venv $JALIGN_BENCH_VENVS/tunix
    $JALIGN_BENCH_VENVS/tunix/bin/pip install --upgrade pip
    $JALIGN_BENCH_VENVS/tunix/bin/pip install jax==0.10.2 flax==0.12.8 optax==0.2.8
    $JALIGN_BENCH_VENVS/tunix/bin/pip install --no-deps google-tunix
    printf 'jax==0.10.2\\njaxlib==0.10.2\\nflax==0.12.8\\noptax==0.2.8\\n' > tunix-constraints.txt
    $JALIGN_BENCH_VENVS/tunix/bin/pip install -c tunix-constraints.txt google-metrax \\
        jaxtyping tqdm huggingface_hub sentencepiece pillow perfetto pandas 'safetensors<0.8'

    apt-get update && apt-get install -y libjemalloc2          # the jemalloc row

(the last Tunix line is exactly what ``import tunix`` + its trainer + its Llama3 need on
top of jax/flax/optax; TRL's venv resolves to trl 1.16.0, transformers 5.23.0, the same
torch 2.13.0+cpu as jalign's venv.) Paths: ``--trl-python`` / ``--tunix-python`` /
``--jalign-python`` or the environment variables JALIGN_BENCH_TRL_PYTHON,
JALIGN_BENCH_TUNIX_PYTHON, JALIGN_BENCH_PYTHON. A missing venv or a failing worker
gives a "not run: <reason>" row, never a silently missing one.

Run from the repo root (about 9 minutes with the defaults on a quiet 2-core machine):

    .venv/bin/python benchmarks/train_step.py
    .venv/bin/python benchmarks/train_step.py --only jalign,trl --rounds 2
    .venv/bin/python benchmarks/train_step.py --breakdown   # + where jalign's step goes
    .venv/bin/python benchmarks/train_step.py --algo dpo    # the DPO step
    .venv/bin/python benchmarks/train_step.py --algo ift    # IFT next to SFT (jalign)
    # this checkout against the commit before a change, side by side:
    git archive COMMIT | tar -x -C /tmp/jalign_prev
    .venv/bin/python benchmarks/train_step.py --only jalign,jalign-other \
        --jalign-other /tmp/jalign_prev --jalign-other-label COMMIT

``--algo ift`` times jalign's IFT step (benchmarks/train_step_impls/jalign_ift_worker.py:
the SFT worker's model and batch, ``make_ift_loss(IFTConfig())``) next to its SFT step,
unrolled and scanned, and prints IFT / SFT step-time ratios; its FLOPs count pass 1 as a
third of the SFT step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import sys
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py (scripts run from benchmarks/)

HERE = Path(__file__).resolve().parent
IMPLS_DIR = HERE / "train_step_impls"
REPO = HERE.parent
sys.path.insert(0, str(IMPLS_DIR))
from common import (DPO_BETA, DPO_PROMPT, SHAPE, dpo_flops_per_step,  # noqa: E402
                    flops_per_step)
from harness import (ALLOCATOR_VARS, Worker, command_env, first_step, launch,  # noqa: E402
                     mem_gib, run_rounds, select)

# Where the peers' virtual environments live (outside the repo): $JALIGN_BENCH_VENVS, or
# a cache directory.
VENVS = Path(os.environ.get("JALIGN_BENCH_VENVS",
                            Path.home() / ".cache" / "jalign" / "bench-venvs"))
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
JEMALLOC_CONF = "thp:always,metadata_thp:always,dirty_decay_ms:-1,muzzy_decay_ms:-1"
# What `JALIGN_TUNE_MALLOC=1 jalign ...` sets (jalign.cli.GLIBC_TUNING; off by default);
# --glibc-tunables times another.
GLIBC_TUNABLES = ("glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296:"
                  "glibc.malloc.arena_max=1")
OTHER_ROWS = ("jalign-other", "jalign-other-scan")  # --jalign-other: another jalign checkout
ROWS = ("jalign", "jalign-scan", "jalign-xla", "jalign-jemalloc", "jalign-scan-jemalloc",
        "jalign-glibc", "torch", "trl", "tunix") + OTHER_ROWS
DPO_ROWS = ("jalign", "jalign-scan", "jalign-glibc", "trl", "trl-gc", "tunix") + OTHER_ROWS
IFT_ROWS = ("sft", "ift", "sft-scan", "ift-scan")
HOWTO = {
    "trl": "python3.11 -m venv {venv} && {venv}/bin/pip install trl torch==2.13.0",
    "tunix": ("python3.11 -m venv {venv} && {venv}/bin/pip install jax==0.10.2 flax==0.12.8 "
              "optax==0.2.8 && {venv}/bin/pip install --no-deps google-tunix && {venv}/bin/pip "
              "install google-metrax jaxtyping tqdm huggingface_hub sentencepiece pillow "
              "perfetto pandas 'safetensors<0.8' (see the top of benchmarks/train_step.py)"),
}


def plan(args) -> tuple[list[tuple[str, str, list[str] | None, dict, str | None]], dict]:
    """(key, label, command or None, extra env, reason not run) per row."""
    shape = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in SHAPE]
    common = shape + [f"--warmup={args.warmup}", f"--threads={args.threads}",
                      f"--max-steps={args.warmup + args.rounds * args.steps + 10}"]
    jpy = args.jalign_python
    rows = []

    def py_ok(py: str, key: str):
        if Path(py).exists():
            return None
        venv = str(Path(py).parent.parent)
        how = HOWTO.get(key, "").format(venv=venv)
        return f"{py} not found" + (f"; create it: {how}" if how else "")

    jalign_env = {"PYTHONPATH": str(REPO)}
    if args.algo == "dpo":
        common = common + [f"--prompt={args.prompt}"]
        rows = plan_dpo(args, common, py_ok, jalign_env)
        rows += other_rows(args, "jalign_dpo_worker.py", common, py_ok)
        return select(rows, args.only, DPO_ROWS), {"peak": peak_cmd(args)}
    if args.algo == "ift":
        sft_w, ift_w = str(IMPLS_DIR / "jalign_worker.py"), str(IMPLS_DIR / "jalign_ift_worker.py")
        rows = [(f"{name}{suffix}", f"jalign {name.upper()} ({'scan' if suffix else 'unrolled'})",
                 [jpy, w] + (["--scan"] if suffix else []) + common, jalign_env, py_ok(jpy, ""))
                for suffix in ("", "-scan") for name, w in (("sft", sft_w), ("ift", ift_w))]
        return select(rows, args.only, IFT_ROWS), {"peak": peak_cmd(args)}
    w = str(IMPLS_DIR / "jalign_worker.py")
    rows.append(("jalign", "jalign (unrolled)", [jpy, w] + common, jalign_env, py_ok(jpy, "")))
    rows.append(("jalign-scan", "jalign (scan)", [jpy, w, "--scan"] + common, jalign_env,
                 py_ok(jpy, "")))
    rows.append(("jalign-xla", "jalign (unrolled), xla attention ([T, T] scores)",
                 [jpy, w, "--attention", "xla"] + common, jalign_env, py_ok(jpy, "")))
    je_reason = py_ok(jpy, "")
    if not Path(args.jemalloc).exists():
        je_reason = (f"{args.jemalloc} not found (apt-get update && apt-get install -y "
                     "libjemalloc2)")
    rows.append(("jalign-jemalloc", "jalign (unrolled) + jemalloc", [jpy, w] + common,
                 dict(jalign_env, LD_PRELOAD=args.jemalloc, MALLOC_CONF=JEMALLOC_CONF),
                 je_reason))
    rows.append(("jalign-scan-jemalloc", "jalign (scan) + jemalloc", [jpy, w, "--scan"] + common,
                 dict(jalign_env, LD_PRELOAD=args.jemalloc, MALLOC_CONF=JEMALLOC_CONF),
                 je_reason))
    rows.append(("jalign-glibc", "jalign (unrolled) + glibc malloc tunables", [jpy, w] + common,
                 dict(jalign_env, GLIBC_TUNABLES=args.glibc_tunables), py_ok(jpy, "")))
    rows.append(("torch", "transformers + PyTorch", [jpy, str(IMPLS_DIR / "torch_worker.py")]
                 + common, {}, py_ok(jpy, "")))
    rows.append(("trl", "TRL SFTTrainer",
                 [args.trl_python, str(IMPLS_DIR / "trl_worker.py")] + common, {},
                 py_ok(args.trl_python, "trl")))
    rows.append(("tunix", "Tunix PeftTrainer",
                 [args.tunix_python, str(IMPLS_DIR / "tunix_worker.py")] + common, {},
                 py_ok(args.tunix_python, "tunix")))
    rows += other_rows(args, "jalign_worker.py", common, py_ok)
    return select(rows, args.only, ROWS), {"peak": peak_cmd(args)}


def other_rows(args, worker: str, common: list[str], py_ok) -> list:
    """``--jalign-other DIR``: the same worker of another jalign checkout (e.g. the commit
    before a change, from ``git archive COMMIT | tar -x -C DIR``), run with that tree's
    code (PYTHONPATH) in this venv, next to this checkout's rows."""
    if not args.jalign_other:
        return []
    other = Path(args.jalign_other).resolve()
    w = other / "benchmarks" / "train_step_impls" / worker
    reason = py_ok(args.jalign_python, "") or (None if w.exists() else f"{w} not found")
    env = {"PYTHONPATH": str(other)}
    name = args.jalign_other_label or other.name
    # The SFT worker's own default attention changed (xla until 2026-12-07, auto since):
    # both sides run the library's default, named explicitly.
    same = ["--attention", "auto"] if worker == "jalign_worker.py" else []
    return [("jalign-other", f"jalign {name} (unrolled)",
             [args.jalign_python, str(w)] + same + common, env, reason),
            ("jalign-other-scan", f"jalign {name} (scan)",
             [args.jalign_python, str(w), "--scan"] + same + common, env, reason)]


def plan_dpo(args, common: list[str], py_ok, jalign_env: dict) -> list:
    """The DPO rows (``--algo dpo``): jalign's in-step-reference DPO step (unrolled, scan,
    unrolled with the glibc tunables of the SFT glibc row), TRL's DPOTrainer (gradient
    checkpointing off, and on as TRL's configs default to) and Tunix's DPOTrainer."""
    jpy = args.jalign_python
    w = str(IMPLS_DIR / "jalign_dpo_worker.py")
    trl = [args.trl_python, str(IMPLS_DIR / "trl_dpo_worker.py")] + common
    return [
        ("jalign", "jalign (unrolled)", [jpy, w] + common, jalign_env, py_ok(jpy, "")),
        ("jalign-scan", "jalign (scan)", [jpy, w, "--scan"] + common, jalign_env,
         py_ok(jpy, "")),
        ("jalign-glibc", "jalign (unrolled) + glibc malloc tunables", [jpy, w] + common,
         dict(jalign_env, GLIBC_TUNABLES=args.glibc_tunables), py_ok(jpy, "")),
        ("trl", "TRL DPOTrainer", trl, {}, py_ok(args.trl_python, "trl")),
        ("trl-gc", "TRL DPOTrainer, gradient checkpointing (TRL's default)",
         trl + ["--gradient-checkpointing"], {}, py_ok(args.trl_python, "trl")),
        ("tunix", "Tunix DPOTrainer",
         [args.tunix_python, str(IMPLS_DIR / "tunix_dpo_worker.py")] + common, {},
         py_ok(args.tunix_python, "tunix")),
    ]


def peak_cmd(args):
    jpy = args.jalign_python
    return (jpy, [jpy, str(IMPLS_DIR / "matmul_peak.py"), f"--n={args.peak_n}"])


def fmt_s(x):
    return f"{x:.3f}" if x == x else "n/a"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for k, v in SHAPE.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    ap.add_argument("--algo", choices=("sft", "dpo", "ift"), default="sft",
                    help="which train step: SFT (default), DPO (batch = pairs), or IFT "
                    "next to SFT (jalign only)")
    ap.add_argument("--prompt", type=int, default=DPO_PROMPT,
                    help="DPO: prompt tokens of each sequence (response = seq - prompt)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per worker (compile incl.)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per worker per round")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(ROWS)} "
                    f"(--algo dpo: of {','.join(DPO_ROWS)}; --algo ift: of {','.join(IFT_ROWS)})")
    ap.add_argument("--jalign-python", default=os.environ.get("JALIGN_BENCH_PYTHON", sys.executable))
    ap.add_argument("--trl-python", default=os.environ.get("JALIGN_BENCH_TRL_PYTHON",
                                                          str(VENVS / "trl/bin/python")))
    ap.add_argument("--tunix-python", default=os.environ.get("JALIGN_BENCH_TUNIX_PYTHON",
                                                            str(VENVS / "tunix/bin/python")))
    ap.add_argument("--jalign-other", default="",
                    help="another jalign checkout (a directory) whose SFT/DPO worker runs as "
                         "the rows jalign-other and jalign-other-scan, side by side")
    ap.add_argument("--jalign-other-label", default="",
                    help="what to call it in the table (default: the directory's name)")
    ap.add_argument("--jemalloc", default=JEMALLOC)
    ap.add_argument("--glibc-tunables", default=GLIBC_TUNABLES,
                    help="GLIBC_TUNABLES of the jalign-glibc row")
    ap.add_argument("--peak-n", type=int, default=4096, help="matmul size for the MFU peak")
    ap.add_argument("--no-peak", action="store_true", help="skip the matmul peak (no MFU)")
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--quiet-below", type=float, default=0.3,
                    help="before each timed run, wait until other processes use fewer cores")
    ap.add_argument("--quiet-wait", type=float, default=5,
                    help="...but at most this many seconds (0: never wait)")
    ap.add_argument("--logs", default=os.environ.get(
        "JALIGN_BENCH_LOGS", str(Path(tempfile.gettempdir()) / "jalign_train_step_bench")),
                    help="worker logs (default $JALIGN_BENCH_LOGS or the temp dir)")
    ap.add_argument("--json", default="", help="write raw per-step times here")
    ap.add_argument("--breakdown", action="store_true",
                    help="afterwards, run benchmarks/train_step_impls/jalign_breakdown.py "
                    "(--algo dpo: jalign_dpo_breakdown.py)")
    args = ap.parse_args()

    t_start = time.perf_counter()
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    rows, extra = plan(args)
    dpo = args.algo == "dpo"
    fl = (dpo_flops_per_step if dpo else flops_per_step)(
        args.vocab, args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads,
        args.batch, args.seq)
    tokens = args.batch * args.seq
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}, {mem_gib():.1f} GiB RAM, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if dpo:
        tokens = 2 * args.batch * args.seq  # chosen and rejected sequences
        print(f"shape: vocab {args.vocab}, hidden {args.hidden}, intermediate "
              f"{args.intermediate}, {args.layers} layers, {args.heads} q / {args.kv_heads} kv "
              f"heads, untied; DPO: {args.batch} pairs of {args.prompt} prompt + "
              f"{args.seq - args.prompt} response tokens = 2 x {args.batch} x {args.seq} = "
              f"{tokens} tokens, sigmoid loss, beta {DPO_BETA}, frozen reference = the initial "
              f"policy, fp32, AdamW, no clipping")
        print(f"FLOPs/step: policy fwd+bwd over {2 * args.batch} sequences: 6 x "
              f"{fl['n_matmul_params']:,} matmul params x {tokens} tokens = "
              f"{fl['dense'] / 1e9:.1f} G, + attention {fl['attention'] / 1e9:.1f} G = "
              f"{fl['policy'] / 1e9:.1f} G; + reference forward (1/3 of that) "
              f"{fl['reference'] / 1e9:.1f} G; total {fl['total'] / 1e9:.1f} GFLOP")
    else:
        print(f"shape: vocab {args.vocab}, hidden {args.hidden}, intermediate {args.intermediate}, "
              f"{args.layers} layers, {args.heads} q / {args.kv_heads} kv heads, untied; batch "
              f"{args.batch} x {args.seq} = {tokens} tokens, fp32, AdamW, no clipping")
        print(f"FLOPs/step: 6 x {fl['n_matmul_params']:,} matmul params x {tokens} tokens = "
              f"{fl['dense'] / 1e9:.1f} G, + attention 3 x {args.layers} layers x 2 x "
              f"(2 x B x H x T^2 x head_dim) = {fl['attention'] / 1e9:.1f} G; total "
              f"{fl['total'] / 1e9:.1f} GFLOP")
    print(f"protocol: warmup {args.warmup}, {args.rounds} rounds x {args.steps} steps, "
          f"rotating order; logs in {logs}\n", flush=True)

    workers: list[Worker] = []
    skipped: dict[str, tuple[str, str]] = {}
    for key, label, cmd, env_extra, reason in rows:
        env = dict(os.environ, **env_extra)
        if "PYTHONPATH" in env_extra and os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = env_extra["PYTHONPATH"] + os.pathsep + os.environ["PYTHONPATH"]
        if cmd and cmd[0] == args.jalign_python and not set(env_extra) & set(ALLOCATOR_VARS):
            env = command_env(env)  # a jalign row: the `jalign` command's allocator default
        t0 = time.perf_counter()
        w = launch(key, label, cmd, env, reason, logs / f"{'dpo-' if dpo else ''}{key}.log",
                   args.start_timeout, skipped)
        if w is None:
            continue
        warm = ", ".join(f"{t:.1f}" for t in w.info.get("warmup_times", []))
        extra_txt = (f", compile {w.info['compile_s']:.1f} s, XLA cost-analysis flops "
                     f"{w.info['xla_flops'] / 1e9:.1f} G" if "compile_s" in w.info else "")
        loss = w.info.get("first_loss")
        print(f"[{label}] ready in {time.perf_counter() - t0:.0f} s (warmup steps: {warm} s"
              f"{extra_txt}); first loss {'n/a' if loss is None else f'{loss:.3f}'}",
              flush=True)
        workers.append(w)

    peak_worker = None
    if not args.no_peak:
        py, cmd = extra["peak"]
        peak_worker = Worker("peak", f"matmul {args.peak_n}", cmd, dict(os.environ),
                             logs / "peak.log")
        if peak_worker.wait("ready", args.start_timeout) is None:
            print(f"[matmul peak] not run: {peak_worker.error}")
            peak_worker = None

    participants = workers + ([peak_worker] if peak_worker else [])
    run_rounds(participants, args.rounds, lambda w: 1 if w is peak_worker else args.steps,
               args.quiet_below, args.quiet_wait, unit="s/step",
               shown=[w for w in participants if w is not peak_worker])

    peak_gflops = float("nan")
    if peak_worker and peak_worker.times:
        per_call = min(peak_worker.times)
        peak_gflops = 2 * args.peak_n ** 3 / per_call / 1e9
        print(f"\nfp32 matmul peak (jax.jit {args.peak_n}x{args.peak_n}; best round's median "
              f"call {per_call:.3f} s): {peak_gflops:.1f} GFLOP/s "
              f"(per round: {', '.join(f'{2 * args.peak_n ** 3 / t / 1e9:.0f}' for t in peak_worker.times)}"
              f"; others' CPU {', '.join(f'{o:.1f}' for o in peak_worker.others)} cores)")

    results = {}
    for w in workers:
        if w.times:
            faults = statistics.median(w.faults) if w.faults else float("nan")
            others = statistics.median(w.others) if w.others else float("nan")
            results[w.key] = (w.label, statistics.median(w.times), min(w.times), max(w.times),
                              len(w.times), faults, others, w.peak_rss, first_step(w))
        else:
            skipped.setdefault(w.key, (w.label, w.error or "no timed steps"))
    ift = args.algo == "ift"
    base_key, base_name = ("sft", "jalign SFT (same layer mode)") if ift else ("trl", "TRL")
    base = results.get(base_key)
    if ift:
        print(f"\nIFT and SFT train steps, {tokens} tokens/step; SFT {fl['total'] / 1e9:.1f} "
              f"GFLOP/step, IFT 4/3 of that (+ pass 1, a forward without gradient); "
              f"{args.rounds} rounds x {args.steps} steps per row\n")
    elif dpo:
        print(f"\nDPO train step, {args.batch} pairs ({tokens} tokens) per step, "
              f"{fl['total'] / 1e9:.1f} GFLOP/step; {args.rounds} rounds x {args.steps} steps "
              "per implementation\n")
    else:
        print(f"\nSFT train step, {tokens} tokens/step, {fl['total'] / 1e9:.1f} GFLOP/step; "
              f"{args.rounds} rounds x {args.steps} steps per implementation\n")
    unit, per_step = ("pairs/s", args.batch) if dpo else ("tokens/s", tokens)
    print(f"| implementation | median s/step | min s/step | max s/step | {unit} | "
          f"GFLOP/s | MFU | speed vs {base_name} | page faults/step | peak RSS GiB | "
          "compile s | others' CPU (cores) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key in [r[0] for r in rows]:
        if key in results:
            label, med, lo, hi, n, faults, others, rss, compile_s = results[key]
            row_flops = next((w.info.get("flops", fl) for w in workers if w.key == key), fl)
            gf = row_flops["total"] / med / 1e9
            mfu = f"{100 * gf / peak_gflops:.0f}%" if peak_gflops == peak_gflops else "n/a"
            # IFT rows against the SFT row of the same layer mode (scan vs scan).
            ref = results.get(f"sft{key[3:]}") if ift else base
            vs = f"{ref[1] / med:.2f}x" if ref else "n/a"
            rate = f"{per_step / med:.3f}" if dpo else f"{tokens / med:.0f}"
            print(f"| {label} | {med:.3f} | {lo:.3f} | {hi:.3f} | {rate} | "
                  f"{gf:.1f} | {mfu} | {vs} | {faults:,.0f} | {rss:.2f} | {compile_s} | "
                  f"{others:.2f} |")
        elif key in skipped:
            label, reason = skipped[key]
            print(f"| {label} | not run: {reason} | | | | | | | | | | |")
    if ift:
        for suffix in ("", "-scan"):
            if f"sft{suffix}" in results and f"ift{suffix}" in results:
                r = results[f"ift{suffix}"][1] / results[f"sft{suffix}"][1]
                print(f"\nIFT / SFT step time{' (scan)' if suffix else ''}: {r:.2f}x "
                      f"(medians; counted FLOPs 1.33x)")
    print(f"\nspeed vs {base_name} = {base_name} median s/step / this row's median (>1: faster). "
          "MFU = (GFLOP/step / median s/step) / fp32 matmul peak (best round). page faults/step: median minor "
          "page faults of the worker process during one timed step (getrusage). others' CPU: "
          "median CPU use of all other processes on the machine while this row's steps ran "
          "(/proc/stat minus the worker's own /proc/<pid>/stat), in cores out of "
          f"{os.cpu_count()}: the noise each row suffered. peak RSS: the worker process's "
          "VmHWM after all its steps (model, optimizer, batch, the framework itself). compile "
          "s: jalign's ahead-of-time compile of the step; for the other rows the first warm-up "
          "step minus the median step (~ their compile or first-call overhead, marked ~).")
    if dpo:
        print("DPO: pairs/s = pairs per step / median s/step; every row's timed step includes "
              "the frozen reference's forward over the same 2 x pairs sequences (jalign: inside "
              "the one jitted step; TRL: inside compute_loss; Tunix: its separate jitted call "
              "in _prepare_inputs).")
    print("\nversions / settings:")
    for w in workers:
        i = w.info
        keep = {k: i[k] for k in ("versions", "optim", "optimizer_class", "attn_implementation",
                                  "threads", "n_params", "input_shape", "labels_trainable",
                                  "ld_preload", "lora", "gradient_checkpointing",
                                  "policy_gradient_checkpointing", "ref_model_separate",
                                  "ref_logps_in_step", "response_tokens", "dpo_config",
                                  "ift_config")
                if k in i}
        if w.key == "jalign-glibc":
            keep["GLIBC_TUNABLES"] = args.glibc_tunables
        print(f"  {w.label}: {json.dumps(keep)}")
    waited = sum(sum(w.waited) for w in participants)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s (of which {waited:.0f} s "
          f"waiting for a quiet machine before steps)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {**({"algo": "dpo", "prompt": args.prompt} if dpo else {}), "flops": fl, "peak_gflops": peak_gflops,
             "peak_times": peak_worker.times if peak_worker else [],
             "rows": {w.key: {"label": w.label, "times": w.times, "faults": w.faults,
                              "others_cores": w.others, "waited_s": w.waited,
                              "info": w.info, "peak_rss_gib": w.peak_rss,
                              "compile": first_step(w),
                              "error": w.error} for w in workers},
             "skipped": skipped}, indent=1))
    if args.breakdown:
        print("\n--- jalign breakdown ---", flush=True)
        script = "jalign_dpo_breakdown.py" if dpo else "jalign_breakdown.py"
        subprocess.run([args.jalign_python, str(IMPLS_DIR / script)],
                       cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))


if __name__ == "__main__":
    main()
