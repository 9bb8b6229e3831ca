"""Worker (c): TRL's ``SFTTrainer`` (the TRL venv).

The same ``LlamaForCausalLM`` as the plain-PyTorch worker, trained by
``SFTTrainer.train()`` on an already tokenized dataset (rows of exactly ``seq`` ids, so
the collator pads nothing; every token but the first is a target). The step time is
the wall time from ``on_step_begin`` to ``on_step_end`` of a ``TrainerCallback``: it
covers ``training_step`` (TRL's ``compute_loss``: forward, loss, metrics, backward),
the optimizer step, the scheduler and ``zero_grad``. Between rounds the callback blocks
on the driver (see common.py), outside the timed interval.

Settings that keep it comparable: ``max_grad_norm=0`` (no clipping), AdamW with the
shared hyper-parameters, constant lr, no logging/saving/evaluation, fp32, CPU,
``torch.set_num_threads(threads)``. The optimizer is Trainer's default (``optim``
left unset), reported in the ready message.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ADAMW, Gate, batch_ids, flops_per_step, worker_args  # noqa: E402
from torch_worker import hf_model  # noqa: E402


def toy_tokenizer(vocab: int, split_words: bool = False):
    """A word-level tokenizer with ``vocab`` entries, built in memory: SFTTrainer wants
    a processing class (for the pad token) and nothing may be downloaded.

    ``split_words``: a tokenizer for text, for trainers that tokenize strings themselves
    (DPOTrainer): token i is the word ``toy_words(vocab)[i]``, words are split on
    whitespace, so ``" ".join(words[i] for i in ids)`` encodes to exactly ``ids``. (Its
    special tokens are not "t0".."t3": special tokens match inside words, "t2210" would
    become [2, unk].)"""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if not split_words:
        tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t3"))
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", bos_token="t1",
                                       eos_token="t2", unk_token="t3")
    words = toy_words(vocab)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[3]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=words[0], bos_token=words[1],
                                   eos_token=words[2], unk_token=words[3])


def toy_words(vocab: int) -> list[str]:
    """The words of ``toy_tokenizer(vocab, split_words=True)``, by id (ids 0-3: pad, bos,
    eos, unk)."""
    return ["<pad>", "<s>", "</s>", "<unk>"] + [f"t{i}" for i in range(4, vocab)]


def main():
    args = worker_args()
    import datasets
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    model = hf_model(args)
    ids = batch_ids(args.batch, args.seq, args.vocab)
    rows = [ids[i % args.batch].tolist() for i in range(args.batch * (args.max_steps + 1))]
    dataset = datasets.Dataset.from_dict({"input_ids": rows})
    out_dir = tempfile.mkdtemp(prefix="trl_bench_")
    config = SFTConfig(
        output_dir=out_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=ADAMW["lr"], adam_beta1=ADAMW["b1"],
        adam_beta2=ADAMW["b2"], adam_epsilon=ADAMW["eps"], weight_decay=ADAMW["weight_decay"],
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
        max_length=args.seq, packing=False, logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, bf16=False,
        fp16=False, dataloader_num_workers=0, seed=0, dataset_num_proc=None)
    info = dict(name="TRL SFTTrainer",
                versions=dict(trl=trl.__version__, torch=torch.__version__,
                              transformers=transformers.__version__,
                              datasets=datasets.__version__),
                threads=torch.get_num_threads(), optim=str(config.optim),
                attn_implementation=model.config._attn_implementation,
                n_params=sum(p.numel() for p in model.parameters()),
                flops=flops_per_step(args.vocab, args.hidden, args.intermediate, args.layers,
                                     args.heads, args.kv_heads, args.batch, args.seq))
    gate = Gate(args.warmup, info)

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, optimizer=None, **kw):
            opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
            if opt is not None:
                d = opt.defaults
                info["optimizer_class"] = (f"{type(opt).__module__}.{type(opt).__name__}"
                                           f"(fused={d.get('fused')}, foreach={d.get('foreach')}, "
                                           f"betas={d.get('betas')}, eps={d.get('eps')}, "
                                           "param-group weight_decay="
                                           f"{sorted({g['weight_decay'] for g in opt.param_groups})})")

        def on_step_begin(self, a, state, control, **kw):
            gate.begin()

        def on_step_end(self, a, state, control, **kw):
            gate.end()

    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=toy_tokenizer(args.vocab), callbacks=[Timer()])
    original = trainer.training_step

    def training_step(model, inputs, *a, **kw):
        if "input_shape" not in info:
            info["input_shape"] = list(inputs["input_ids"].shape)
            info["labels_trainable"] = int((inputs["labels"][:, 1:] != -100).sum())
            info["input_keys"] = sorted(inputs)
        loss = original(model, inputs, *a, **kw)
        info.setdefault("first_loss", float(loss))
        return loss

    trainer.training_step = training_step
    trainer.train()
    gate.chan.exit()


if __name__ == "__main__":
    main()
