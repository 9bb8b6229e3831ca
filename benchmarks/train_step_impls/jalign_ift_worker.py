"""Worker: jalign's jitted IFT train step (``--algo ift``; jalign's own venv).

The SFT worker's model, batch (every token but the first a target), optimizer and
sharding, with the IFT recipe (``IFTConfig()``: λ 0.2, γ 0.95, per-sequence weights) as
the loss: one step = pass 1 (forward, no gradient, greedy tokens) + pass 2 (forward and
backward on the mixed embeddings) + the update, inside one jitted, donating step.
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import flops_per_step, ift_flops_per_step, worker_args  # noqa: E402
from jalign_worker import build, serve_step  # noqa: E402


def main():
    args = worker_args(lambda ap: ap.add_argument("--scan", action="store_true",
                                                  help="scan_layers=True (default: unrolled)"))
    from jalign.algos import ift
    from jalign.losses.ift import IFTConfig
    config = IFTConfig()
    b = build(args, args.scan, recipe=ift.recipe(config))
    shape = (args.vocab, args.hidden, args.intermediate, args.layers, args.heads,
             args.kv_heads, args.batch, args.seq)
    serve_step(b, f"jalign IFT ({'scan' if args.scan else 'unrolled'})",
               ift_flops_per_step(flops_per_step(*shape)), args.warmup,
               ift_config=dataclasses.asdict(config))


if __name__ == "__main__":
    main()
