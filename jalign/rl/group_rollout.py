"""The GRPO family's rollouts: G completions per prompt, group-relative advantages.

Each prompt of a rollout is prefilled once and ``group_size`` completions are sampled
from its cache (rows of a group consecutive). The scoring pass computes the reference's
log-probs where a KL is used (β > 0; with β = 0 no reference model is held at all), the
policy's (the "old" ones) where they are needed before the update (several steps per
rollout, or the KL as a reward penalty, ``kl_in='reward'``: β · the sequence's summed
per-token estimate subtracted from its score), and the advantages of the configured
estimator (``jalign.rl.advantages.get``), one per completion, on every token of it. With
one step per rollout the step's own forward is the sampling policy's: the policy is not
run a second time here (``GRPOConfig.policy_in_scoring``); the step reports the entropy
and the sampler mismatch instead.

Filtering (Yu et al. 2025, "DAPO"): ``dynamic_sampling`` keeps only groups whose rewards
differ (a group of equal rewards has zero advantages: no signal), sampling further batches
of prompts until the rollout is full or ``max_sampling_rounds`` rounds were sampled (then
groups without signal fill it; metrics ``sampling_rounds``, ``groups_dropped``,
``groups_without_signal_kept``); ``mask_truncated`` (overlong filtering) gives no loss to
a completion that hit ``max_new_tokens`` without EOS; ``overlong_buffer`` L (soft overlong
punishment) subtracts ``overlong_penalty`` × (length − (max_new_tokens − L)) / L from
the score of a completion longer than max_new_tokens − L.

With ``tis_cap`` C it also keeps the truncated importance weight
min(π_trainer / π_sampler, C) of each token (Yao et al. 2025, "Your Efficient RL Framework
Secretly Brings You Off-Policy RL Training": for a sampler that runs at another precision
or with other kernels than the trainer).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np

from jalign.losses.kl import kl_per_token
from jalign.losses.policy import tis_weight
from jalign.rl import advantages as adv
from jalign.rl.advantages import masked_mean
from jalign.rl.rollout import POLICY, REFERENCE, Drawn, Rollouts, _host


def estimator_options(config) -> dict:
    """The options of ``config.advantage`` the config sets (``scale_rewards`` is grpo's
    ``scale``, ``baseline`` reinforce_pp's)."""
    fn = adv.get(config.advantage)
    given = {"scale": config.scale_rewards, "baseline": config.baseline}
    return {k: v for k, v in given.items() if k in inspect.signature(fn).parameters}


def _policy_in_scoring(config, models) -> bool:
    """Whether the scoring pass runs the policy. A forward with adapter dropout on is not
    the sampling policy: the step's own log-probs cannot stand in for the old ones then."""
    from jalign.train.step import adapter_dropout
    return config.policy_in_scoring or adapter_dropout(models)


class GroupRolloutSource(Rollouts):
    """``BatchSource`` of GRPO-family minibatches (``config``: a ``GRPOConfig``)."""

    def __init__(self, prompts, config, ctx, connect: bool = True):
        self.group_size = config.group_size
        self.SCORED = (POLICY, REFERENCE) if config.beta > 0 else (POLICY,)
        self.estimate = adv.get(config.advantage)
        self.options = estimator_options(config)
        self.policy_in_scoring = _policy_in_scoring(config, ctx.models)
        self.accum_steps = ctx.accum_steps
        super().__init__(prompts, config, ctx, connect)

    def make_kl_controller(self):
        from jalign.rl.kl import FixedKLController
        return FixedKLController(self.config.beta)  # logged as kl_coef

    def total(self) -> int | None:
        """Unknown with dynamic sampling: a rollout reads as many prompt batches as it needs."""
        return None if self.config.dynamic_sampling else super().total()

    def adjust(self, scores, lengths, ended) -> np.ndarray:
        scores = super().adjust(scores, lengths, ended)
        buffer = self.config.overlong_buffer
        if buffer:
            start = self.config.max_new_tokens - buffer
            over = np.clip((np.asarray(lengths, np.float32) - start) / buffer, 0.0, 1.0)
            scores = scores - np.float32(self.config.overlong_penalty) * over
        return scores

    def draw(self, policy, key):
        """With ``dynamic_sampling``: rounds of sampling until the rollout's groups all have
        signal (or the cap); groups in the order sampled."""
        cfg = self.config
        if not cfg.dynamic_sampling:
            return super().draw(policy, key)
        kept, spare, rounds, dropped = [], [], 0, 0
        while len(kept) < self.prompt_rows and rounds < cfg.max_sampling_rounds:
            d = self._sample_round(policy, key if rounds == 0 else jax.random.fold_in(key, rounds))
            rounds += 1
            groups = d.scores.reshape(-1, self.group_size)
            signal = groups.max(axis=1) > groups.min(axis=1)
            dropped += int(np.sum(~signal))
            for i, has in enumerate(signal):
                (kept if has else spare).append((d, i))
        chosen = (kept + spare)[:self.prompt_rows]
        return self._assemble(chosen), {
            "sampling_rounds": rounds, "groups_dropped": dropped,
            "groups_without_signal_kept": max(0, self.prompt_rows - len(kept))}

    def _assemble(self, chosen) -> Drawn:
        """One Drawn of the groups ``chosen`` ((Drawn, group index) pairs)."""
        g = self.group_size
        hosts = {}  # each round's device arrays once on the host

        def host(d, name):
            key = (id(d), name)
            if key not in hosts:
                hosts[key] = _host(getattr(d, name))
            return hosts[key]

        def prompt_rows(name):
            return np.stack([host(d, name)[i] for d, i in chosen])

        def group_rows(name, on_host=False):
            return np.concatenate([(getattr(d, name) if on_host else host(d, name))[i * g:(i + 1) * g]
                                   for d, i in chosen])

        def device(x, sharding):
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

        parts = {k: np.concatenate([d.parts[k][i * g:(i + 1) * g] for d, i in chosen])
                 for k in chosen[0][0].parts}
        rounds = list({id(d): d for d, _ in chosen}.values())
        return Drawn(device(prompt_rows("prompt_ids"), self.prompt_sh),
                     device(prompt_rows("prompt_mask"), self.prompt_sh),
                     device(group_rows("tokens"), self.row_sh),
                     device(group_rows("token_lengths"), self.row_sh),
                     device(group_rows("logprobs"), self.row_sh),
                     group_rows("scores", True), group_rows("raw", True), parts,
                     group_rows("lengths", True), group_rows("ended", True),
                     sum(d.sample_seconds for d in rounds), sum(d.reward_seconds for d in rounds))

    def step_orders(self, shuffle) -> list[np.ndarray]:
        """Without ``share_prompt`` the rows are shuffled one by one (``Rollouts``). With
        it, whole groups are: every epoch a permutation of the prompts, cut into
        ``minibatches`` steps, and within a step the rows laid out so that the step's
        micro-batches (``jalign.train.step._split_micro`` takes rows m, m + A, m + 2A, ...
        for micro-batch m of A) each get whole groups, a group's rows consecutive."""
        cfg, g = self.config, self.group_size
        if cfg.forward_group == 1:
            return super().step_orders(shuffle)
        accum = self.accum_steps
        per_step = self.prompt_rows // cfg.minibatches
        order = []
        for epoch in range(cfg.epochs):
            perm = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle, epoch),
                                                     self.prompt_rows))
            for i in range(cfg.minibatches):
                groups = perm[i * per_step:(i + 1) * per_step]
                rows = (groups[:, None] * g + np.arange(g)).reshape(accum, -1)  # [micro, row]
                order.append(rows.T.reshape(-1))  # micro-batch m's k-th row at k·A + m
        return order

    def log_prob_options(self) -> dict:
        # The LM head on the response slots only (as the GRPO loss), and each prompt run
        # once for its group: the scoring pass sees the rollout's rows in sampling order.
        return {"last": self.config.max_new_tokens, "group_size": self.config.forward_group}

    def scoring_forwards(self) -> tuple[str, ...]:
        return ((POLICY,) if self.policy_in_scoring else ()) + (
            (REFERENCE,) if self.config.beta > 0 else ())

    def scored_tokens(self) -> int:
        # Each prompt once per forward group, each completion once (log_prob_options).
        n = self.config.max_new_tokens
        return self.rows * n + self.rows // self.config.forward_group * self.prompt_length

    @staticmethod
    def extra_fields(config, models) -> dict:
        out = {"advantages": False}
        if config.mask_truncated:
            out["response_mask"] = False
        if config.beta > 0:
            out["ref_logp"] = False
        if not _policy_in_scoring(config, models):
            out["sampler_logp"] = False
        else:
            out["old_logp"] = False
            if config.tis_cap is not None:
                out["tis_weight"] = False
        return out

    def score_rows(self, models, rows, sampler_logp, scores, kl_coef):
        cfg = self.config
        mask = rows["response_mask"]
        extras, metrics = {}, {}
        if cfg.mask_truncated:  # overlong filtering: a cut-off completion gets no loss
            mask = mask * self._ended(rows["input_ids"], mask)[:, None]
            extras["response_mask"] = mask
        on = mask > 0
        if cfg.beta > 0:
            extras["ref_logp"], _ = self.log_probs(models[REFERENCE], rows)
        if not self.policy_in_scoring:
            # The step's forward is the sampling policy's (one step per rollout): it
            # compares the sampler's log-probs with its own (grpo._rollout_metrics).
            extras["sampler_logp"] = sampler_logp
        else:
            logp, ent = self.log_probs(models[POLICY], rows, entropy=True)
            extras["old_logp"] = logp
            metrics["rollout_entropy"] = masked_mean(ent, mask)
            if cfg.tis_cap is not None:
                extras["tis_weight"] = tis_weight(logp, sampler_logp, mask, cfg.tis_cap)
        if cfg.beta > 0 and self.policy_in_scoring:
            ref_logp = extras["ref_logp"]
            # Logged as PPO logs it (the sampled log-ratio summed per sequence); the
            # configured estimator is what is penalised.
            metrics["kl"] = jnp.mean(jnp.sum(jnp.where(on, logp - ref_logp, 0.0), axis=1))
            if cfg.kl_in == "reward":
                kl = jnp.sum(jnp.where(on, kl_per_token(logp, ref_logp, cfg.kl_estimator), 0.0),
                             axis=1)
                scores = scores - cfg.beta * kl
        groups = scores.reshape(-1, self.group_size)
        std = jnp.std(groups, axis=1)
        a = self.estimate(scores, group_size=self.group_size, **self.options)
        extras["advantages"] = jnp.where(on, a[:, None], 0.0)
        metrics.update({
            "reward_group_std": jnp.mean(std),
            # groups whose completions all scored alike: no signal (zero advantages)
            "groups_without_signal": jnp.mean((std == 0).astype(jnp.float32)),
            "advantage_mean": jnp.mean(a),
            "advantage_std": jnp.std(a),
        })
        return extras, metrics

    def _ended(self, ids, mask):
        """1.0 for rows whose last completion token is an EOS, else 0.0."""
        idx = jnp.arange(mask.shape[1])
        last = jnp.max(jnp.where(mask > 0, idx, -1), axis=1)
        token = jnp.take_along_axis(ids[:, 1:], jnp.maximum(last, 0)[:, None], axis=1)[:, 0]
        ended = jnp.any(token[:, None] == self.sampling.eos_ids[None, :], axis=-1) & (last >= 0)
        return ended.astype(mask.dtype)
