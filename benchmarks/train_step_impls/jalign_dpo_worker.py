"""DPO worker: jalign's jitted DPO train step with the reference inside it (jalign's venv).

The DPO recipe (``DPOConfig(beta, "sigmoid")``, reference in the step): the frozen
reference role (a copy of the initial policy, its own buffers) in ``TrainState.fixed``,
read by the step: one jitted, donating call per step runs the
policy's forward + backward over the 2 x pairs sequences (chosen and rejected in one
batch), the reference's forward over the same sequences, the loss and AdamW. Timed like
the SFT worker (jalign_worker.serve_step): blocked on the loss.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DPO_BETA, DPO_PROMPT, dpo_flops_per_step, pair_ids, worker_args  # noqa: E402
from jalign_worker import build, serve_step  # noqa: E402


def dpo_batch(args) -> dict:
    """jalign's DPO batch (numpy int32, [pairs, seq] each) from common.pair_ids: loss mask 1
    on the response tokens only, one segment, positions 0..seq-1."""
    import numpy as np

    prompt, chosen, rejected = pair_ids(args.batch, args.prompt, args.seq, args.vocab)
    mask = np.zeros((args.batch, args.seq), np.int32)
    mask[:, args.prompt:] = 1
    ones = np.ones((args.batch, args.seq), np.int32)
    pos = np.broadcast_to(np.arange(args.seq, dtype=np.int32), ones.shape).copy()
    batch = {}
    for side, resp in (("chosen", chosen), ("rejected", rejected)):
        batch[f"{side}_input_ids"] = np.concatenate([prompt, resp], axis=1).astype(np.int32)
        batch[f"{side}_loss_mask"] = mask
        batch[f"{side}_segment_ids"] = ones
        batch[f"{side}_positions"] = pos
    return batch


def main():
    args = worker_args(lambda ap: (
        ap.add_argument("--scan", action="store_true", help="scan_layers=True (default: unrolled)"),
        ap.add_argument("--prompt", type=int, default=DPO_PROMPT, help="prompt tokens per pair")))
    import jax

    from jalign.algos import dpo
    from jalign.losses.dpo import DPOConfig

    config = DPOConfig(beta=DPO_BETA, loss_type="sigmoid")
    b = build(args, args.scan, recipe=dpo.recipe(config), batch=dpo_batch(args))
    # The state is donated: the reference must not share a buffer with the policy.
    pol = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(b.state.params)}
    ref = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(b.state.fixed[dpo.REFERENCE])}
    if pol & ref:
        raise SystemExit(f"{len(pol & ref)} reference buffers alias the policy's")
    serve_step(b, f"jalign DPO ({'scan' if args.scan else 'unrolled'})",
               dpo_flops_per_step(args.vocab, args.hidden, args.intermediate, args.layers,
                                  args.heads, args.kv_heads, args.batch, args.seq),
               args.warmup, dpo_config=str(config),
               input_shape=[2 * args.batch, args.seq],
               response_tokens=int(dpo_batch(args)["chosen_loss_mask"][:, 1:].sum() * 2))


if __name__ == "__main__":
    main()
