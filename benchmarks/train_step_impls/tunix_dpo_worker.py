"""DPO worker: Tunix's ``DPOTrainer`` on Tunix's NNX Llama 3 (the Tunix venv).

Policy and reference are two ``tunix_worker.build_model`` instances (same weights, own
arrays). The pairs of common.pair_ids go in already tokenized, as a
``tunix.sft.dpo.dpo_trainer.TrainingInput`` (prompt [pairs, prompt], chosen and rejected
[pairs, seq - prompt], all-ones masks), the same one every step. ``DPOTrainingConfig``:
algorithm "dpo", beta 0.1, label smoothing 0 (= the sigmoid loss), ``optax.adamw`` with
the shared hyper-parameters, ``max_inflight_computations=1``.

How Tunix runs a step: ``_prepare_inputs`` concatenates chosen and rejected behind the
prompt, builds the [2 x pairs, seq, seq] attention mask and positions, and runs the
reference model's forward as its own jitted call (``compute_logps``); then the jitted
train step (policy forward + backward + AdamW), then metric buffering/writing.

Timing: the worker wraps ``_prepare_inputs``; each call first waits until the previous
train step's loss is ready (Tunix's own throttler, ``wait_for_all``), and the time between
consecutive calls is one step: reference forward, input preparation, train step,
Tunix's per-step bookkeeping, the next batch. (Without that wait Tunix would dispatch the
next step's reference forward while the train step still runs; on this machine both
would compete for the same 2 cores.) Between rounds the worker blocks on the driver
inside the wrapper, before the next step's reference forward: outside the timed interval.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ADAMW, DPO_BETA, DPO_PROMPT, Gate, dpo_flops_per_step,  # noqa: E402
                    pair_ids, worker_args)
from tunix_worker import build_model  # noqa: E402


def main():
    args = worker_args(lambda ap: ap.add_argument("--prompt", type=int, default=DPO_PROMPT,
                                                  help="prompt tokens per pair"))
    import jax
    import jaxlib
    import numpy as np
    import optax

    import tunix
    from tunix.sft import hooks
    from tunix.sft.dpo import dpo_trainer

    model, params = build_model(args)
    ref_model, _ = build_model(args)  # the initial policy, its own arrays
    tx = optax.adamw(ADAMW["lr"], b1=ADAMW["b1"], b2=ADAMW["b2"], eps=ADAMW["eps"],
                     weight_decay=ADAMW["weight_decay"])
    config = dpo_trainer.DPOTrainingConfig(
        algorithm="dpo", beta=DPO_BETA, label_smoothing=0.0, eval_every_n_steps=10**9,
        max_steps=args.max_steps, max_inflight_computations=1, pbar_description=None)
    trainer = dpo_trainer.DPOTrainer(model, ref_model, tx, config)
    prompt, chosen, rejected = (x.astype(np.int32) for x in
                                pair_ids(args.batch, args.prompt, args.seq, args.vocab))
    example = dpo_trainer.TrainingInput(
        prompt_ids=prompt, prompt_mask=np.ones_like(prompt),
        chosen_ids=chosen, chosen_mask=np.ones_like(chosen),
        rejected_ids=rejected, rejected_mask=np.ones_like(rejected))

    def data():
        while True:
            yield example

    info = dict(name="Tunix DPOTrainer",
                versions=dict(tunix=tunix.__version__, jax=jax.__version__,
                              jaxlib=jaxlib.__version__, flax=__import__("flax").__version__,
                              optax=optax.__version__),
                devices=str(jax.devices()),
                n_params=int(sum(np.prod(p.shape) for p in jax.tree.leaves(params))),
                lora=trainer._lora_enabled, ref_model_separate=trainer._ref_model_exists,
                flops=dpo_flops_per_step(args.vocab, args.hidden, args.intermediate,
                                         args.layers, args.heads, args.kv_heads, args.batch,
                                         args.seq))
    gate = Gate(args.warmup, info)
    prepare = trainer._prepare_inputs
    started = []

    def timed_prepare(x):
        trainer._throttler.wait_for_all()  # the previous train step has finished
        if started:
            gate.end()  # may block on the driver (between rounds)
        started.append(True)
        gate.begin()
        out = prepare(x)
        if "input_shape" not in info:
            info["input_shape"] = list(out.input_ids.shape)
            info["response_tokens"] = int(np.asarray(out.completion_mask).sum())
            info["ref_logps_in_step"] = out.ref_chosen_logps is not None
        return out

    trainer._prepare_inputs = timed_prepare

    class FirstLoss(hooks.TrainingHooks):
        def on_train_start(self, ctx):
            pass

        def on_train_end(self, ctx):
            pass

        def on_train_step_start(self, ctx):
            pass

        def on_train_step_end(self, ctx, step, loss):  # Tunix reports step k-1's loss
            info.setdefault("first_loss", float(loss))

        def on_eval_step_start(self, ctx):
            pass

        def on_eval_step_end(self, ctx, loss):
            pass

    trainer.with_training_hooks(FirstLoss())
    trainer.train(data())
    gate.chan.exit()


if __name__ == "__main__":
    main()
