"""Rollouts as a batch source: what turns the generic training loop into RL.

At each rollout boundary the source draws a batch of left-padded prompts, samples
``group_size`` responses per prompt with the current policy (``jalign.rl.generate``; each
prompt prefilled once), scores the responses (``jalign.rl.rewards``: reward functions on
the decoded text and/or a reward model on the tokens), and then runs one jitted pass over
prompt + response that computes what the algorithm's loss trains on (``score_rows``, a
subclass's): for PPO (``RolloutSource``) the policy's log-probs (the "old" ones, by the
same code as the training forward), the reference's log-probs, the values, the
KL-penalised per-token rewards, GAE advantages and returns; for the GRPO family
(``jalign.rl.group_rollout``) group-relative advantages. The rollout stays on the devices; the loop then draws ``epochs`` ×
``minibatches`` minibatches from it (rows shuffled per epoch by a key of the rollout),
each one ordinary step of the generic train step.

Rows: ``[prompt (left-padded, P) | response (N = max_new_tokens, pad after EOS)]``;
``segment_ids`` 1 on real tokens, 0 on padding; per-token arrays are aligned with the
targets (index t is token t+1), so ``response_mask`` marks the response tokens.

The state saved with a checkpoint (prompt position, steps drawn, KL coefficient) is
complete only at a rollout boundary, where the next rollout is a pure function of it
and the policy: the loop saves only there (``at_boundary``), and PPO's steps and save
interval are multiples of epochs × minibatches. Keys come from ``TrainConfig.seed`` and
the rollout's index, so a resumed run samples exactly what an uninterrupted one would.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jalign.errors import ConfigError
from jalign.losses.ppo import explained_variance, response_log_probs
from jalign.rl.advantages import clip_scores, gae, masked_mean, whiten
from jalign.rl.generate import decode_text, make_generate_fn, sampling_params
from jalign.rl.kl import AdaptiveKLController, FixedKLController, penalized_rewards
from jalign.rl.rewards import REWARDS, RewardModelScorer, combined_rewards
from jalign.train.source import BatchSource

STATE_VERSION = 1
_SAMPLE, _SHUFFLE = 0, 1  # fold_in tags under a rollout's key
# The roles a rollout reads (jalign.algos.ppo names them).
POLICY, VALUE, REFERENCE = "policy", "value", "reference"


def prompt_length(data) -> int:
    """Tokens of a left-padded prompt row given the prompts' ``DataConfig``."""
    return data.max_prompt_length or data.max_length - 1


def row_length(data, config) -> int:
    """Tokens of a rollout row: the prompt and ``max_new_tokens`` after it."""
    return prompt_length(data) + config.max_new_tokens


def kl_controller(config):
    if config.kl_target is None:
        return FixedKLController(config.kl_coef)
    return AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)


def check_config(config, train_config, data_config) -> None:
    """Problems knowable before anything is loaded (ConfigError naming the binding)."""
    name = type(config).__name__
    per = config.steps_per_rollout
    what = f"{name}.epochs × {name}.minibatches = {per}"
    if train_config.steps % per:
        raise ConfigError(f"TrainConfig.steps={train_config.steps} must be a multiple of {what} "
                          "(a run ends at a rollout boundary)")
    if train_config.save_every % per:
        raise ConfigError(f"TrainConfig.save_every={train_config.save_every} must be a multiple "
                          f"of {what}: a checkpoint is exact only at a rollout boundary")
    group = getattr(config, "group_size", 1)
    rows = data_config.batch_size * group
    what = (f"DataConfig.batch_size={data_config.batch_size} (prompts per rollout)" if group == 1
            else f"DataConfig.batch_size x {name}.group_size = {rows} completions per rollout")
    if rows % (config.minibatches * train_config.accum_steps):
        raise ConfigError(f"{what} must divide into {name}.minibatches={config.minibatches} × "
                          f"TrainConfig.accum_steps={train_config.accum_steps}")


