"""Sampling throughput: jalign's KV-cache sampler vs transformers' ``generate`` and Tunix's sampler.

All run on CPU in float32 with the *same* weights: a randomly initialised jalign Llama is
exported with ``jalign.convert.hf.save_hf`` and loaded into ``LlamaForCausalLM`` and (by
Tunix's own safetensors loader) into Tunix's NNX ``Llama3``. Each
generates ``--new`` tokens for ``--batch`` left-padded prompts of different lengths (up
to ``--prompt`` tokens), greedy and sampled (temperature 1, top-k off), with EOS disabled
so every row generates the full length on every side (transformers: ``min_new_tokens``;
jalign: an EOS id no token takes). jalign: ``jalign.rl.generate.generate`` (prefill, then
one cached decode step per token inside one jitted ``lax.while_loop``), with the ``jalign``
command's allocator default (glibc huge pages where the kernel gives them on request; the
other rows, Tunix's XLA:CPU included, run glibc as it comes); transformers: ``model.generate(..., use_cache=True)`` under
``torch.inference_mode()`` with ``--threads`` intra-op threads; Tunix:
``tunix.generate.sampler.Sampler.__call__`` (jitted prefill, then a jitted
``lax.while_loop`` of cached decode steps; greedy = temperature 0, sampled = temperature
1 with top_p 1.0 and no top-k) in the Tunix virtual environment.

Every row is its own worker process (benchmarks/generate_impls/*_sampler_worker.py; the
prompts each sees are the same left-padded array, EOS is disabled the same way, the
timed interval is one whole public call), driven by benchmarks/harness.py as the train
steps are: per mode, the workers start one after the other (each times its first call,
compile included, then warms up), then ``--repeats`` rounds of one call each in a
rotating order, each after a wait for a quiet machine, with other processes' CPU use and
each worker's peak RSS recorded. The table shows median seconds per call, new tokens/s
(batch x new / median), jalign's speed relative to the row, and the greedy tokens'
agreement: on jalign's row jalign vs transformers, on Tunix's row Tunix vs jalign. (Tunix 0.1.7's Llama3 rotates with RoPE base 1e6 whatever its config says, so
its greedy tokens differ from the others' on these weights, whose base is 1e4; the
worker's ``--rope-theta-from-config`` check, ``--tunix-rope-theta-from-config`` here,
makes it use the config's base, and then its tokens equal jalign's. The speed rows use
Tunix unchanged.)

The Tunix venv lives outside the repo (``pip install google-tunix`` would change jalign's
packages); the exact commands that build it are at the top of benchmarks/train_step.py
(under $JALIGN_BENCH_VENVS, default ~/.cache/jalign/bench-venvs). Its python:
``--tunix-python`` or $JALIGN_BENCH_TUNIX_PYTHON. Without it the Tunix rows say
"not run" and name the command that creates it; ``--no-tunix`` leaves them out.

    .venv/bin/python benchmarks/generate.py
    .venv/bin/python benchmarks/generate.py --layers 8 --batch 16 --prompt 128 --new 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from machine import cpu_model  # benchmarks/machine.py (scripts run from benchmarks/)

import train_step as ts  # venvs, the Tunix how-to, paths
from harness import command_env, launch, run_rounds  # noqa: E402

PAD = 0
HERE = Path(__file__).resolve().parent
IMPLS = HERE / "generate_impls"
ROWS = ("jalign", "transformers", "tunix")


def export(args, d: str):
    """A random jalign Llama of the asked shape, saved as HF safetensors in ``d``, and the
    left-padded prompts (different lengths) as ``d``/prompts.npy; returns (config, lengths)."""
    from jalign.convert.hf import save_hf
    from jalign.models.build import create_model
    from jalign.models.config import LlamaConfig
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.intermediate, num_layers=args.layers,
                      num_heads=args.heads, num_kv_heads=args.kv_heads,
                      max_position_embeddings=max(1024, args.prompt + args.new),
                      bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
    save_hf(cfg, create_model(cfg, seed=0), d)
    rng = np.random.default_rng(0)
    lengths = [args.prompt - (i * args.prompt) // (2 * args.batch) for i in range(args.batch)]
    ids = np.full((args.batch, args.prompt), PAD, np.int32)
    for r, n in enumerate(lengths):  # left-padded, different lengths
        ids[r, args.prompt - n:] = rng.integers(3, args.vocab, n)
    np.save(os.path.join(d, "prompts.npy"), ids)
    return cfg, lengths


def plan(args, d: str, mode: str) -> list:
    """(key, label, command, env, reason not run) per row, for one mode."""
    common = [f"--hf-dir={d}", f"--prompts={os.path.join(d, 'prompts.npy')}", f"--pad={PAD}",
              f"--new={args.new}", f"--mode={mode}", f"--warmup={args.warmup}",
              f"--threads={args.threads}"]
    py = sys.executable
    here_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    tunix_cmd = [args.tunix_python, str(IMPLS / "tunix_sampler_worker.py")] + common + (
        ["--rope-theta-from-config"] if args.tunix_rope_theta_from_config else [])
    tunix_reason = None
    if not Path(args.tunix_python).exists():
        how = ts.HOWTO["tunix"].format(venv=Path(args.tunix_python).parent.parent)
        tunix_reason = f"{args.tunix_python} not found; create it: {how}"
    rows = [("jalign", "jalign", [py, str(IMPLS / "jalign_sampler_worker.py")] + common,
             command_env(dict(os.environ, PYTHONPATH=str(ts.REPO))), None),
            ("transformers", "transformers", [py, str(IMPLS / "torch_sampler_worker.py")]
             + common, here_env, None),
            ("tunix", "Tunix", tunix_cmd, here_env, tunix_reason)]
    return ts.select(rows, args.only, ROWS)


def run_mode(args, d: str, mode: str, logs: Path) -> tuple[list, dict]:
    workers, skipped = [], {}
    for key, label, cmd, env, reason in plan(args, d, mode):
        t0 = time.perf_counter()
        w = launch(key, label, cmd, env, reason, logs / f"generate-{mode}-{key}.log",
                   args.start_timeout, skipped)
        if w is None:
            continue
        if w.info.get("same_prompts") is False:  # a worker that re-pads saw other prompts
            w.fail(f"{label} padded the prompts differently from the driver")
            print(f"[{label}] not run: {w.error}", flush=True)
            skipped[key] = (label, w.error)
            continue
        print(f"[{mode}: {label}] ready in {time.perf_counter() - t0:.0f} s (first call "
              f"{w.info['first_call_s']:.1f} s)", flush=True)
        workers.append(w)
    run_rounds(workers, args.repeats, lambda w: 1, args.quiet_below, args.quiet_wait,
               unit=f"{mode} s/call")
    return workers, skipped


def agreement(mode: str, w, by_key: dict) -> str:
    """Greedy tokens equal: jalign vs transformers on jalign's row, else the row vs jalign."""
    other = by_key.get("transformers" if w.key == "jalign" else "jalign")
    if mode != "greedy" or other is None or w.key == "transformers":
        return ""
    a, b = np.asarray(w.info["tokens"]), np.asarray(other.info["tokens"])
    return f"{(a == b).mean():.1%}" if a.shape == b.shape else "shapes differ"


