"""Worker (a): jalign's jitted SFT train step (jalign's own venv).

One step = ``make_train_step(recipe.loss_fn, ...)`` of the SFT recipe on a donated state,
built as a run builds it, blocked on the loss.
Every token but the first of each row is a target (loss_mask all ones; sft_loss drops
position 0's mask because nothing predicts it).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ADAMW, batch_ids, flops_per_step, serve, worker_args  # noqa: E402


def build(args, scan_layers: bool, *, recipe=None, batch=None, **cfg_overrides):
    """A namespace with cfg, mesh, models, tx, state (sharded), state_sharding, step
    (jitted, donating) and batch (on device).

    Defaults: the SFT recipe (``sft_loss`` on the policy) on ``batch_ids``. ``recipe``
    (jalign.algos) / ``batch`` (numpy dict, leading dim ``args.batch``) replace them; the
    state holds the recipe's roles as a run builds them (a DPO reference: a frozen copy
    of the initial policy, its own buffers, read by the step)."""
    import types

    import jax
    import numpy as np

    from jalign import sources
    from jalign.algos import sft
    from jalign.losses.sft import SFTConfig
    from jalign.models.config import LlamaConfig
    from jalign.sharding import DEFAULT_RULES, MeshConfig, make_mesh
    from jalign.train.optimizer import OptimizerConfig
    from jalign.train.roles import RunModels
    from jalign.train.state_init import abstract_train_state, build_optimizer, fresh_state
    from jalign.train.step import make_train_step

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.intermediate, num_layers=args.layers,
                      num_heads=args.heads, num_kv_heads=args.kv_heads,
                      max_position_embeddings=max(4096, args.seq), scan_layers=scan_layers,
                      **cfg_overrides)
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    recipe = recipe or sft.recipe(SFTConfig())
    models = RunModels(recipe.roles, {r.name: cfg for r in recipe.roles})
    opt_cfg = OptimizerConfig(name="adamw", learning_rate=ADAMW["lr"], schedule="constant",
                              b1=ADAMW["b1"], b2=ADAMW["b2"], eps=ADAMW["eps"],
                              weight_decay=ADAMW["weight_decay"], clip_norm=None,
                              warmup_steps=0)
    tx, _ = build_optimizer(opt_cfg, models, total_steps=args.max_steps)
    _, sh = abstract_train_state(models, tx, mesh, DEFAULT_RULES)
    records = {r.name: {"source": None if r.like else "random", "seed": 0}
               for r in models.roles}
    initial = sources.InitialModels(models, records, gin_config=cfg, overrides={}, mesh=mesh)
    state = fresh_state(models, initial, tx, 0, sh)
    initial.clear()
    step = make_train_step(recipe.loss_fn, tx, models, mesh=mesh, state_sharding=sh,
                           global_batch=args.batch)
    if batch is None:
        ids = batch_ids(args.batch, args.seq, args.vocab).astype(np.int32)
        batch = {"input_ids": ids, "loss_mask": np.ones_like(ids),
                 "segment_ids": np.ones_like(ids),
                 "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32),
                                              ids.shape).copy()}
    batch = jax.device_put(batch)
    return types.SimpleNamespace(cfg=cfg, mesh=mesh, models=models, tx=tx, state=state,
                                 state_sharding=sh, step=step, batch=batch)


def serve_step(b, name: str, flops: dict, warmup: int, **extra_info):
    """Compile ``b.step`` ahead of time and serve it (common.serve): one step = the
    compiled step on the donated state, blocked on the loss."""
    import jax
    import jaxlib

    cfg, step, state, batch = b.cfg, b.step, b.state, b.batch
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    box = {"state": state}
    losses = []

    def one_step():
        box["state"], metrics = compiled(box["state"], batch)
        losses.append(float(jax.block_until_ready(metrics["loss"])))

    info = dict(
        name=name,
        versions=dict(jax=jax.__version__, jaxlib=jaxlib.__version__,
                      flax=__import__("flax").__version__, optax=__import__("optax").__version__),
        devices=str(jax.devices()), compile_s=compile_s,
        xla_flops=float(cost.get("flops", -1)) if cost else -1,
        n_params=cfg.num_params(), ld_preload=os.environ.get("LD_PRELOAD", ""),
        flops=flops, **extra_info,
    )
    info["first_loss"] = None

    def warm_step():
        one_step()
        if info["first_loss"] is None:
            info["first_loss"] = losses[0]

    serve(warm_step, warmup, info)


def main():
    def extra(ap):
        ap.add_argument("--scan", action="store_true", help="scan_layers=True (default: unrolled)")
        ap.add_argument("--attention", default="auto",
                       help="LlamaConfig.attention_impl (default: the library's, auto)")

    args = worker_args(extra)
    b = build(args, args.scan, attention_impl=args.attention)
    serve_step(b, f"jalign ({'scan' if args.scan else 'unrolled'}, {args.attention} attention)",
               flops_per_step(args.vocab, args.hidden, args.intermediate, args.layers,
                              args.heads, args.kv_heads, args.batch, args.seq), args.warmup)


if __name__ == "__main__":
    main()