class Drawn(NamedTuple):
    """A rollout's sampled completions and rewards, before the scoring pass."""

    prompt_ids: jax.Array     # [prompts, P] global, left-padded
    prompt_mask: jax.Array
    tokens: jax.Array         # [rows, N] global (rows = prompts x group size)
    token_lengths: jax.Array  # [rows]
    logprobs: jax.Array       # [rows, N]: the sampler's
    scores: np.ndarray        # [rows] what is trained on (rewards, adjusted)
    raw: np.ndarray           # [rows] the rewards
    parts: dict               # reward name -> [rows]
    lengths: np.ndarray       # [rows] on the host
    ended: np.ndarray         # [rows] ended with EOS
    sample_seconds: float
    reward_seconds: float


def sampler_mismatch(sampler_logp, trainer_logp, mask) -> dict:
    """How far the sampler's log-probs of its tokens are from the trainer's (the scoring
    pass's, same parameters): ``sampler_kl``, the k3 estimate of KL(sampler || trainer)
    per token (0 when they agree; it grows when sampling runs at another precision or
    with another kernel), and the largest |difference| of a token's log-prob."""
    on = mask > 0
    d = jnp.where(on, trainer_logp - sampler_logp, 0.0)
    return {"sampler_kl": masked_mean(jnp.exp(d) - d - 1.0, mask),
            "sampler_logp_diff_max": jnp.max(jnp.abs(d))}


def _same_on_every_process(scores: np.ndarray) -> None:
    """Every process scores all rows itself: a reward that is not a pure function of its
    inputs (randomness, a remote judge) would give the processes different rollouts. Check
    that it did not."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    from jalign.rl.reward_functions import RewardError
    every = np.asarray(multihost_utils.process_allgather(np.asarray(scores, np.float32)))
    differ = np.flatnonzero(np.any(every != every[:1], axis=0))
    if differ.size:
        raise RewardError(f"the rewards of {differ.size} rows (first: row {differ[0]}) differ "
                          "between processes: every process scores all rows, so reward "
                          "functions must return the same values for the same inputs")


def _host(x) -> np.ndarray:
    """The whole of a (possibly multi-process) array on this host."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


