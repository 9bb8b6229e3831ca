"""GRPO worker: one iteration of Tunix's ``GRPOLearner`` (the Tunix venv).

Tunix's NNX ``Llama3`` at the benchmark shape (``tunix_worker.build_model``: float32,
untied head, every matrix re-drawn N(0, 0.02^2)) is the actor of an ``RLCluster`` with
no reference model (``reference=None``; with ``beta`` 0 Tunix never asks for one) and
Tunix's own ("vanilla") rollout engine, ``tunix.generate.sampler.Sampler``. Actor and
rollout are given the same one-device mesh, so Tunix shares one model between them (no
weight sync). ``GRPOLearner.train()`` runs on the benchmark's text prompts
(``common.grpo_prompt_texts``, ``args.prompts`` per batch) with
``common.even_word_reward`` wrapped as a Tunix reward function
(``fn(prompts, completions, **kw) -> list[float]``).

Settings, TRL / jalign name -> Tunix: G -> ``GRPOConfig.num_generations``; one update per
generation -> ``num_iterations`` 1 and no mini/micro batches (the whole batch is one
optimizer step); the token-level ("dapo") loss -> ``loss_agg_mode='token-mean'``; clip
0.2 -> ``epsilon`` 0.2 (``epsilon_high`` unset: the same bound); beta 0 -> ``beta`` 0.0;
group advantages -> ``advantage_estimator='grpo'`` (group mean and std, ddof 1,
+1e-6); sampling -> ``RolloutConfig(max_tokens_to_generate=completion, temperature=1,
top_p=1.0, top_k=None)`` (Tunix's plain categorical draw over the whole vocabulary;
``top_p=None`` would mean greedy), ``max_prompt_length`` = the prompt length and a KV
cache of prompt + completion slots; AdamW -> ``optax.adamw`` with ``common.ADAMW``.

The tokenizer is a small word tokenizer written here (the Tunix venv has no
transformers, so trl_worker.toy_tokenizer cannot be built; Tunix's ``TokenizerAdapter``
takes any object with encode/decode/bos_id/eos_id/pad_id): word "tN" is id N, ids 0-3
are pad/bos/eos/unk as in the toy tokenizer, decoding skips them, and ``bos_id()`` is
None so Tunix's sampler prepends nothing: every prompt is exactly its ``prompt_len``
ids, as in the other rows.

Timing: one iteration is one ``GRPOLearner._run_global_step`` (wrapped: ``gate.begin()``
before, ``gate.end()`` after; between rounds the worker blocks on the driver there,
outside the timed interval). Inside it Tunix prepares the data on its one-thread
executor (the generation, rewards, advantages) while the main thread waits on the
queue (actor and rollout share a mesh, so Tunix does not overlap the two), then runs
``RLCluster.update_actor`` (the actor trainer's jitted step; its ``train`` ends with the
throttler's ``wait_for_all``, so the step has finished when it returns). Phases
(wrapping Tunix's methods): ``sample`` = ``RLCluster.generate`` (tokenizing, one call
of the sampler on the prompts each repeated G times by the learner: G prefills per
prompt, then the decode ``while_loop``, decoding the text), ``reward`` =
``_compute_rewards`` (the reward manager), ``score`` = the rest of
``_generate_and_compute_advantage`` (padding the completions, masks, advantages; with
beta 0 and one iteration Tunix computes neither reference nor old log-probs), ``update`` =
``update_actor`` (loss, backward, AdamW, Tunix's metric buffering), ``other`` = the rest
(the queue, trajectory ids, metric buffering between).

Differences from the other rows that stay: Tunix's sampler draws with a fixed key
(PRNGKey(0) when ``RolloutConfig.seed`` is None, which the learner passes unchanged every
time) folded with the decoding step, so every iteration reuses the same random stream
(the rows of a group still differ, and the weights change between iterations, so the
samples drift apart slowly; timing depends on it only through where a row samples EOS);
its decode attends over all KV-cache slots at every step (jalign's group sampler reads
only the slots filled so far, in up to 4 segments; TRL's cache grows); its prefill projects the LM head on every prompt position; its GRPO loss
projects the head on every position too, then slices the completion's, and computes the
entropy of every completion position from the full logits for its metrics; advantages
divide by the group's std (ddof 1) + 1e-6; a sampled pad id (0) is masked out of the
loss. The row runs without the glibc malloc tunables of the ``jalign`` row (like the TRL
row and "jalign (stock glibc malloc)").
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ADAMW, GRPO_CLIP, Gate, even_word_reward, grpo_args,  # noqa: E402
                    grpo_flops, grpo_prompt_texts, worker_args)
from tunix_worker import build_model  # noqa: E402

PAD, BOS, EOS, UNK = 0, 1, 2, 3  # the ids of trl_worker.toy_tokenizer's special tokens


class WordTokenizer:
    """Word "tN" <-> id N (N >= 4), whitespace-split; the interface Tunix's
    ``TokenizerAdapter`` accepts for a tokenizer that is neither SentencePiece nor
    Hugging Face. ``bos_id()`` is None: Tunix's sampler then prepends no BOS."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def encode(self, text: str, **kw) -> list[int]:
        out = []
        for w in text.split():
            i = int(w[1:]) if w[:1] == "t" and w[1:].isdigit() else UNK
            out.append(i if 4 <= i < self.vocab else UNK)
        return out

    def decode(self, ids, **kw) -> str:
        return " ".join(f"t{int(i)}" for i in ids if int(i) >= 4)

    def bos_id(self):
        return None

    def eos_id(self) -> int:
        return EOS

    def pad_id(self) -> int:
        return PAD


