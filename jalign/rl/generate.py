"""Batched sampling with the KV cache, compiled once per (model structure, settings, shape).

The whole rollout (prefill, then one cached decode step per token) is a single jitted
program: the token loop is a ``lax.while_loop`` that stops as soon as every row has
produced EOS, so there is no per-token dispatch from Python and no recompilation per
generated length.

Settings split in two: those that change the program (``max_new_tokens``, ``greedy``,
``top_k``, whether top-p is used, how many EOS ids) are static, and the numbers an RL run
may tune (temperature, top_p, the EOS/pad ids) are traced, so changing them reuses the
compiled program.

Reported ``logprobs`` are ``log_softmax(logits / temperature)`` at the sampled token,
i.e. before the top-k/top-p truncation: that is the quantity a trainer recomputes from a
plain forward pass, so the two agree (the truncation's renormalisation is not a property
of the policy being trained).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jalign.models.decode import DecodeState, decode_step, init_cache, prefill, split_layers
from jalign.models.group_decode import group_cache, group_decode_step, grow
from jalign.rl import draws
from jalign.sharding import DEFAULT_RULES, Rules, use_mesh


class SamplingParams(NamedTuple):
    """The traced sampling numbers (changing them does not recompile)."""

    temperature: jax.Array  # [] float32
    top_p: jax.Array        # [] float32 (ignored unless the program was built with top-p)
    eos_ids: jax.Array      # [n_eos] int32
    pad_id: jax.Array       # [] int32


def sampling_params(*, temperature: float = 1.0, top_p: float | None = None,
                    eos_id: int | Sequence[int], pad_id: int) -> SamplingParams:
    eos = np.atleast_1d(np.asarray(eos_id, np.int32))
    return SamplingParams(jnp.float32(temperature), jnp.float32(1.0 if top_p is None else top_p),
                          jnp.asarray(eos), jnp.int32(pad_id))


def check_sampling(owner: str, temperature: float, top_k: int | None, top_p: float | None):
    """ValueError naming ``owner``'s field (e.g. 'PPOConfig') for sampling settings that
    cannot sample."""
    if temperature <= 0:
        raise ValueError(f"{owner}.temperature must be > 0 (sampling), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"{owner}.top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"{owner}.top_p must be in (0, 1], got {top_p}")


def filter_logits(logits_bv, top_k: int | None, top_p=None):
    """Sets tokens outside the top-k, then outside the top-p nucleus, to -inf.

    Nucleus: keep the most likely tokens until their mass reaches ``top_p`` (the token
    that crosses it included, so at least one token always survives).
    """
    if top_k is not None:
        kth = jax.lax.top_k(logits_bv, top_k)[0][..., -1:]
        logits_bv = jnp.where(logits_bv < kth, -jnp.inf, logits_bv)
    if top_p is not None:
        sorted_bv = -jnp.sort(-logits_bv, axis=-1)
        probs = jax.nn.softmax(sorted_bv, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_bv, jnp.inf), axis=-1, keepdims=True)
        logits_bv = jnp.where(logits_bv < cutoff, -jnp.inf, logits_bv)
    return logits_bv


def _pick(logits_bv, key, done_b, params: SamplingParams, greedy, top_k, use_top_p,
          draw="gumbel"):
    """(token [B], its log-probability [B]); pad and 0 on rows already done. ``draw``:
    ``jalign.rl.draws``."""
    scaled = logits_bv.astype(jnp.float32) / params.temperature
    if greedy:
        token = jnp.argmax(scaled, axis=-1).astype(jnp.int32)
    else:
        filtered = filter_logits(scaled, top_k, params.top_p if use_top_p else None)
        token = draws.get(draw)(filtered, key)
    logprobs_bv = jax.nn.log_softmax(scaled, axis=-1)
    logprob = jnp.take_along_axis(logprobs_bv, token[:, None], axis=-1)[:, 0]
    return jnp.where(done_b, params.pad_id, token), jnp.where(done_b, 0.0, logprob)


def _group_prefill(model, prompt_ids, prompt_mask, group_size: int):
    """Each prompt prefilled once; its keys and values stay one copy, read once per group
    at each token (``jalign.models.group_decode``; faster than G copies of the cache where
    the prompt is a sizeable part of the slots, docs/benchmarks.md), and each of its G rows
    gets its own completion slots."""
    b, p_len = prompt_ids.shape
    logits, prompt_cache, dstate = prefill(model, prompt_ids, prompt_mask,
                                           init_cache(model.config, b, p_len))
    cache = group_cache(prompt_cache, group_size, 1)  # grown per segment of the token loop
    rep = functools.partial(jnp.repeat, repeats=group_size, axis=0)
    return rep(logits), cache, DecodeState(index=jnp.int32(0), positions=rep(dstate.positions))


def rollout(model, prompt_ids, prompt_mask, rng, params: SamplingParams, *, max_new_tokens: int,
            greedy: bool = False, top_k: int | None = None, use_top_p: bool = False,
            group_size: int = 1, draw: str = "gumbel") -> dict:
    """Traceable sampler body (call it inside jit; ``generate`` does that for you).

    With ``group_size`` G, each of the B prompts is prefilled once and G completions are
    sampled from its cache: the rows are B·G, prompt i's completions at rows iG..iG+G-1.
    Returns tokens [B·G, N] (pad after EOS), lengths [B·G] (generated tokens incl. EOS),
    logprobs [B·G, N] (0 after EOS) and num_steps (tokens the loop actually produced per
    row: fewer than N when every row finished early).
    """
    n = max_new_tokens
    b, p_len = prompt_ids.shape
    pick = functools.partial(_pick, params=params, greedy=greedy, top_k=top_k, use_top_p=use_top_p,
                             draw=draw)
    # The last token is sampled but never fed back, so it needs no slot.
    if group_size == 1:
        cache = init_cache(model.config, b, p_len + n - 1)
        logits, cache, dstate = prefill(model, prompt_ids, prompt_mask, cache)
        step = decode_step
    else:
        logits, cache, dstate = _group_prefill(model, prompt_ids, prompt_mask, group_size)
        b, step = b * group_size, group_decode_step

    def record(i, token, logprob, tokens, logprobs, done, lengths):
        tokens = tokens.at[:, i].set(token)
        logprobs = logprobs.at[:, i].set(logprob)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.any(token[:, None] == params.eos_ids[None, :], axis=-1)
        return tokens, logprobs, done, lengths

    layers = split_layers(model)  # once: slicing inside the loop copies every weight per token
    done = jnp.zeros((b,), bool)
    # Keys come from the step index, so a row's draws do not depend on when others stop.
    token, logprob = pick(logits, jax.random.fold_in(rng, 0), done)
    out = record(0, token, logprob, jnp.full((b, n), params.pad_id, jnp.int32),
                 jnp.zeros((b, n), jnp.float32), done, jnp.zeros((b,), jnp.int32))

    def cond(carry):
        i, *_, done, _lengths = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, cache, dstate, tokens, logprobs, done, lengths = carry
        # Finished rows keep feeding pad: harmless, their outputs are discarded.
        logits, cache, dstate = step(model, tokens[:, i - 1], cache, dstate, layers)
        token, logprob = pick(logits, jax.random.fold_in(rng, i), done)
        return (i + 1, cache, dstate, *record(i, token, logprob, tokens, logprobs, done, lengths))

    carry = (jnp.int32(1), cache, dstate, *out)
    # Group sampling reads only the completion slots filled so far, in a few segments of
    # the token loop, each compiled for its own number of slots and over a cache grown to
    # that many (plain decoding reads the whole cache: its programs, and so its samples,
    # stay as they were).
    for end in (_segment_ends(n) if group_size > 1 else (n,)):
        if group_size > 1:
            i, cache, *rest = carry
            carry = (i, grow(cache, max(end - 1, 1)), *rest)
        carry = jax.lax.while_loop(lambda c, end=end: cond(c) & (c[0] < end), body, carry)
    steps, _, _, tokens, logprobs, _, lengths = carry
    return {"tokens": tokens, "lengths": lengths, "logprobs": logprobs, "num_steps": steps}


SEGMENT_TOKENS = 32  # a group sampler's loop is cut in segments of at least this many tokens
MAX_SEGMENTS = 4     # (each one more compiled copy of the decode step)


def _segment_ends(n: int) -> list[int]:
    """Where the group sampler's token-loop segments end (the last at ``n``): token i of
    a segment ending at e feeds completion slot i - 1 < e - 1 slots."""
    k = max(1, min(MAX_SEGMENTS, n // SEGMENT_TOKENS))
    return [-(-n * j // k) for j in range(1, k + 1)]


@functools.lru_cache(maxsize=64)
def _jitted_rollout(graphdef, max_new_tokens, greedy, top_k, use_top_p, mesh, rules,
                    group_size=1, draw="gumbel"):
    def run(state, prompt_ids, prompt_mask, rng, params):
        model = nnx.merge(graphdef, state)
        kwargs = dict(max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k,
                      use_top_p=use_top_p, group_size=group_size, draw=draw)
        if mesh is None:
            return rollout(model, prompt_ids, prompt_mask, rng, params, **kwargs)
        with use_mesh(mesh, rules):
            return rollout(model, prompt_ids, prompt_mask, rng, params, **kwargs)

    return jax.jit(run)


def make_generate_fn(graphdef, *, max_new_tokens: int, greedy: bool = False,
                     top_k: int | None = None, use_top_p: bool = False,
                     mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                     group_size: int = 1, draw: str = "gumbel"):
    """Jitted ``fn(state, prompt_ids, prompt_mask, rng, params: SamplingParams) -> dict``
    (``group_size`` completions per prompt: see ``rollout``; ``draw``: how a token is
    drawn from its distribution, ``jalign.rl.draws``).

    For loops that keep the graphdef and swap the state (an RL run): cached per settings,
    and jit caches per input shape. The mesh is static because activation constraints
    read it at trace time.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    draws.get(draw)  # a known name
    return _jitted_rollout(graphdef, int(max_new_tokens), bool(greedy),
                           None if top_k is None else int(top_k), bool(use_top_p), mesh,
                           tuple(rules), int(group_size), draw)