class Rollouts(BatchSource):
    """``BatchSource`` of RL minibatches (see the module docstring). ``config``: the
    recipe's config (``epochs``, ``minibatches``, sampling settings, ``rewards``); ``ctx``:
    a ``SourceContext`` (mesh, rules, seed, the roles). A subclass names the roles its
    scoring pass reads (``SCORED``) and computes the rows' training inputs
    (``score_rows``)."""

    SCORED: tuple[str, ...] = (POLICY,)
    group_size = 1

    def __init__(self, prompts, config, ctx, connect: bool = True):
        self.prompts = prompts  # DataIterator of left-padded prompts
        self.config = config
        self.kl = self.make_kl_controller()
        self.drawn = 0           # minibatches drawn so far (= optimizer steps)
        self._buffer = None      # the current rollout, on the devices
        self._order: list = []   # row indices of each of its minibatches
        self._pending_metrics: dict = {}
        self._compile(ctx)
        if connect:  # ``jalign plan`` builds the programs alone: no rewards, no eval data
            self._connect(ctx)

    # ------------------------------------------------------------ geometry

    def make_kl_controller(self):
        return FixedKLController(0.0)

    @property
    def prompt_rows(self) -> int:
        return self.prompts.config.batch_size

    @property
    def rows(self) -> int:
        """Completions per rollout: prompts x group_size."""
        return self.prompt_rows * self.group_size

    @property
    def prompt_length(self) -> int:
        return prompt_length(self.prompts.config)

    def batch_rows(self) -> int:
        return self.rows // self.config.minibatches

    def row_length(self) -> int:
        return row_length(self.prompts.config, self.config)

    # ------------------------------------------------------------ the batch's layout

    @staticmethod
    def extra_fields(config, models) -> dict:
        """{field: per_row} of what ``score_rows`` adds to a rollout's rows (per_row False:
        one float per target token): the subclass's."""
        raise NotImplementedError

    @classmethod
    def batch_spec(cls, config, models, rows: int, length: int) -> dict:
        """{field: ShapeDtypeStruct} of a train step's minibatch (``Recipe.batch_spec``)."""
        from jalign.train.batch_spec import float32, int32
        spec = {k: int32(rows, length) for k in ("input_ids", "segment_ids", "positions")}
        spec["response_mask"] = float32(rows, length - 1)
        for name, per_row in cls.extra_fields(config, models).items():
            spec[name] = float32(rows) if per_row else float32(rows, length - 1)
        return spec

    def total(self) -> int | None:
        prompts = self.prompts.total_batches()
        return None if prompts is None else prompts * self.config.steps_per_rollout

    def remaining(self) -> int | None:
        total = self.total()
        return None if total is None else total - self.drawn

    def at_boundary(self) -> bool:
        return self.drawn % self.config.steps_per_rollout == 0

    def waits_for_state(self) -> bool:
        """The next draw samples a rollout with the current policy."""
        return self.at_boundary()

    @property
    def stats(self) -> dict:
        return self.prompts.stats

    def describe(self) -> str:
        group = f" x {self.group_size} completions" if self.group_size > 1 else ""
        return (f"{self.prompts.batches} rollouts of {self.prompt_rows} prompts{group} "
                f"({self.prompts.stats['examples']} prompts per process, "
                f"{self.prompts.config.num_epochs} epoch(s))")

    # ------------------------------------------------------------ state

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "prompts": self.prompts.get_state(),
                "drawn": self.drawn, "kl": self.kl.get_state()}

    def set_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or "prompts" not in state:
            raise ConfigError(f"the checkpoint's data state is not a rollout state (version "
                              f"{state.get('version')}, keys {sorted(state)}): it was written "
                              "by another algorithm")
        if state["drawn"] % self.config.steps_per_rollout:
            raise ConfigError(f"the checkpoint was saved {state['drawn']} steps in, inside a "
                              f"rollout of {self.config.steps_per_rollout} steps: "
                              f"{type(self.config).__name__}."
                              "epochs or minibatches changed since")
        self.prompts.set_state(state["prompts"])
        self.drawn = int(state["drawn"])
        self.kl.set_state(state["kl"])
        self._buffer, self._order = None, []

    # ------------------------------------------------------------ compiled parts

    def _compile(self, ctx) -> None:
        """The jitted sampler, scoring pass and minibatch gather (compiled on first use)."""
        from jalign.train.step import batch_sharding

        cfg = self.config
        self.mesh, self.rules, self.models = ctx.mesh, ctx.rules, ctx.models
        self.chat = self.prompts.chat
        # With adapters the reference is the base without them (ctx.models knows).
        self.policy_def = ctx.models.graphdef(POLICY)
        self.key = jax.random.fold_in(jax.random.key(ctx.seed), 0x9E0)
        self.prompt_sh = batch_sharding(ctx.mesh, self.prompt_rows, ctx.rules)
        self.row_sh = batch_sharding(ctx.mesh, self.rows, ctx.rules)
        self.minibatch_sh = batch_sharding(ctx.mesh, self.batch_rows(), ctx.rules)
        self.replicated = NamedSharding(ctx.mesh, PartitionSpec())
        self.sampling = sampling_params(temperature=cfg.temperature, top_p=cfg.top_p,
                                        eos_id=self.chat.eos_id, pad_id=self.chat.pad_id)
        self.eos_ids = np.atleast_1d(self.chat.eos_id)
        self.sample = make_generate_fn(self.policy_def, max_new_tokens=cfg.max_new_tokens,
                                       top_k=cfg.top_k, use_top_p=cfg.top_p is not None,
                                       mesh=ctx.mesh, rules=ctx.rules,
                                       group_size=self.group_size, draw=cfg.sampler_draw)
        self.greedy = make_generate_fn(self.policy_def, max_new_tokens=cfg.max_new_tokens,
                                       greedy=True, mesh=ctx.mesh, rules=ctx.rules)
        self.score = jax.jit(self._score_pass, out_shardings=(self.row_sh, self.replicated))
        self.gather = jax.jit(lambda buf, idx: jax.tree.map(lambda x: x[idx], buf),
                              out_shardings=self.minibatch_sh)

    def _connect(self, ctx) -> None:
        """What the rollout reads beyond its programs: the reward functions and model, the
        eval prompts."""
        from jalign.train.step import batch_sharding
        cfg = self.config
        self.functions = cfg.rewards.load_functions()
        self.scorer = None
        if "reward_model" in cfg.rewards.names:
            self.scorer = RewardModelScorer.load(cfg.rewards.reward_model, mesh=ctx.mesh)
        self.eval_prompts = ctx.eval_data
        self.eval_start = ctx.eval_data.get_state() if ctx.eval_data is not None else None
        self.eval_sh = (batch_sharding(ctx.mesh, ctx.eval_data.config.batch_size, ctx.rules)
                        if ctx.eval_data is not None else None)
        self.eval_batches = ctx.eval_batches

    def _trees(self, state, names) -> dict:
        return self.models.trees(state.params, state.fixed, names)

    def _score_pass(self, trees, prompt_ids, prompt_mask, tokens, lengths, sampler_logp,
                    scores, kl_coef):
        """The rollout's per-token training inputs and its metrics, in one program."""
        from jalign.sharding import use_mesh
        if self.group_size > 1:  # each prompt's row once per completion of its group
            prompt_ids = jnp.repeat(prompt_ids, self.group_size, axis=0)
            prompt_mask = jnp.repeat(prompt_mask, self.group_size, axis=0)
        b, p = prompt_ids.shape
        n = tokens.shape[1]
        valid = jnp.arange(n)[None, :] < lengths[:, None]
        ids = jnp.concatenate([prompt_ids, tokens], axis=1)
        seg = jnp.concatenate([prompt_mask.astype(jnp.int32), valid.astype(jnp.int32)], axis=1)
        pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
        mask = jnp.concatenate([jnp.zeros((b, p - 1), jnp.float32), valid.astype(jnp.float32)],
                               axis=1)
        # The sampler's log-probs, aligned with the targets like the trainer's.
        sampled = jnp.concatenate([jnp.zeros((b, p - 1), jnp.float32),
                                   jnp.where(valid, sampler_logp, 0.0)], axis=1)
        rows = {"input_ids": ids, "segment_ids": seg, "positions": pos, "response_mask": mask}
        with use_mesh(self.mesh, self.rules):
            models = self.models.merged(trees)
            extras, metrics = self.score_rows(models, rows, sampled, scores, kl_coef)
        if "old_logp" in extras:  # else the train step compares (one step per rollout)
            metrics.update(sampler_mismatch(sampled, extras["old_logp"], mask))
        return {**rows, **extras}, metrics

    def score_rows(self, models, rows, sampler_logp, scores, kl_coef):
        """(per-row training inputs beyond ``rows``, metrics), traced inside the scoring
        pass: the subclass's algorithm."""
        raise NotImplementedError

    def log_probs(self, model, rows, entropy: bool = False):
        cfg = self.config
        return response_log_probs(model, rows["input_ids"], rows["segment_ids"], rows["positions"],
                                  temperature=cfg.temperature, chunk_tokens=cfg.chunk_tokens,
                                  entropy=entropy, **self.log_prob_options())

    def log_prob_options(self) -> dict:
        """More ``response_log_probs`` options of the scoring pass (a subclass's layout)."""
        return {}

    # ------------------------------------------------------------ drawing

    def _global(self, x, sharding=None):
        from jalign.sharding import global_rows
        return global_rows(sharding or self.prompt_sh, x)

    def _rewards(self, prompt_ids, prompt_mask, out, fields: dict, evaluation: bool = False):
        """(scores [rows] on this host, components, response lengths, ended-with-EOS);
        in ``evaluation`` also the components of ``RewardConfig.eval_names``. ``fields``:
        the prompt records' columns, one per prompt (``_fields``). A prompt with G
        completions is repeated for each."""
        ids, mask = _host(prompt_ids), _host(prompt_mask)
        tokens, lengths = _host(out["tokens"]), _host(out["lengths"])
        g = len(tokens) // len(ids)
        if g > 1:
            ids, mask = np.repeat(ids, g, axis=0), np.repeat(mask, g, axis=0)
            fields = {k: [x for x in v for _ in range(g)] for k, v in fields.items()}
        prompts = [self.chat.tokenizer.decode(row[m > 0].tolist(), skip_special_tokens=True)
                   for row, m in zip(ids, mask)]
        completions = decode_text(self.chat, tokens, lengths, self.eos_ids)
        last = tokens[np.arange(len(tokens)), np.maximum(lengths - 1, 0)]
        ended = (lengths > 0) & np.isin(last, self.eos_ids)
        reward_tokens = None
        if self.scorer is not None:
            valid = (np.arange(tokens.shape[1])[None, :] < lengths[:, None]).astype(np.int32)
            reward_tokens = (np.concatenate([ids, tokens], 1), np.concatenate([mask, valid], 1))
        rc = self.config.rewards
        scores, parts = combined_rewards(rc, prompts, completions, lengths,
                                         tokens=reward_tokens, scorer=self.scorer,
                                         fields=fields, functions=self.functions)
        for name in rc.eval_names if evaluation else ():
            parts.setdefault(name, REWARDS[name](prompts, completions, lengths, rc))
        _same_on_every_process(scores)
        return scores, parts, lengths, ended

    def _fields(self, source, batch, sharding=None) -> dict:
        """The columns of the records of a prompt batch (all hosts' rows, in row order)."""
        if "record_index" not in batch:
            return {}
        return source.record_fields(_host(self._global(batch["record_index"], sharding)))

    def _policy_for_sampling(self, trees):
        policy = trees[POLICY]
        if self.config.rollout_sharding == "replicated":
            # One gather of every weight per rollout, instead of FSDP's per decoded token.
            policy = jax.device_put(policy, self.replicated)
        return policy

    def _sample_round(self, policy, key) -> Drawn:
        """A batch of prompts, its completions and their rewards (adjusted: ``adjust``)."""
        t0 = time.perf_counter()
        batch = next(self.prompts)  # StopIteration at the end of the prompts
        prompt_ids, prompt_mask = self._global(batch["prompt_ids"]), self._global(batch["prompt_mask"])
        out = self.sample(policy, prompt_ids, prompt_mask, key, self.sampling)
        jax.block_until_ready(out["tokens"])
        t1 = time.perf_counter()
        raw, parts, lengths, ended = self._rewards(prompt_ids, prompt_mask, out,
                                                   self._fields(self.prompts, batch))
        scores = self.adjust(raw, lengths, ended)
        return Drawn(prompt_ids, prompt_mask, out["tokens"], out["lengths"], out["logprobs"],
                     scores, raw, parts, lengths, ended, t1 - t0, time.perf_counter() - t1)

    def adjust(self, scores, lengths, ended) -> np.ndarray:
        """The scores trained on, from the rewards: ``missing_eos_penalty`` subtracted from
        a completion that hit max_new_tokens without EOS."""
        penalty = self.config.missing_eos_penalty
        return scores if penalty is None else scores - np.float32(penalty) * (~ended)

    def draw(self, policy, key) -> tuple[Drawn, dict]:
        """The rollout's completions (one round of sampling here; a subclass may sample
        more and choose) and metrics about the drawing."""
        return self._sample_round(policy, key), {}

    def _rollout(self, state) -> None:
        cfg = self.config
        index = self.drawn // cfg.steps_per_rollout
        key = jax.random.fold_in(self.key, index)
        # Timed from when the policy exists (the last update done), so that
        # sample_seconds is sampling only.
        jax.block_until_ready(state.params)
        trees = self._trees(state, self.SCORED)
        d, draw_metrics = self.draw(self._policy_for_sampling(trees),
                                    jax.random.fold_in(key, _SAMPLE))
        t2 = time.perf_counter()
        scores = d.scores
        device_scores = jax.make_array_from_callback(
            scores.shape, self.row_sh, lambda i: scores[i])
        coef = self.kl.value
        self._buffer, metrics = self.score(trees, d.prompt_ids, d.prompt_mask, d.tokens,
                                           d.token_lengths, d.logprobs, device_scores,
                                           jnp.float32(coef))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        t3 = time.perf_counter()
        self.kl.update(metrics.get("kl", 0.0), self.rows)
        self._order = self.step_orders(jax.random.fold_in(key, _SHUFFLE))
        metrics.update({"reward": float(np.mean(d.raw)), "score": float(np.mean(scores)),
                        "kl_coef": coef, "response_length": float(np.mean(d.lengths)),
                        "ended_with_eos": float(np.mean(d.ended)), "rollout": index + 1,
                        "sample_seconds": d.sample_seconds, "reward_seconds": d.reward_seconds,
                        "score_seconds": t3 - t2, **draw_metrics})
        metrics.update({f"reward_{name}": float(np.mean(v)) for name, v in d.parts.items()})
        self._pending_metrics = metrics

    def step_orders(self, shuffle) -> list[np.ndarray]:
        """The rollout's rows of each of its train steps: every epoch a permutation (keyed
        by ``shuffle`` and the epoch) cut into ``minibatches`` steps."""
        cfg, mb = self.config, self.batch_rows()
        order = []
        for epoch in range(cfg.epochs):
            perm = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle, epoch), self.rows))
            order += [perm[i * mb:(i + 1) * mb] for i in range(cfg.minibatches)]
        return order

    def next(self, state) -> dict:
        if self.at_boundary() or self._buffer is None:
            if not self.at_boundary():
                raise RuntimeError("a rollout source resumed inside a rollout")
            self._rollout(state)
        idx = self._order[self.drawn % self.config.steps_per_rollout]
        self.drawn += 1
        batch = self.gather(self._buffer, jnp.asarray(idx))
        if self.at_boundary():
            self._buffer = None  # the next draw samples a new rollout
        return batch

    def step_metrics(self) -> dict:
        """The rollout's metrics, with the first step trained on it (then nothing)."""
        out, self._pending_metrics = self._pending_metrics, {}
        return out

    # ------------------------------------------------------------ planning

    def planned_programs(self, state) -> dict:
        """{name: ``jalign.program_spec.ProgramSpec``} of the rollout's own programs, for ``jalign
        plan``: the sampler (prefill and the token loop, ``max_new_tokens`` decode steps,
        each reading the weights every chip multiplies by — whole after an FSDP gather, its
        share under tensor parallelism — and its rows' KV cache) and the scoring pass, on
        the abstract train state ``state``. The programs are the ones ``_compile`` builds
        for a run."""
        from jalign.program_spec import ProgramSpec
        from jalign.train.metrics import train_flops_per_token
        S, cfg = jax.ShapeDtypeStruct, self.config
        b, p, n, rows = self.prompt_rows, self.prompt_length, cfg.max_new_tokens, self.rows

        def put(sharding, tree):
            return jax.tree.map(lambda x: S(x.shape, x.dtype, sharding=sharding), tree)

        trees = self._trees(state, self.SCORED)
        policy = trees[POLICY]
        if cfg.rollout_sharding == "replicated":
            policy = put(self.replicated, policy)
        prompt = S((b, p), jnp.int32, sharding=self.prompt_sh)
        key = put(self.replicated, jax.eval_shape(lambda: jax.random.key(0)))
        params = put(self.replicated, jax.eval_shape(lambda: self.sampling))
        per_row = S((rows,), jnp.float32, sharding=self.row_sh)
        per_token = S((rows, n), jnp.float32, sharding=self.row_sh)
        score_args = (trees, prompt, prompt, S((rows, n), jnp.int32, sharding=self.row_sh),
                      S((rows,), jnp.int32, sharding=self.row_sh), per_token, per_row,
                      S((), jnp.float32, sharding=self.replicated))
        length = p + n
        forward = sum(train_flops_per_token(self.models.configs[r], length) / 3
                      for r in self.scoring_forwards()) * self.scored_tokens()
        config = self.models.configs[POLICY]
        # One decode step: every row's token through the weights, attending to a full cache.
        h, kv = config.resolved_head_dim, config.num_kv_heads
        decode = rows * (train_flops_per_token(config, 0) / 3
                         + 4.0 * config.num_layers * config.num_heads * h * length)
        cache = 2 * config.num_layers * rows * length * kv * h * jnp.dtype(config.dtype).itemsize
        weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(policy))
        chips = self.mesh.devices.size
        read = weights / self.mesh.shape["tensor"] + cache / chips
        return {"sampler": ProgramSpec(self.sample, (policy, prompt, prompt, key, params),
                                       decode / chips, "decode step", units=n, read_bytes=read),
                "scoring pass": ProgramSpec(self.score, score_args, forward / chips,
                                            "rollout")}

    def scoring_forwards(self) -> tuple[str, ...]:
        """The roles whose forward the scoring pass runs (for its FLOPs)."""
        return self.SCORED

    def scored_tokens(self) -> int:
        """Tokens of a rollout that each of ``scoring_forwards`` runs on."""
        return self.rows * self.row_length()

    # ------------------------------------------------------------ evaluation

    def evaluate(self, state, step: int) -> dict:
        """Greedy responses to the eval prompts, scored like rollouts: ``eval_reward``
        (and ``eval_reward_<name>`` per component: the task checker's is exact-match
        accuracy), ``eval_response_length``."""
        if self.eval_prompts is None:
            raise ConfigError("evaluating rollouts needs eval/DataConfig (prompt data)")
        self.eval_prompts.set_state(self.eval_start)
        totals: dict[str, float] = {}
        count = 0
        # Agreed: every batch is a collective (generation, gathers), so all hosts run as
        # many, though their shards may hold different numbers of prompts.
        from jalign.train.hosts import agree_min
        batches = min(self.eval_batches, agree_min(
            self.eval_prompts.total_batches() or self.eval_batches))
        for _, batch in zip(range(batches), self.eval_prompts):
            ids = self._global(batch["prompt_ids"], self.eval_sh)
            mask = self._global(batch["prompt_mask"], self.eval_sh)
            out = self.greedy(self._trees(state, (POLICY,))[POLICY], ids, mask, self.key,
                              self.sampling)
            fields = self._fields(self.eval_prompts, batch, self.eval_sh)
            scores, parts, lengths, _ = self._rewards(ids, mask, out, fields, evaluation=True)
            count += len(scores)
            for name, values in [("reward", scores), ("response_length", lengths),
                                 *[(f"reward_{k}", v) for k, v in parts.items()]]:
                totals[name] = totals.get(name, 0.0) + float(np.sum(values))
        if not count:
            raise ConfigError("eval/DataConfig gave no full batch of prompts")
        return {"step": step, **{f"eval_{k}": v / count for k, v in totals.items()},
                "eval_prompts": count}


