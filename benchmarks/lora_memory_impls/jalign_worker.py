"""jalign SFT train steps in one mode (full, lora, int8, nf4) at one shape; prints one
JSON line: peak resident memory (``ru_maxrss``) after the steps, the process's peak before
the model was built (imports), the state's parts in bytes, and the compiled step's memory
analysis (arguments, outputs, aliased, scratch). ``--abstract``: no arrays at all, only the
step compiled for the shapes (what a model too big for this machine would need).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import peak_rss, reset_peak, status  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["full", "lora", "int8", "nf4"], required=True)
    for k, v in dict(vocab=8192, hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=8,
                     head_dim=0, batch=4, seq=512, rank=16, block=64, steps=3).items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--abstract", action="store_true")
    ap.add_argument("--scan", action="store_true", help="layers under lax.scan (else unrolled)")
    ap.add_argument("--hf", default=None,
                    help="read the base from this HF checkpoint (quantised while read); "
                         "default: a random model")
    args = ap.parse_args()

    import jax
    import numpy as np

    from jalign import sources
    from jalign.losses.sft import sft_loss
    from jalign.models.config import LlamaConfig
    from jalign.models.lora import LoraConfig
    from jalign.sharding import DEFAULT_RULES, MeshConfig, make_mesh
    from jalign.train.optimizer import OptimizerConfig
    from jalign.train.recipe import custom
    from jalign.train.roles import ADAPTERS, ALL, Role, RunModels
    from jalign.train.state_init import abstract_train_state, build_optimizer, fresh_state
    from jalign.train.step import make_train_step

    before = peak_rss()
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.intermediate, num_layers=args.layers,
                      num_heads=args.heads, num_kv_heads=args.kv_heads,
                      head_dim=args.head_dim or None, tie_word_embeddings=args.tied,
                      max_position_embeddings=max(4096, args.seq), scan_layers=args.scan)
    if args.hf:  # the checkpoint's own config (the same shape), as load_hf reads it
        from pathlib import Path

        from jalign.convert.hf import read_hf_config
        cfg = read_hf_config(Path(args.hf), scan_layers=args.scan)
    lora = None
    if args.mode != "full":
        lora = LoraConfig(rank=args.rank, alpha=2.0 * args.rank,
                          quantize=None if args.mode == "lora" else args.mode,
                          block_size=args.block)
    trained_cfg = cfg.replace(lora=lora)
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    # One policy role: its adapters train (LoRA/QLoRA), or all of it (full).
    models = RunModels((Role("policy", trains=ALL if lora is None else ADAPTERS),),
                       {"policy": trained_cfg})
    opt = OptimizerConfig(name="adamw", learning_rate=1e-4, schedule="constant", b2=0.95,
                          clip_norm=None, warmup_steps=0)
    tx, _ = build_optimizer(opt, models, 1000)
    abstract, sh = abstract_train_state(models, tx, mesh, DEFAULT_RULES)
    step = make_train_step(custom(sft_loss).loss_fn, tx, models, mesh=mesh, state_sharding=sh,
                           global_batch=args.batch)
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
    batch = {"input_ids": ids, "loss_mask": np.ones_like(ids), "segment_ids": np.ones_like(ids),
             "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), ids.shape).copy()}
    batch_abs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    t0 = time.time()
    compiled = step.lower(abstract, batch_abs).compile()
    ma = compiled.memory_analysis()
    out = {"mode": args.mode, "params": cfg.num_params(), "compile_seconds": time.time() - t0,
           "analysis": {k: int(getattr(ma, k)) for k in (
               "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
               "temp_size_in_bytes")}}

    def nbytes(tree):
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))

    out["state_bytes"] = {"trained": nbytes(abstract.params), "base": nbytes(abstract.fixed),
                          "optimizer": nbytes(abstract.opt_state)}
    out["trained_params"] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    if not args.abstract:
        # The run's own path: the base read from its source (an hf: base quantised while
        # read), fresh adapters attached, the base donated into the state.
        source = f"hf:{args.hf}" if args.hf else "random"
        initial = sources.InitialModels(models, {"policy": {"source": source, "seed": 0}},
                                        gin_config=cfg, overrides={"scan_layers": args.scan}
                                        if args.hf else {}, mesh=mesh)
        state = fresh_state(models, initial, tx, 0, sh)
        initial.clear()
        batch = jax.device_put(batch)
        import gc
        gc.collect()
        out["rss_state"] = status("VmRSS")  # the state (and the compiled step) resident
        reset_peak()
        times, losses = [], []
        for _ in range(args.steps):
            t = time.time()
            state, m = compiled(state, batch)
            losses.append(float(m["loss"]))
            times.append(time.time() - t)
        out.update(losses=losses, step_seconds=times, rss_steps_peak=status("VmHWM"))
    out.update(rss_before=before, rss_peak=peak_rss())
    print("@@" + json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