def generate(model, prompt_ids, prompt_mask, *, max_new_tokens: int, rng, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
             eos_id: int | Sequence[int], pad_id: int, mesh: Mesh | None = None,
             rules: Rules = DEFAULT_RULES, group_size: int = 1, draw: str = "gumbel") -> dict:
    """Samples up to ``max_new_tokens`` per left-padded prompt row (``group_size`` per
    prompt, its prompt prefilled once); see ``rollout``.

    ``temperature == 0`` means greedy. With ``greedy`` the logprobs are still taken
    under ``log_softmax(logits / temperature)`` (temperature 1 when it is 0).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        greedy, temperature = True, 1.0
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    graphdef, state = nnx.split(model)
    fn = make_generate_fn(graphdef, max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k,
                          use_top_p=top_p is not None, mesh=mesh, rules=rules,
                          group_size=group_size, draw=draw)
    params = sampling_params(temperature=temperature, top_p=top_p, eos_id=eos_id, pad_id=pad_id)
    return fn(state, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32),
              rng, params)


def decode_text(chat_tokenizer, tokens, lengths, eos_ids: int | Sequence[int] | None = None
                ) -> list[str]:
    """The generated text of each row: its first ``length`` tokens minus a final EOS.

    Other special tokens are kept (a template's turn marker is real output).
    """
    eos = set(np.atleast_1d(chat_tokenizer.eos_id if eos_ids is None else eos_ids).tolist())
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    texts = []
    for row, n in zip(tokens, lengths):
        ids = row[: int(n)].tolist()
        if ids and ids[-1] in eos:
            ids = ids[:-1]
        texts.append(chat_tokenizer.tokenizer.decode(ids, skip_special_tokens=False))
    return texts
