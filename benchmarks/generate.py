"""Sampling throughput: jalign's KV-cache sampler vs transformers' ``generate`` (PyTorch).

Both run on CPU in float32 with the *same* weights: a randomly initialised jalign Llama is
exported with ``jalign.convert.hf.save_hf`` and loaded into ``LlamaForCausalLM``. Each
generates ``--new`` tokens for ``--batch`` left-padded prompts of different lengths (up
to ``--prompt`` tokens), greedy and sampled (temperature 1, top-k off), with EOS disabled
so every row generates the full length on both sides (transformers: ``min_new_tokens``;
jalign: an EOS id no token takes). jalign: ``jalign.rl.generate.generate`` (prefill, then
one cached decode step per token inside one jitted ``lax.while_loop``; compile excluded
and reported); transformers: ``model.generate(..., use_cache=True)`` under
``torch.inference_mode()`` with ``--threads`` intra-op threads. Repeats alternate between
the two so the machine's noise hits both; the table shows median seconds per call and new
tokens/s (batch x new / median), and the greedy tokens' agreement between the two.

Tunix's sampler is not measured yet (a worker in its own virtual environment is needed,
as in benchmarks/train_step.py).

    .venv/bin/python benchmarks/generate.py
    .venv/bin/python benchmarks/generate.py --layers 8 --batch 16 --prompt 128 --new 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.intermediate, num_layers=args.layers,
                      num_heads=args.heads, num_kv_heads=args.kv_heads,
                      max_position_embeddings=max(1024, args.prompt + args.new),
                      bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
    model = create_model(cfg, seed=0)
    with tempfile.TemporaryDirectory() as d:
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
    print(f"shape: vocab {args.vocab}, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"{args.layers} layers, {args.heads} q / {args.kv_heads} kv heads "
          f"({cfg.num_params() / 1e6:.1f}M params), fp32; batch {args.batch}, prompts of "
          f"{min(lengths)}-{max(lengths)} tokens left-padded to {args.prompt}, {args.new} new "
          f"tokens per row; torch threads {args.threads}\n")
    rows = []
    for mode, greedy in (("greedy", True), ("sampled", False)):
        t0 = time.perf_counter()
        first = run_jalign(greedy, 0)
        compile_s = time.perf_counter() - t0
        run_torch(greedy, 0)  # warm up torch too
        times = {"jalign": [], "transformers": []}
        for i in range(args.repeats):
            for name, fn in (("jalign", run_jalign), ("transformers", run_torch))[::1 if i % 2 == 0 else -1]:
                t0 = time.perf_counter()
                fn(greedy, i + 1)
                times[name].append(time.perf_counter() - t0)
        agree = ""
        if greedy:
            same = (first == run_torch(True, 0)).mean()
            agree = f"{same:.1%}"
        for name in ("jalign", "transformers"):
            med = statistics.median(times[name])
            rows.append((mode, name, med, min(times[name]), args.batch * args.new / med,
                         f"{compile_s:.1f} s" if name == "jalign" else "", agree))
        j = statistics.median(times["jalign"])
        t = statistics.median(times["transformers"])
        print(f"{mode}: jalign / transformers new tokens/s = {t / j:.2f}x", flush=True)
    print("\n| mode | implementation | median s/call | min s/call | new tokens/s | "
          "first call (compile incl.) | greedy tokens equal |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for mode, name, med, lo, tps, comp, agree in rows:
        print(f"| {mode} | {name} | {med:.3f} | {lo:.3f} | {tps:.0f} | {comp} | "
              f"{agree if name == 'jalign' else ''} |")


if __name__ == "__main__":
    main()
