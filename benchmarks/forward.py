"""Forward-pass throughput: jalign's Llama (JAX) vs transformers' LlamaForCausalLM (PyTorch).

Both run on CPU in float32 with the *same* weights: a randomly initialised jalign model
(Llama-3.2-1B shape, fewer layers) is exported with ``jalign.convert.hf.save_hf`` and
loaded into transformers. The script first checks that both produce the same logits, then
times ``input_ids [batch, seq] -> logits [batch, seq, vocab]``, alternating jalign and
torch repeats so machine noise hits both, and prints median seconds per forward,
tokens/s and the jalign/torch throughput ratio.

jalign is jitted the NNX way (``nnx.split`` + ``jax.jit`` over ``nnx.merge``); compile
time is reported separately and excluded from the timings. torch runs eagerly under
``torch.inference_mode()`` with ``--threads`` intra-op threads; XLA's CPU backend uses
all cores (it has no equivalent knob here).

Run from the repo root:

    .venv/bin/python benchmarks/forward.py
    .venv/bin/python benchmarks/forward.py --layers 4 --batch 2 --seq 256 --repeats 10
    .venv/bin/python benchmarks/forward.py --backbone-only   # time without the LM head
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py (scripts run from benchmarks/)

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from jalign.convert.hf import save_hf
from jalign.models.build import create_model
from jalign.models.config import preset


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--backbone-only", action="store_true",
                    help="time the final-norm hidden states instead of logits (no LM head)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()

    config = preset("llama3_2_1b", num_layers=args.layers)
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}, jax {jax.__version__} "
          f"({jax.default_backend()}, {len(jax.devices())} device), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print(f"model: llama3_2_1b shape, {config.num_layers} layers, vocab {config.vocab_size}, "
          f"float32; input batch {args.batch} x seq {args.seq}")

    # Same weights on both sides: build jalign, export to HF, load into transformers.
    model = create_model(config, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(config, model, Path(tmp) / "hf")
        hf = transformers.LlamaForCausalLM.from_pretrained(
            Path(tmp) / "hf", dtype=torch.float32).eval()

    ids_np = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq))
    ids_jax = jnp.asarray(ids_np, jnp.int32)
    ids_torch = torch.from_numpy(ids_np).long()

    graphdef, state = nnx.split(model)
    del model

    @jax.jit
    def jalign_logits(state, ids):
        return nnx.merge(graphdef, state)(ids)

    @jax.jit
    def jalign_hidden(state, ids):
        return nnx.merge(graphdef, state).backbone(ids)

    def torch_logits():
        with torch.inference_mode():
            return hf(input_ids=ids_torch).logits

    def torch_hidden():
        with torch.inference_mode():
            return hf.model(input_ids=ids_torch).last_hidden_state

    compile_s = timed(lambda: jalign_logits(state, ids_jax).block_until_ready())
    ours, theirs = np.asarray(jalign_logits(state, ids_jax)), torch_logits().numpy()
    diff = np.abs(ours - theirs)
    scale = np.abs(theirs).max()
    print(f"logits parity: max abs diff {diff.max():.3g} (max |logit| {scale:.3g}, relative "
          f"{diff.max() / scale:.2g}), mean abs diff {diff.mean():.3g}, argmax agreement "
          f"{(ours.argmax(-1) == theirs.argmax(-1)).mean():.4f}")
    del ours, theirs, diff

    if args.backbone_only:
        compile_s = timed(lambda: jalign_hidden(state, ids_jax).block_until_ready())
        run_jalign = lambda: jalign_hidden(state, ids_jax).block_until_ready()  # noqa: E731
        run_torch = torch_hidden
    else:
        run_jalign = lambda: jalign_logits(state, ids_jax).block_until_ready()  # noqa: E731
        run_torch = torch_logits
    print(f"jalign compile (first call, incl. one forward): {compile_s:.2f} s")

    for _ in range(args.warmup):
        run_jalign()
        run_torch()
    times = {"jalign (jax.jit)": [], "transformers (torch eager)": []}
    for _ in range(args.repeats):  # alternate so noise hits both
        times["jalign (jax.jit)"].append(timed(run_jalign))
        times["transformers (torch eager)"].append(timed(run_torch))

    tokens = args.batch * args.seq
    what = "hidden states (no LM head)" if args.backbone_only else "logits"
    print(f"\nforward -> {what}, {tokens} tokens, warmup {args.warmup}, "
          f"repeats {args.repeats} (alternated)\n")
    print("| implementation | median s/forward | min s | max s | tokens/s |")
    print("|---|---:|---:|---:|---:|")
    tps = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        tps[name] = tokens / med
        print(f"| {name} | {med:.4f} | {min(ts):.4f} | {max(ts):.4f} | {tps[name]:,.0f} |")
    jal, tor = tps.values()
    print(f"\nratio jalign/transformers tokens/s: {jal / tor:.2f}x")


if __name__ == "__main__":
    main()