class RolloutSource(Rollouts):
    """PPO's rollouts: one response per prompt; the scoring pass computes the old and the
    reference log-probs, the values, the KL-penalised per-token rewards and GAE."""

    SCORED = (POLICY, VALUE, REFERENCE)

    def make_kl_controller(self):
        return kl_controller(self.config)

    @staticmethod
    def extra_fields(config, models) -> dict:
        return {"old_logp": False, "ref_logp": False, "old_values": False, "advantages": False,
                "returns": False, "kl_coef": True}

    def score_rows(self, models, rows, sampler_logp, scores, kl_coef):
        cfg = self.config
        mask = rows["response_mask"]
        logp, ent = self.log_probs(models[POLICY], rows, entropy=True)
        ref_logp, _ = self.log_probs(models[REFERENCE], rows)
        values = models[VALUE](rows["input_ids"], rows["positions"], rows["segment_ids"])[:, :-1]
        scores = clip_scores(scores, cfg.score_clip)
        coef = kl_coef if cfg.kl_in == "reward" else 0.0
        rewards = penalized_rewards(scores, logp, ref_logp, mask, coef=coef, kind=cfg.kl_estimator)
        advantages, returns = gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        on = mask > 0
        log_ratio = jnp.where(on, logp - ref_logp, 0.0)
        metrics = {
            # Per-sequence sums of the sampled log-ratio: the KL the controller targets.
            "kl": jnp.mean(jnp.sum(log_ratio, axis=1)),
            "non_score_reward": jnp.mean(jnp.sum(jnp.where(on, rewards, 0.0), axis=1) - scores),
            "rollout_entropy": masked_mean(ent, mask),
            "value_mean": masked_mean(values, mask),
            "value_explained_variance": explained_variance(values, returns, mask),
            "advantage_mean": masked_mean(advantages, mask),
            "advantage_std": jnp.sqrt(masked_mean((advantages - masked_mean(advantages, mask)) ** 2,
                                                  mask)),
            "returns_mean": masked_mean(returns, mask),
        }
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)
        extras = {"old_logp": logp, "ref_logp": ref_logp, "old_values": values,
                  "advantages": advantages, "returns": returns,
                  "kl_coef": jnp.full((mask.shape[0],), kl_coef, jnp.float32)}
        return extras, metrics