def main():
    args = worker_args(grpo_args)
    args.seq = args.prompt_len + args.completion
    import jax
    import jaxlib
    import numpy as np
    import optax

    import tunix
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    model, params = build_model(args)
    tx = optax.adamw(ADAMW["lr"], b1=ADAMW["b1"], b2=ADAMW["b2"], eps=ADAMW["eps"],
                     weight_decay=ADAMW["weight_decay"])
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rollout_config = base_rollout.RolloutConfig(
        max_tokens_to_generate=args.completion, temperature=1.0, top_p=1.0, top_k=None,
        max_prompt_length=args.prompt_len, kv_cache_size=args.seq)
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                      rl_cluster_lib.Role.ROLLOUT: mesh},
        rollout_engine="vanilla", offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=tx, eval_every_n_steps=10**9, max_steps=args.max_steps,
            max_inflight_computations=1, pbar_description=None),
        rollout_config=rollout_config)
    cluster = rl_cluster_lib.RLCluster(actor=model, reference=None,
                                       tokenizer=WordTokenizer(args.vocab),
                                       cluster_config=cluster_config)
    algo = grpo_learner.GRPOConfig(
        num_generations=args.group, num_iterations=1, beta=0.0, epsilon=GRPO_CLIP,
        loss_agg_mode="token-mean", advantage_estimator="grpo", policy_loss_fn="grpo")

    def reward(prompts, completions, **kw):
        return even_word_reward(completions)

    learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo,
                                       reward_fns=[reward])
    prompts = grpo_prompt_texts(args.prompts * (args.max_steps + 2), args.prompt_len,
                                args.vocab)

    def data():  # a batch is a dict of arrays (a list would be a pytree of leaves)
        for i in range(0, len(prompts), args.prompts):
            yield {"prompts": np.array(prompts[i:i + args.prompts])}

    rows = args.prompts * args.group
    info = dict(name="Tunix GRPOLearner",
                versions=dict(tunix=tunix.__version__, jax=jax.__version__,
                              jaxlib=jaxlib.__version__, flax=__import__("flax").__version__,
                              optax=optax.__version__),
                devices=str(jax.devices()),
                n_params=int(sum(np.prod(p.shape) for p in jax.tree.leaves(params))),
                loss_type=algo.loss_agg_mode, input_shape=[rows, args.seq],
                reference_model="reference" in cluster.inference_worker._models,
                weight_sync=learner.should_sync_weights,
                async_rollout=learner.can_enable_async_rollout,
                flops=grpo_flops(args.vocab, args.hidden, args.intermediate, args.layers,
                                 args.heads, args.kv_heads, rows, args.prompt_len,
                                 args.completion))
    gate = Gate(args.warmup, info)

    timed = gate.timed

    def count_tokens(out):
        gate.phases["completion_tokens"] = float(sum(len(t) for t in out.tokens))
        info.setdefault("prompt_tokens", sorted({int((row != PAD).sum())
                                                 for row in out.left_padded_prompt_tokens}))
        info.setdefault("first_response_length",
                        float(np.mean([len(t) for t in out.tokens])))

    cluster.generate = timed("sample", cluster.generate, count_tokens)
    learner._compute_rewards = timed("reward", learner._compute_rewards)
    learner._generate_and_compute_advantage = timed(
        "generate_and_score", learner._generate_and_compute_advantage)
    cluster.update_actor = timed("update", cluster.update_actor)
    run_global_step = learner._run_global_step

    def iteration(*a, **kw):
        gate.begin()
        out = run_global_step(*a, **kw)
        p = gate.phases
        total = time.perf_counter() - gate._t
        p["score"] = (p.pop("generate_and_score", 0.0) - p.get("sample", 0.0)
                      - p.get("reward", 0.0))
        p["other"] = total - sum(p.get(k, 0.0) for k in ("sample", "reward", "score", "update"))
        gate.end()  # may block on the driver (between rounds)
        return out

    learner._run_global_step = iteration
    learner.train(data())
    gate.chan.exit()


if __name__ == "__main__":
    main()
