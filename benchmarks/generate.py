"""Sampling throughput: jalign's KV-cache sampler vs transformers' ``generate`` and Tunix's sampler.

All run on CPU in float32 with the *same* weights: a randomly initialised jalign Llama is
exported with ``jalign.convert.hf.save_hf`` and loaded into ``LlamaForCausalLM`` and (by
Tunix's own safetensors loader) into Tunix's NNX ``Llama3``. Each
generates ``--new`` tokens for ``--batch`` left-padded prompts of different lengths (up
to ``--prompt`` tokens), greedy and sampled (temperature 1, top-k off), with EOS disabled
so every row generates the full length on both sides (transformers: ``min_new_tokens``;
jalign: an EOS id no token takes). jalign: ``jalign.rl.generate.generate`` (prefill, then
one cached decode step per token inside one jitted ``lax.while_loop``; compile excluded
and reported); transformers: ``model.generate(..., use_cache=True)`` under
``torch.inference_mode()`` with ``--threads`` intra-op threads; Tunix:
``tunix.generate.sampler.Sampler.__call__`` (jitted prefill, then a jitted
``lax.while_loop`` of cached decode steps; greedy = temperature 0, sampled = temperature
1 with top_p 1.0 and no top-k) in a worker process in the Tunix virtual environment,
benchmarks/generate_impls/tunix_sampler_worker.py (details there: the prompts it sees are
the same left-padded array, EOS is disabled the same way, the timed interval is its whole
public call; its first call of each mode, compile included, is reported like jalign's).
Repeats rotate the order of the implementations so the machine's noise hits all of them;
the table shows median seconds per call and new tokens/s (batch x new / median), and the
greedy tokens' agreement: on jalign's row jalign vs transformers, on Tunix's row Tunix vs
jalign. (Tunix 0.1.7's Llama3 rotates with RoPE base 1e6 whatever its config says, so
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
import json
import os
import queue
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py (scripts run from benchmarks/)

import jax
import numpy as np
import torch
import transformers

from jalign.convert.hf import save_hf
from jalign.models.build import create_model
from jalign.models.config import LlamaConfig
from jalign.rl.generate import generate

PAD, NO_EOS = 0, -1
HERE = Path(__file__).resolve().parent
VENVS = Path(os.environ.get("JALIGN_BENCH_VENVS",
                            Path.home() / ".cache" / "jalign" / "bench-venvs"))
TUNIX_HOWTO = ("python3.11 -m venv {venv} && {venv}/bin/pip install --upgrade pip && "
               "{venv}/bin/pip install jax==0.10.2 flax==0.12.8 optax==0.2.8 && {venv}/bin/pip "
               "install --no-deps google-tunix && {venv}/bin/pip install -c "
               "tunix-constraints.txt google-metrax jaxtyping tqdm huggingface_hub "
               "sentencepiece pillow perfetto pandas 'safetensors<0.8' (tunix-constraints.txt "
               "and the exact commands: the top of benchmarks/train_step.py)")


class TunixWorker:
    """benchmarks/generate_impls/tunix_sampler_worker.py in the Tunix venv: started once,
    then one sampler call per ``call``. Any failure sets ``error`` (the rows then say
    "not run: <error>") instead of raising."""

    def __init__(self, python: str, hf_dir: str, prompts: str, new: int, pad: int,
                 rope_fix: bool, log_path: Path, timeout: float):
        self.error, self.info, self.timeout = None, {}, timeout
        self.log_path = log_path
        cmd = [python, str(HERE / "generate_impls" / "tunix_sampler_worker.py"),
               f"--hf-dir={hf_dir}", f"--prompts={prompts}", f"--new={new}", f"--pad={pad}"]
        if rope_fix:
            cmd.append("--rope-theta-from-config")
        self.log = open(log_path, "w")
        self.log.write("$ " + " ".join(cmd) + "\n")
        self.log.flush()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        msg = self._wait("ready")
        if msg is not None:
            self.info = msg["info"]

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("@@"):
                self.lines.put(json.loads(line[2:]))
        self.lines.put(None)

    def _wait(self, event: str):
        try:
            msg = self.lines.get(timeout=self.timeout)
        except queue.Empty:
            msg = None
            self.error = f"no '{event}' from the worker after {self.timeout:.0f} s"
        if msg is not None and msg.get("event") == event:
            return msg
        if self.error is None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            self.log.flush()
            tail = [ln for ln in self.log_path.read_text(errors="replace").splitlines()
                    if ln.strip()]
            self.error = (f"worker exited (rc {self.proc.returncode}): "
                          f"{tail[-1][:200] if tail else 'no output'} (log: {self.log_path})")
        self.stop()
        return None

    def call(self, greedy: bool, seed: int):
        """(seconds of the sampler call, new tokens [batch, new]) or None on failure."""
        if self.error:
            return None
        try:
            self.proc.stdin.write(f"run {'greedy' if greedy else 'sampled'} {seed}\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        msg = self._wait("result")
        if msg is None:
            return None
        if not msg["same_prompts"]:
            self.error = "Tunix padded the prompts differently from the driver"
            self.stop()
            return None
        return msg["seconds"], np.asarray(msg["tokens"])

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("exit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


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
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--tunix-python", default=os.environ.get(
        "JALIGN_BENCH_TUNIX_PYTHON", str(VENVS / "tunix" / "bin" / "python")),
                    help="python of the Tunix venv (default $JALIGN_BENCH_TUNIX_PYTHON or "
                    "$JALIGN_BENCH_VENVS/tunix/bin/python)")
    ap.add_argument("--no-tunix", action="store_true", help="leave the Tunix rows out")
    ap.add_argument("--tunix-rope-theta-from-config", action="store_true",
                    help="correctness check: Tunix rotates with the config's RoPE base "
                    "(see the docstring); not for speed comparisons")
    ap.add_argument("--tunix-timeout", type=float, default=600,
                    help="seconds to wait for the Tunix worker's start and for each call")
    ap.add_argument("--logs", default=os.environ.get(
        "JALIGN_BENCH_LOGS", str(Path(tempfile.gettempdir()) / "jalign_generate_bench")),
                    help="the Tunix worker's log goes here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.intermediate, num_layers=args.layers,
                      num_heads=args.heads, num_kv_heads=args.kv_heads,
                      max_position_embeddings=max(1024, args.prompt + args.new),
                      bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
    model = create_model(cfg, seed=0)
    tmp = tempfile.TemporaryDirectory()  # the exported weights; Tunix loads them too
    d = tmp.name
    save_hf(cfg, model, d)
    hf = transformers.LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()

    rng = np.random.default_rng(0)
    lengths = [args.prompt - (i * args.prompt) // (2 * args.batch) for i in range(args.batch)]
    ids = np.full((args.batch, args.prompt), PAD, np.int32)
    mask = np.zeros_like(ids)
    for r, n in enumerate(lengths):  # left-padded, different lengths
        ids[r, args.prompt - n:] = rng.integers(3, args.vocab, n)
        mask[r, args.prompt - n:] = 1
    t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    tunix, tunix_reason = None, None
    if not args.no_tunix:
        if not Path(args.tunix_python).exists():
            venv = Path(args.tunix_python).parent.parent
            tunix_reason = (f"{args.tunix_python} not found; create it: "
                            f"{TUNIX_HOWTO.format(venv=venv)}")
        else:
            logs = Path(args.logs)
            logs.mkdir(parents=True, exist_ok=True)
            np.save(os.path.join(d, "prompts.npy"), ids)
            tunix = TunixWorker(args.tunix_python, d, os.path.join(d, "prompts.npy"), args.new,
                                PAD, args.tunix_rope_theta_from_config,
                                logs / "tunix_sampler.log", args.tunix_timeout)
            if tunix.error:
                tunix_reason = tunix.error
        if tunix_reason:
            print(f"[Tunix sampler] not run: {tunix_reason}\n", flush=True)

    def run_jalign(greedy: bool, seed: int):
        out = generate(model, ids, mask, max_new_tokens=args.new, rng=jax.random.key(seed),
                       greedy=greedy, eos_id=NO_EOS, pad_id=PAD)
        return np.asarray(jax.block_until_ready(out["tokens"]))

    def run_torch(greedy: bool, seed: int):
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = hf.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=args.new,
                              min_new_tokens=args.new, do_sample=not greedy, top_k=0,
                              temperature=1.0, top_p=1.0, use_cache=True, pad_token_id=PAD,
                              eos_token_id=None)
        return out[:, args.prompt:].numpy()

    print(f"machine: {os.cpu_count()} cores, {cpu_model()}; jax {jax.__version__}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}")
    if tunix is not None and not tunix.error:
        v = tunix.info["versions"]
        print(f"Tunix worker: tunix {v['tunix']}, jax {v['jax']}, flax {v['flax']} "
              f"({args.tunix_python}); Tunix Llama3 loaded from the same exported safetensors "
              f"({tunix.info['n_params'] / 1e6:.1f}M params, {tunix.info['load_s']:.1f} s)"
              + ("; RoPE base patched to the config's (correctness check)"
                 if args.tunix_rope_theta_from_config else ""))
    print(f"shape: vocab {args.vocab}, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"{args.layers} layers, {args.heads} q / {args.kv_heads} kv heads "
          f"({cfg.num_params() / 1e6:.1f}M params), fp32; batch {args.batch}, prompts of "
          f"{min(lengths)}-{max(lengths)} tokens left-padded to {args.prompt}, {args.new} new "
          f"tokens per row; torch threads {args.threads}\n")
    def run_tunix(greedy: bool, seed: int):
        r = tunix.call(greedy, seed)
        return None if r is None else r[1]

    impls = [("jalign", run_jalign), ("transformers", run_torch)]
    if tunix is not None and not tunix.error:
        impls.append(("Tunix", run_tunix))
    rows = []
    for mode, greedy in (("greedy", True), ("sampled", False)):
        t0 = time.perf_counter()
        first = run_jalign(greedy, 0)
        compile_s = {"jalign": time.perf_counter() - t0}
        run_torch(greedy, 0)  # warm up torch too
        tunix_first = None
        if len(impls) > 2:
            r = tunix.call(greedy, 0)  # Tunix's compile call (timed inside the worker)
            if r is not None:
                compile_s["Tunix"], tunix_first = r
        times = {name: [] for name, _ in impls}
        for i in range(args.repeats):
            k = i % len(impls)
            for name, fn in impls[k:] + impls[:k]:  # rotate the order every repeat
                if name == "Tunix":  # the worker's own clock: the sampler call only
                    r = tunix.call(greedy, i + 1)
                    if r is not None:
                        times[name].append(r[0])
                    continue
                t0 = time.perf_counter()
                fn(greedy, i + 1)
                times[name].append(time.perf_counter() - t0)
        agree = {}
        if greedy:
            agree["jalign"] = f"{(first == run_torch(True, 0)).mean():.1%}"
            if tunix_first is not None and tunix_first.shape == first.shape:
                agree["Tunix"] = f"{(tunix_first == first).mean():.1%}"
        j = statistics.median(times["jalign"])
        for name, _ in impls:
            if name == "Tunix" and tunix.error:
                rows.append((mode, name, None, tunix.error))
                continue
            med = statistics.median(times[name])
            comp = f"{compile_s[name]:.1f} s" if name in compile_s else ""
            rows.append((mode, name, (med, min(times[name]), args.batch * args.new / med,
                                      comp, agree.get(name, "")), None))
            if name != "jalign":
                print(f"{mode}: jalign / {name} new tokens/s = {med / j:.2f}x", flush=True)
        if tunix_reason:
            rows.append((mode, "Tunix", None, tunix_reason))
    if tunix is not None:
        tunix.stop()
    tmp.cleanup()
    print("\n| mode | implementation | median s/call | min s/call | new tokens/s | "
          "first call (compile incl.) | greedy tokens equal |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for mode, name, vals, reason in rows:
        if vals is None:
            print(f"| {mode} | {name} | not run: {reason.split('; create it')[0]} | | | | |")
            continue
        med, lo, tps, comp, agree_txt = vals
        print(f"| {mode} | {name} | {med:.3f} | {lo:.3f} | {tps:.0f} | {comp} | {agree_txt} |")
    if any(name == "Tunix" and vals for _, name, vals, _ in rows):
        print("\ngreedy tokens equal: jalign's row = jalign vs transformers, Tunix's row = "
              "Tunix vs jalign" + ("" if args.tunix_rope_theta_from_config else
                                   " (Tunix uses RoPE base 1e6, see the docstring)"))


if __name__ == "__main__":
    main()
