"""GRPO worker: one iteration of TRL's ``GRPOTrainer`` (the TRL venv).

The benchmark's ``LlamaForCausalLM`` (torch_worker.hf_model, float32, SDPA) trained by
``GRPOTrainer.train()`` on the benchmark's text prompts (the toy word tokenizer, so each
prompt is exactly its words' ids) with ``common.even_word_reward`` as the reward
function. One trainer step is one GRPO iteration: ``per_device_train_batch_size`` =
prompts x G completions, ``steps_per_generation`` 1 and ``num_iterations`` 1 (every step
generates: TRL's ``_generate_and_score_completions`` then ``compute_loss``, backward,
AdamW), TRL's own generation backend (``model.generate`` on CPU: no vLLM, no continuous
batching), ``loss_type='dapo'`` (TRL's default), clip 0.2, ``beta`` 0 (no reference model),
``scale_rewards='group'``, temperature 1, top_p 1, top_k 0, gradient checkpointing off
(TRL's configs turn it on by default; the other implementations recompute nothing).

Phases (wrapping the trainer's methods): ``sample`` = ``_generate_single_turn``
(``generate`` on the prompts, each already repeated G times by TRL's sampler: G prefills
per prompt), ``reward`` = ``_calculate_rewards``, ``score`` = the rest of
``_generate_and_score_completions`` (tokenizing, decoding, padding, advantages; with one
update per generation TRL computes no old log-probs), ``update`` = the rest of the step
(``compute_loss``, backward, the optimizer).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ADAMW, GRPO_CLIP, Gate, even_word_reward, grpo_args,  # noqa: E402
                    grpo_flops, grpo_prompt_texts, worker_args)
from torch_worker import hf_model  # noqa: E402
from trl_worker import toy_tokenizer  # noqa: E402


def main():
    args = worker_args(grpo_args)
    args.seq = args.prompt_len + args.completion
    import datasets
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    model = hf_model(args)
    rows = args.prompts * args.group
    prompts = grpo_prompt_texts(args.prompts * (args.max_steps + 2), args.prompt_len, args.vocab)
    dataset = datasets.Dataset.from_dict({"prompt": prompts})
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_grpo_bench_"), max_steps=args.max_steps,
        per_device_train_batch_size=rows, num_generations=args.group,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_completion_length=args.completion, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.0, epsilon=GRPO_CLIP, loss_type="dapo", scale_rewards="group",
        learning_rate=ADAMW["lr"], adam_beta1=ADAMW["b1"], adam_beta2=ADAMW["b2"],
        adam_epsilon=ADAMW["eps"], weight_decay=ADAMW["weight_decay"],
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
        gradient_checkpointing=False, shuffle_dataset=False, logging_strategy="no",
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, seed=0,
        log_completions=False)

    def reward(completions, **kw):
        return even_word_reward(completions)

    info = dict(name="TRL GRPOTrainer",
                versions=dict(trl=trl.__version__, torch=torch.__version__,
                              transformers=transformers.__version__),
                threads=torch.get_num_threads(), gradient_checkpointing=config.gradient_checkpointing,
                loss_type=config.loss_type, input_shape=[rows, args.seq],
                flops=grpo_flops(args.vocab, args.hidden, args.intermediate, args.layers,
                                 args.heads, args.kv_heads, rows, args.prompt_len,
                                 args.completion))
    gate = Gate(args.warmup, info)

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            gate.begin()

        def on_step_end(self, a, state, control, **kw):
            p = gate.phases
            total = time.perf_counter() - gate._t
            p["score"] = p.pop("generate_and_score", 0.0) - p.get("sample", 0.0) - p.get("reward", 0.0)
            p["update"] = total - p["score"] - p.get("sample", 0.0) - p.get("reward", 0.0)
            gate.end()

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=toy_tokenizer(args.vocab, split_words=True),
                          callbacks=[Timer()])

    timed = gate.timed

    def count_tokens(out):
        completion_ids = out[0]
        gate.phases["completion_tokens"] = float(sum(len(c) for c in completion_ids))
        info.setdefault("first_prompt_tokens", None)

    trainer._generate_single_turn = timed("sample", trainer._generate_single_turn, count_tokens)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer._generate_and_score_completions = timed("generate_and_score",
                                                    trainer._generate_and_score_completions)
    original_tokenize = trainer._tokenize_prompts

    def tokenize(prompts):
        out = original_tokenize(prompts)
        info.setdefault("prompt_tokens", sorted({len(ids) for ids in out[0]}))
        return out

    trainer._tokenize_prompts = tokenize
    trainer.train()
    gate.chan.exit()


if __name__ == "__main__":
    main()