def table(results: list, args) -> None:
    print("\n| mode | implementation | median s/call | min | max | new tokens/s | jalign speed "
          "vs row | first call s (compile incl.) | greedy tokens equal | peak RSS GiB | "
          "others' CPU (cores) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, workers, skipped in results:
        by_key = {w.key: w for w in workers if w.times and not w.error}
        jal = by_key.get("jalign")
        for w in workers:
            if w.key not in by_key:
                print(f"| {mode} | {w.label} | failed: {w.error} | | | | | | | | |")
                continue
            med = statistics.median(w.times)
            ratio = f"{med / statistics.median(jal.times):.2f}x" if jal else "n/a"
            print(f"| {mode} | {w.label} | {med:.3f} | {min(w.times):.3f} | "
                  f"{max(w.times):.3f} | {args.batch * args.new / med:.0f} | {ratio} | "
                  f"{w.info['first_call_s']:.1f} | {agreement(mode, w, by_key)} | "
                  f"{w.peak_rss:.2f} | {statistics.median(w.others):.2f} |")
        for key, (label, reason) in skipped.items():
            print(f"| {mode} | {label} | not run: {reason.split('; create it')[0]} "
                  "| | | | | | | | |")
    print("\njalign speed vs row = the row's median / jalign's (>1: jalign faster); greedy "
          "tokens equal: jalign's row = jalign vs transformers, Tunix's row = Tunix vs jalign"
          + ("" if args.tunix_rope_theta_from_config else
             " (Tunix uses RoPE base 1e6, see the docstring)"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64, help="longest prompt (tokens)")
    ap.add_argument("--new", type=int, default=64, help="new tokens per row")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of one call per row")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls after the first")
    ap.add_argument("--modes", default="greedy,sampled")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--tunix-python", default=os.environ.get(
        "JALIGN_BENCH_TUNIX_PYTHON", str(ts.VENVS / "tunix" / "bin" / "python")),
                    help="python of the Tunix venv (default $JALIGN_BENCH_TUNIX_PYTHON or "
                    "$JALIGN_BENCH_VENVS/tunix/bin/python)")
    ap.add_argument("--no-tunix", action="store_true", help="leave the Tunix rows out")
    ap.add_argument("--tunix-rope-theta-from-config", action="store_true",
                    help="correctness check: Tunix rotates with the config's RoPE base "
                    "(see the docstring); not for speed comparisons")
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--quiet-below", type=float, default=0.3)
    ap.add_argument("--quiet-wait", type=float, default=5)
    ap.add_argument("--logs", default=os.environ.get(
        "JALIGN_BENCH_LOGS", str(Path(tempfile.gettempdir()) / "jalign_generate_bench")),
                    help="the workers' logs go here")
    args = ap.parse_args()
    if args.no_tunix:
        args.only = ",".join(k for k in (args.only.split(",") if args.only else ROWS)
                             if k != "tunix")
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        cfg, lengths = export(args, d)
        print(f"machine: {os.cpu_count()} cores, {cpu_model()}")
        print(f"shape: vocab {args.vocab}, hidden {args.hidden}, intermediate "
              f"{args.intermediate}, {args.layers} layers, {args.heads} q / {args.kv_heads} kv "
              f"heads ({cfg.num_params() / 1e6:.1f}M params), fp32; batch {args.batch}, "
              f"prompts of {min(lengths)}-{max(lengths)} tokens left-padded to {args.prompt}, "
              f"{args.new} new tokens per row; torch threads {args.threads}; logs in {logs}\n",
              flush=True)
        results = [(mode, *run_mode(args, d, mode, logs)) for mode in args.modes.split(",")]
    table(results, args)
    print("\nversions / settings:")
    for mode, workers, _ in results[:1]:
        for w in workers:
            keep = {k: w.info[k] for k in ("versions", "threads", "glibc_tunables", "n_params",
                                           "rope_theta_from_config") if k in w.info}
            print(f"  {w.label}: {keep}")


if __name__ == "__main__":
    main()
