"""GRPO worker: one iteration of jalign's GRPO run (jalign's venv).

The run is opened as ``jalign train`` opens it (gin bindings: the benchmark's Llama shape,
random init, the toy word tokenizer saved to a temp directory, the prompts as a jsonl
file rendered by a template that emits the user's text only, the reward function
``common:even_word_reward_fn`` as a user reward function, ``configs/algo/dapo.gin``'s
token-level loss with clip 0.2 / 0.2 and beta 0), and one iteration is what the loop does
per step with one update per rollout: the rollout source's ``next`` (sampling G
completions per prompt from one prefill each, the reward function on the decoded text,
the scoring pass: the policy's log-probs and the group advantages) and the jitted,
donating train step, blocked on its loss. Phases: ``sample``/``reward``/``score`` as the
rollout source measures them, ``update`` the train step; ``other`` the rest (gathering
the minibatch, host work between).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ADAMW, GRPO_CLIP, grpo_args, grpo_flops, grpo_prompt_texts,  # noqa: E402
                    serve, worker_args)

# The rendered prompt is the user's text, nothing added: token for token what TRL tokenizes.
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def bindings(args, work: str, tokenizer_dir: str, data: str) -> list[str]:
    return [
        f"LlamaConfig.vocab_size = {args.vocab}", f"LlamaConfig.hidden_size = {args.hidden}",
        f"LlamaConfig.intermediate_size = {args.intermediate}",
        f"LlamaConfig.num_layers = {args.layers}", f"LlamaConfig.num_heads = {args.heads}",
        f"LlamaConfig.num_kv_heads = {args.kv_heads}", "LlamaConfig.tie_word_embeddings = False",
        "LlamaConfig.scan_layers = False",
        f"LlamaConfig.max_position_embeddings = {max(1024, args.prompt_len + args.completion)}",
        "ModelInit.source = 'random'", "MeshConfig.fsdp = 1",
        f"TrainConfig.steps = {args.max_steps}", f"TrainConfig.save_every = {args.max_steps}",
        "TrainConfig.eval_every = 0", "TrainConfig.eval_at_start = False", "TrainConfig.eval_batches = 0",
        "TrainConfig.progress = False", "TrainConfig.log_every = 1000",
        "TrainConfig.peak_flops = 1e11", f"TrainConfig.output_root = '{work}'",
        "TrainConfig.run_name = 'grpo_bench'",
        f"GRPOConfig.group_size = {args.group}", f"GRPOConfig.max_new_tokens = {args.completion}",
        f"GRPOConfig.clip_low = {GRPO_CLIP}", f"GRPOConfig.clip_high = {GRPO_CLIP}",
        "GRPOConfig.temperature = 1.0", "RewardConfig.names = ()", "RewardConfig.weights = ()",
        "RewardConfig.functions = ('common:even_word_reward_fn',)",
        f"OptimizerConfig.learning_rate = {ADAMW['lr']}", "OptimizerConfig.schedule = 'constant'",
        f"OptimizerConfig.b1 = {ADAMW['b1']}", f"OptimizerConfig.b2 = {ADAMW['b2']}",
        f"OptimizerConfig.eps = {ADAMW['eps']}",
        f"OptimizerConfig.weight_decay = {ADAMW['weight_decay']}",
        "OptimizerConfig.clip_norm = None", "OptimizerConfig.warmup_steps = 0",
        f"DataConfig.path = '{data}'", f"DataConfig.tokenizer = '{tokenizer_dir}'",
        f"DataConfig.chat_template = \"{PLAIN_TEMPLATE}\"",
        f"DataConfig.max_prompt_length = {args.prompt_len}",
        f"DataConfig.max_length = {args.prompt_len + args.completion}",
        f"DataConfig.batch_size = {args.prompts}", "DataConfig.shuffle = False",
        "DataConfig.format = 'prompt'",
    ]


def open_training(args):
    """(the loop's Training object, the temp dir) for the benchmark's GRPO run."""
    from trl_worker import toy_tokenizer

    from jalign.experiment import load_experiment
    from jalign.train.loop import Training
    from jalign.train.run import open_run

    work = tempfile.mkdtemp(prefix="jalign_grpo_bench_")
    tok_dir = os.path.join(work, "tokenizer")
    toy_tokenizer(args.vocab, split_words=True).save_pretrained(tok_dir)
    data = os.path.join(work, "prompts.jsonl")
    with open(data, "w") as f:
        for text in grpo_prompt_texts(args.prompts * (args.max_steps + 2), args.prompt_len,
                                      args.vocab):
            f.write(json.dumps({"prompt": [{"role": "user", "content": text}]}) + "\n")
    exp = load_experiment(["configs/algo/dapo.gin", "configs/hw/cpu.gin"],
                          bindings(args, work, tok_dir, data))
    run = open_run(exp.recipe, exp.configs, operative=exp.operative)
    return Training(run, None), work


def main():
    args = worker_args(grpo_args)
    import jax

    from jalign.train.loop import _global_batch

    t0 = time.perf_counter()
    tr, _ = open_training(args)
    setup_s = time.perf_counter() - t0
    seen = {}

    def iteration():
        t0 = time.perf_counter()
        batch = tr.source.next(tr.state)
        m = tr.source.step_metrics()
        t1 = time.perf_counter()
        tr.state, metrics = tr.step_fn(tr.state, _global_batch(batch, tr.data_sh))
        loss = float(jax.block_until_ready(metrics["loss"]))
        t2 = time.perf_counter()
        seen.setdefault("first_loss", loss)
        seen["response_length"] = m["response_length"]
        seen["reward"] = m["reward"]
        phases = {"sample": m["sample_seconds"], "reward": m["reward_seconds"],
                  "score": m["score_seconds"], "update": t2 - t1}
        phases["other"] = (t2 - t0) - sum(phases.values())
        phases["completion_tokens"] = m["response_length"] * tr.source.rows
        return phases

    rows = args.prompts * args.group
    info = dict(name="jalign GRPO", setup_s=setup_s,
                versions=dict(jax=jax.__version__, flax=__import__("flax").__version__),
                devices=str(jax.devices()), input_shape=[rows, args.prompt_len + args.completion],
                flops=grpo_flops(args.vocab, args.hidden, args.intermediate, args.layers,
                                 args.heads, args.kv_heads, rows, args.prompt_len,
                                 args.completion))

    def warm():
        out = iteration()
        info.update(first_loss=seen["first_loss"], first_response_length=seen["response_length"],
                    first_reward=seen["reward"])
        return out

    serve(warm, args.warmup, info)


if __name__ == "__main__":
    main()
