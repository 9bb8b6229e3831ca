"""Worker (d): Tunix's ``PeftTrainer`` on Tunix's own NNX Llama 3 (the Tunix venv).

``tunix.models.llama3.model.Llama3`` (untied LM head, same shape as the others) is
trained full-parameter (no LoRA) by ``PeftTrainer.train()`` with Tunix's default loss
(``_default_loss_fn``: log-softmax times one-hot targets, every token but the first).
Positions and the causal mask are built inside the jitted step by the model-input
function, with ``tunix.sft.utils``' own helpers.

Timing: ``max_inflight_computations=1``, so the trainer blocks on step k-1's loss
before it starts step k; the time between consecutive ``on_train_step_start`` hooks is
then one whole step (dispatch, compute, Tunix's metric buffering, the next batch). The
hook blocks on the driver between rounds, outside the timed interval.

Tunix's Llama initialises the MLP weights to zeros; the worker re-draws every matrix
from a normal distribution (std 0.02) so the step does the same arithmetic on the same
kind of values as the others (timing does not depend on it, the loss does).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ADAMW, Gate, batch_ids, flops_per_step, worker_args  # noqa: E402


def build_model(args):
    """(Tunix Llama3 of the benchmark shape with every matrix re-drawn N(0, 0.02^2), its
    nnx.Param state). Deterministic: two calls give equal weights in separate arrays."""
    import jax
    from flax import nnx
    from tunix.models.llama3 import model as llama3

    cfg = llama3.ModelConfig(num_layers=args.layers, vocab_size=args.vocab,
                             embed_dim=args.hidden, hidden_dim=args.intermediate,
                             num_heads=args.heads, head_dim=args.hidden // args.heads,
                             num_kv_heads=args.kv_heads, rope_theta=10000, norm_eps=1e-5,
                             weight_tying=False)
    model = llama3.Llama3(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
    params = jax.tree.map(
        lambda p: (jax.random.normal(next(keys), p.shape, p.dtype) * 0.02 if p.ndim >= 2 else p),
        params)
    nnx.update(model, params)
    return model, params


def main():
    args = worker_args()
    import jax
    import jaxlib
    import numpy as np
    import optax

    import tunix
    from tunix.sft import hooks, peft_trainer
    from tunix.sft import utils as sft_utils

    model, params = build_model(args)
    tx = optax.adamw(ADAMW["lr"], b1=ADAMW["b1"], b2=ADAMW["b2"], eps=ADAMW["eps"],
                     weight_decay=ADAMW["weight_decay"])
    config = peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=args.max_steps,
                                         max_inflight_computations=1, pbar_description=None)
    trainer = peft_trainer.PeftTrainer(model, tx, config)

    def gen_model_input(x: peft_trainer.TrainingInput):
        mask = x.input_mask
        return {"input_tokens": x.input_tokens, "input_mask": mask,
                "positions": sft_utils.build_positions_from_mask(mask),
                "attention_mask": sft_utils.make_causal_attn_mask(mask)}

    trainer = trainer.with_gen_model_input_fn(gen_model_input)
    ids = batch_ids(args.batch, args.seq, args.vocab).astype(np.int32)
    example = peft_trainer.TrainingInput(input_tokens=ids, input_mask=np.ones(ids.shape, bool))

    def data():
        while True:
            yield example

    info = dict(name="Tunix PeftTrainer",
                versions=dict(tunix=tunix.__version__, jax=jax.__version__,
                              jaxlib=jaxlib.__version__, flax=__import__("flax").__version__,
                              optax=optax.__version__),
                devices=str(jax.devices()),
                n_params=int(sum(np.prod(p.shape) for p in jax.tree.leaves(params))),
                lora=trainer._lora_enabled,
                flops=flops_per_step(args.vocab, args.hidden, args.intermediate, args.layers,
                                     args.heads, args.kv_heads, args.batch, args.seq))
    gate = Gate(args.warmup, info)

    class Timer(hooks.TrainingHooks):
        started = False

        def on_train_start(self, ctx):
            pass

        def on_train_end(self, ctx):
            pass

        def on_train_step_start(self, ctx):
            if self.started:  # the previous step has finished (max_inflight=1)
                gate.end()
            self.started = True
            gate.begin()

        def on_train_step_end(self, ctx, step, loss):
            info.setdefault("first_loss", float(loss))

        def on_eval_step_start(self, ctx):
            pass

        def on_eval_step_end(self, ctx, loss):
            pass

    trainer.with_training_hooks(Timer())
    trainer.train(data())
    gate.chan.exit()


if __name__ == "__main__":
    main()
