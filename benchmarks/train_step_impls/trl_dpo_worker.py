"""DPO worker: TRL's ``DPOTrainer`` (the TRL venv).

The SFT benchmark's ``LlamaForCausalLM`` (torch_worker.hf_model) as the policy and a
second, identical instance (same seed: same weights, its own tensors) as ``ref_model``,
with ``precompute_ref_log_probs=False``: the reference forward runs inside every step's
``compute_loss``. DPOTrainer only takes text, so the pairs of common.pair_ids are written
as strings of words for the toy word-level tokenizer (trl_worker.toy_tokenizer), which
encodes them back to exactly those ids (checked on the first collated batch:
input_ids [2 x pairs, seq], chosen rows first, response mask on the last seq - prompt
positions). Sequential sampler: every step trains on the same pairs, in order.

Step time: ``on_step_begin`` -> ``on_step_end`` of a ``TrainerCallback``, as for SFT; it
covers ``training_step`` (DPOTrainer.compute_loss: the policy's forward with TRL's fused
LM head, the reference model's forward under no_grad, the loss, TRL's per-step metrics;
then backward), the optimizer step, the scheduler and ``zero_grad``.

Settings: sigmoid loss, beta 0.1, fp32 (bf16=False), ``max_grad_norm=0`` (no clipping),
AdamW with the shared hyper-parameters, constant lr, no logging/saving/evaluation,
``torch.set_num_threads(threads)``. TRL trainer configs turn gradient checkpointing on by
default; it is off here (``--gradient-checkpointing`` turns it on) so that TRL does the
same arithmetic as the others (no recomputed forward).
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ADAMW, DPO_BETA, DPO_PROMPT, Gate, dpo_flops_per_step,  # noqa: E402
                    pair_ids, worker_args)
from torch_worker import hf_model  # noqa: E402
from trl_worker import toy_tokenizer, toy_words  # noqa: E402


def main():
    args = worker_args(lambda ap: (
        ap.add_argument("--prompt", type=int, default=DPO_PROMPT, help="prompt tokens per pair"),
        ap.add_argument("--gradient-checkpointing", action="store_true",
                        help="TRL's default (recomputes the policy forward in backward)")))
    import datasets
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    model = hf_model(args)
    ref_model = hf_model(args)  # same seed: the initial policy, separate tensors
    prompt, chosen, rejected = pair_ids(args.batch, args.prompt, args.seq, args.vocab)

    vocab_words = toy_words(args.vocab)

    def words(ids):
        return " ".join(vocab_words[i] for i in ids)

    n_rows = args.batch * (args.max_steps + 1)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(n_rows):
        rows["prompt"].append(words(prompt[i % args.batch]))
        rows["chosen"].append(" " + words(chosen[i % args.batch]))
        rows["rejected"].append(" " + words(rejected[i % args.batch]))
    dataset = datasets.Dataset.from_dict(rows)
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_dpo_bench_"), max_steps=args.max_steps,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        learning_rate=ADAMW["lr"], adam_beta1=ADAMW["b1"], adam_beta2=ADAMW["b2"],
        adam_epsilon=ADAMW["eps"], weight_decay=ADAMW["weight_decay"],
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
        max_length=args.seq, loss_type=["sigmoid"], beta=DPO_BETA, label_smoothing=0.0,
        precompute_ref_log_probs=False, sync_ref_model=False,
        gradient_checkpointing=args.gradient_checkpointing,
        train_sampling_strategy="sequential", logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, bf16=False,
        fp16=False, dataloader_num_workers=0, seed=0, dataset_num_proc=None)
    info = dict(name="TRL DPOTrainer",
                versions=dict(trl=trl.__version__, torch=torch.__version__,
                              transformers=transformers.__version__,
                              datasets=datasets.__version__),
                threads=torch.get_num_threads(), optim=str(config.optim),
                gradient_checkpointing=config.gradient_checkpointing,
                attn_implementation=model.config._attn_implementation,
                n_params=sum(p.numel() for p in model.parameters()),
                flops=dpo_flops_per_step(args.vocab, args.hidden, args.intermediate,
                                         args.layers, args.heads, args.kv_heads, args.batch,
                                         args.seq))
    gate = Gate(args.warmup, info)

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, model=None, optimizer=None, **kw):
            opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
            if opt is not None:
                d = opt.defaults
                info["optimizer_class"] = (f"{type(opt).__module__}.{type(opt).__name__}"
                                           f"(fused={d.get('fused')}, foreach={d.get('foreach')}, "
                                           f"betas={d.get('betas')}, eps={d.get('eps')})")
            if model is not None:
                info["policy_gradient_checkpointing"] = bool(getattr(
                    model, "is_activation_checkpointing",  # transformers >= 5.x name
                    getattr(model, "is_gradient_checkpointing", False)))

        def on_step_begin(self, a, state, control, **kw):
            gate.begin()

        def on_step_end(self, a, state, control, **kw):
            gate.end()

    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=dataset,
                         processing_class=toy_tokenizer(args.vocab, split_words=True),
                         callbacks=[Timer()])
    info["ref_model_separate"] = trainer.ref_model is not None and trainer.ref_model is not model
    original = trainer.compute_loss

    def compute_loss(model, inputs, *a, **kw):
        if "input_shape" not in info:  # the first batch: check it is exactly the pairs
            ids, cm = inputs["input_ids"].numpy(), inputs["completion_mask"].numpy()
            resp = args.seq - args.prompt
            want_ids = [list(p) + list(c) for p, c in zip(prompt, chosen)] + \
                       [list(p) + list(r) for p, r in zip(prompt, rejected)]
            if ids.tolist() != want_ids or cm[:, :args.prompt].any() or not cm[:, -resp:].all() \
                    or not inputs["attention_mask"].numpy().all():
                raise SystemExit("TRL's collated batch is not the benchmark's pairs")
            info["input_shape"] = list(ids.shape)
            info["response_tokens"] = int(cm[:, 1:].sum())
            info["input_keys"] = sorted(inputs)
        loss = original(model, inputs, *a, **kw)
        info.setdefault("first_loss", float(loss.detach()))
        return loss

    trainer.compute_loss = compute_loss
    trainer.train()
    gate.chan.exit()


if __name__ == "__main__":
    main()
