"""The cached sampler against the uncached forward: greedy tokens, EOS handling, sampled
log-probabilities, top-k/top-p, determinism, and decode_text."""

import jax
import numpy as np
import pytest
from flax import nnx

from jalign.models.build import create_model, forward
from jalign.models.config import preset
from jalign.rl.generate import decode_text, generate, make_generate_fn
from tests.numerics import (TRANSCENDENTAL_TERMS, assert_f32_close, f32_tolerance,
                            llama_logits_bound, llama_logp_bound)

EOS, PAD = 2, 0
NO_EOS = -1  # an id no token can take: generation runs the full length
PROMPT_LENS = (12, 7, 3)
P = max(PROMPT_LENS)
N = 8


@pytest.fixture(scope="module")
def model():
    return create_model(preset("tiny"), seed=5)


@pytest.fixture(scope="module")
def prompts(model):
    rng = np.random.default_rng(0)
    rows = [rng.integers(3, model.config.vocab_size, n).astype(np.int32) for n in PROMPT_LENS]
    ids = np.full((len(rows), P), PAD, np.int32)
    mask = np.zeros((len(rows), P), np.int32)
    for r, p in enumerate(rows):
        ids[r, P - len(p):], mask[r, P - len(p):] = p, 1
    return rows, ids, mask


def _gen(model, prompts, **kw):
    _, ids, mask = prompts
    kw = {"rng": jax.random.key(0), "eos_id": EOS, "pad_id": PAD, **kw}
    return {k: np.asarray(v) for k, v in generate(model, ids, mask, max_new_tokens=N, **kw).items()}


def _reference_logits(model, rows, tokens, lengths):
    """Full-forward logits [B, N, V]: entry j is what predicts generated token j.

    Rows are right-padded to one shape (one compile); the forward is causal, so the
    padding after a position cannot change its logits.
    """
    seqs = np.full((len(rows), P + N), PAD, np.int32)
    for r, p in enumerate(rows):
        seqs[r, : len(p) + lengths[r]] = np.concatenate([p, tokens[r, : lengths[r]]])
    logits = np.asarray(forward(model, seqs))
    return np.stack([logits[r, len(p) - 1: len(p) - 1 + N] for r, p in enumerate(rows)])


def _logit_tol(model):
    """How far the sampler's logits may be from the full forward's: the float32 bound of
    the tiny model's logits chain over P + N keys."""
    return f32_tolerance(**llama_logits_bound(model, P + N))


def _assert_argmax_path(model, rows, out, err_msg=""):
    """Every generated token is an argmax of the uncached full forward's logits for its
    prefix, up to ties within 2 tolerances: the two programs' logits differ by up to one
    each, so either side of such a near-tie may win on some CPU (these prompts have one, in
    row 0, 0.0031 apart). Where the top two logits are further apart, only the argmax passes."""
    tol = _logit_tol(model)
    ref = _reference_logits(model, rows, out["tokens"], out["lengths"])
    for r, n in enumerate(out["lengths"]):
        picked = np.take_along_axis(ref[r, :n], out["tokens"][r, :n, None], -1)[:, 0]
        short = ref[r, :n].max(-1) - picked
        assert (short <= 2 * tol).all(), f"{err_msg} row {r}: {short} below the max (2 x {tol:.3g})"
    return ref


def _check_eos_layout(out, eos_ids):
    for r, n in enumerate(out["lengths"]):
        row = out["tokens"][r]
        assert not np.isin(row[: n - 1], eos_ids).any(), "EOS before the end"
        assert n == N or np.isin(row[n - 1], eos_ids), "stopped without EOS"
        # exact by construction: rows after EOS are filled with the pad id and 0.0
        assert (row[n:] == PAD).all() and (out["logprobs"][r, n:] == 0).all()


def test_greedy_equals_repeated_argmax_of_full_forward(model, prompts):
    rows, *_ = prompts
    out = _gen(model, prompts, greedy=True)
    # Uncached reference: the full forward over each row's prompt and generated tokens; the
    # tokens are its argmax (up to float32 near-ties) and stop at the first EOS.
    ref = _assert_argmax_path(model, rows, out)
    _check_eos_layout(out, [EOS])
    # Greedy log-probs are log_softmax(logits) at the token: one log-prob's bound.
    for r, n in enumerate(out["lengths"]):
        want = np.asarray(jax.nn.log_softmax(ref[r, :n], axis=-1))
        want = np.take_along_axis(want, out["tokens"][r, :n, None], -1)[:, 0]
        assert_f32_close(out["logprobs"][r, :n], want, **llama_logp_bound(model, P + N))


def test_eos_mid_sequence_truncates_each_row(model, prompts):
    free = _gen(model, prompts, greedy=True, eos_id=NO_EOS)
    assert (free["lengths"] == N).all()
    eos = int(free["tokens"][0, 2])  # row 0 emits it by its third token
    out = _gen(model, prompts, greedy=True, eos_id=eos)  # eos is traced: no recompile
    for r in range(len(PROMPT_LENS)):
        hits = np.flatnonzero(free["tokens"][r] == eos)
        n = hits[0] + 1 if hits.size else N
        assert out["lengths"][r] == n
        # exact by construction: one compiled program (eos is traced), the same inputs up to
        # the row's EOS, and rows never mix, so every step up to there is bit-identical
        np.testing.assert_array_equal(out["tokens"][r, :n], free["tokens"][r, :n])
        np.testing.assert_array_equal(out["logprobs"][r, :n], free["logprobs"][r, :n])
    assert out["lengths"][0] <= 3
    _check_eos_layout(out, [eos])


def _rigged_to_emit_eos(model):
    """Same structure, parameters set so EOS wins every step: layers add nothing to the
    residual stream, every embedding has +1 in dim 0, and only EOS reads dim 0 strongly."""
    rigged = nnx.clone(model)  # the shared fixture must stay untouched
    rigged.layers.wo[...] = 0.0 * rigged.layers.wo[...]
    rigged.layers.w_down[...] = 0.0 * rigged.layers.w_down[...]
    rigged.embed[...] = rigged.embed[...].at[:, 0].set(1.0)
    rigged.lm_head[...] = rigged.lm_head[...].at[:, EOS].set(0.0).at[0, EOS].set(100.0)
    return rigged


@pytest.mark.parametrize("greedy", [True, False])
def test_generation_stops_early_when_every_row_emits_eos(model, prompts, greedy):
    out = _gen(_rigged_to_emit_eos(model), prompts, greedy=greedy)
    assert (out["tokens"][:, 0] == EOS).all()
    assert (out["lengths"] == 1).all()
    assert int(out["num_steps"]) == 1  # the while_loop ran no decode step at all
    _check_eos_layout(out, [EOS])


@pytest.mark.parametrize("temperature", [0.7, 1.3])  # traced: one compile for both
def test_sampled_logprobs_match_full_forward(model, prompts, temperature):
    rows, *_ = prompts
    out = _gen(model, prompts, temperature=temperature, rng=jax.random.key(3))
    again = _gen(model, prompts, temperature=temperature, rng=jax.random.key(3))
    other = _gen(model, prompts, temperature=temperature, rng=jax.random.key(4))
    # exact by construction: the same compiled program on the same inputs and key
    np.testing.assert_array_equal(again["tokens"], out["tokens"])
    np.testing.assert_array_equal(again["logprobs"], out["logprobs"])
    assert (other["tokens"] != out["tokens"]).any()

    ref = _reference_logits(model, rows, out["tokens"], out["lengths"]) / temperature
    ref_lp = jax.nn.log_softmax(ref, axis=-1)
    # log_softmax(logits / temperature) at the sampled token, both sides in float32.
    bound = llama_logp_bound(model, P + N, temperature=temperature)
    for r, n in enumerate(out["lengths"]):
        want = np.take_along_axis(np.asarray(ref_lp[r, :n]), out["tokens"][r, :n, None], -1)[:, 0]
        assert_f32_close(out["logprobs"][r, :n], want, **bound, err_msg=f"row {r}")
    _check_eos_layout(out, [EOS])


def test_top_k_1_and_tiny_top_p_equal_greedy(model, prompts):
    rows, *_ = prompts
    greedy = _gen(model, prompts, greedy=True)
    for kw in ({"top_k": 1}, {"top_p": 1e-4}):
        out = _gen(model, prompts, rng=jax.random.key(9), **kw)
        # Another program than greedy's: its tokens are argmaxes too (up to float32
        # near-ties, where the two may part), and where a row's tokens equal greedy's its
        # log-probs agree to one log-prob's bound (each within it of the same formula).
        _assert_argmax_path(model, rows, out, err_msg=str(kw))
        for r in range(len(rows)):
            if np.array_equal(out["tokens"][r], greedy["tokens"][r]):
                assert_f32_close(out["logprobs"][r], greedy["logprobs"][r],
                                 **llama_logp_bound(model, P + N), err_msg=f"{kw} row {r}")


def test_top_k_and_top_p_restrict_the_sampled_tokens(model, prompts):
    rows, *_ = prompts
    k, p = 4, 0.5
    topk = _gen(model, prompts, top_k=k, rng=jax.random.key(1), eos_id=NO_EOS)
    ref = _reference_logits(model, rows, topk["tokens"], topk["lengths"])
    # Tokens above the sampled one by more than 2 tolerances (the sampler's and the
    # reference's logits differ by at most one each way) ranked above it for the sampler too.
    tol = _logit_tol(model)
    ranks = (ref > np.take_along_axis(ref, topk["tokens"][..., None], -1) + 2 * tol).sum(-1)
    assert (ranks < k).all() and (ranks > 0).any()  # restricted, yet not merely greedy

    nucleus = _gen(model, prompts, top_p=p, rng=jax.random.key(2), eos_id=NO_EOS)
    probs = np.asarray(jax.nn.softmax(
        _reference_logits(model, rows, nucleus["tokens"], nucleus["lengths"]), axis=-1))
    chosen = np.take_along_axis(probs, nucleus["tokens"][..., None], -1)
    # The tokens surely more likely than the sampled one (by a probability ratio above
    # exp(4 tol): their logits lead by over 2 tolerances, so the sampler ranked them above it
    # too, and counted their mass before it, under p). The sampler's probabilities are within
    # a factor exp(2 tol) of these (a logit and the logsumexp move by one tolerance each), and
    # the mass is a 256-term float32 sum (softmax exp and division counted) adding up to <= 1.
    surely = probs > chosen * np.exp(4 * tol)
    mass_before = np.where(surely, probs, 0.0).sum(-1)
    vocab = model.config.vocab_size
    slack = p * np.expm1(2 * tol) + f32_tolerance(vocab + 2 * TRANSCENDENTAL_TERMS, 1.0)
    assert (mass_before < p + slack).all()


def test_compiled_once_across_traced_settings(model, prompts):
    graphdef, _ = nnx.split(model)
    fn = make_generate_fn(graphdef, max_new_tokens=N, use_top_p=True)
    assert fn is make_generate_fn(graphdef, max_new_tokens=N, use_top_p=True)
    for t, top_p, eos in [(0.5, 0.9, EOS), (1.5, 0.3, 7)]:
        _gen(model, prompts, temperature=t, top_p=top_p, eos_id=eos)
    assert fn._cache_size() == 1


def test_argument_checks(model, prompts):
    with pytest.raises(ValueError, match="temperature"):
        _gen(model, prompts, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        _gen(model, prompts, top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        make_generate_fn(nnx.split(model)[0], max_new_tokens=0)


def test_temperature_zero_is_greedy(model, prompts):
    # exact by construction: temperature 0 runs the greedy program with temperature 1
    np.testing.assert_array_equal(_gen(model, prompts, temperature=0.0)["tokens"],
                                  _gen(model, prompts, greedy=True)["tokens"])


def test_decode_text_strips_eos_and_padding():
    from jalign.data.tokenize import ChatTokenizer, load_tokenizer

    chat = ChatTokenizer(load_tokenizer())
    a = chat.tokenizer("The answer is 521", add_special_tokens=False)["input_ids"]
    b = chat.tokenizer("no end yet", add_special_tokens=False)["input_ids"]
    width = max(len(a), len(b)) + 3
    tokens = np.full((2, width), chat.pad_id, np.int32)
    tokens[0, : len(a) + 1] = a + [chat.eos_id]
    tokens[1, : len(b)] = b
    lengths = np.array([len(a) + 1, len(b)])
    assert decode_text(chat, tokens, lengths) == ["The answer is 521", "no end yet"]


def test_filter_logits_keeps_exactly_the_documented_set():
    """A hand-made distribution, p = [0.1, 0.4, 0.2, 0.3] (shuffled on purpose): top-k keeps
    the k largest; top-p keeps the most likely tokens until their mass reaches p, the token
    that crosses it included."""
    import jax.numpy as jnp

    from jalign.rl.generate import filter_logits
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))

    def kept(**kw):
        return set(np.flatnonzero(np.isfinite(np.asarray(filter_logits(logits, **kw))[0])))

    assert kept(top_k=1) == {1}
    assert kept(top_k=2) == {1, 3}
    assert kept(top_k=4) == {0, 1, 2, 3}
    assert kept(top_k=None, top_p=0.4) == {1}         # 0.4 reaches 0.4: nothing more
    assert kept(top_k=None, top_p=0.5) == {1, 3}      # 0.4 < 0.5: 0.3 crosses it
    assert kept(top_k=None, top_p=0.75) == {1, 3, 2}  # 0.7 < 0.75: 0.2 crosses it
    assert kept(top_k=None, top_p=1.0) == {0, 1, 2, 3}
    assert kept(top_k=None, top_p=1e-6) == {1}        # at least one token survives
    assert kept(top_k=3, top_p=0.5) == {1, 3}         # top-k first, then the nucleus of the rest
    # Kept logits are unchanged (the sampler renormalises by sampling from them).
    out = np.asarray(filter_logits(logits, top_k=2))[0]
    np.testing.assert_array_equal(out[[1, 3]], np.asarray(logits)[0, [1, 3]])


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2)])
def test_sharded_sampler_equals_the_full_forward(model, prompts, shape):
    """On an 8-device mesh (parameters sharded by the rules) the sampler's greedy tokens
    are still argmaxes of the single-device full forward and its log-probs within one
    log-prob's bound: the same check as the single-device sampler passes."""
    from jalign.sharding import MeshConfig, make_mesh
    from jalign.train.state import params_of
    rows, ids, mask = prompts
    mesh = make_mesh(MeshConfig(*shape))
    sharded = create_model(preset("tiny"), seed=5, mesh=mesh)
    assert any(len(x.sharding.device_set) > 1 for x in jax.tree.leaves(params_of(sharded)))
    out = {k: np.asarray(v) for k, v in generate(
        sharded, ids, mask, max_new_tokens=N, rng=jax.random.key(0), greedy=True, eos_id=EOS,
        pad_id=PAD, mesh=mesh).items()}
    ref = _assert_argmax_path(model, rows, out, err_msg=f"mesh {shape}")
    for r, n in enumerate(out["lengths"]):
        want = np.asarray(jax.nn.log_softmax(ref[r, :n], axis=-1))
        want = np.take_along_axis(want, out["tokens"][r, :n, None], -1)[:, 0]
        assert_f32_close(out["logprobs"][r, :n], want, **llama_logp_bound(model, P + N))
    # (Token-for-token equality with the single-device run is not asserted: at a near-tie
    # within the float32 bound either run may pick either token, on some CPU.)


def test_sharded_group_sampler_equals_the_full_forward(model, prompts, monkeypatch, request):
    """The group sampler (one prefill per prompt, each layer's completion cache its own
    array, grown per segment of the token loop) on an 8-device mesh: every greedy token of
    every row of each group is an argmax of the single-device full forward, as for the
    plain sampler. (Segments of 2 tokens: 4 segments in N = 8, the cache grown for each.)"""
    from jalign.rl import generate as gen
    from jalign.sharding import MeshConfig, make_mesh
    rows, ids, mask = prompts
    g = 4
    mesh = make_mesh(MeshConfig(2, 2, 2))
    sharded = create_model(preset("tiny"), seed=5, mesh=mesh)
    monkeypatch.setattr(gen, "SEGMENT_TOKENS", 2)
    gen._jitted_rollout.cache_clear()  # traced afresh with 2-token segments, dropped after
    request.addfinalizer(gen._jitted_rollout.cache_clear)
    out = {k: np.asarray(v) for k, v in generate(
        sharded, ids, mask, max_new_tokens=N, rng=jax.random.key(0), greedy=True,
        eos_id=EOS, pad_id=PAD, mesh=mesh, group_size=g).items()}
    assert out["tokens"].shape == (len(rows) * g, N)
    _assert_argmax_path(model, [r for r in rows for _ in range(g)], out, err_msg="grouped")
    for i in range(len(rows)):  # greedy: a group's rows are one path
        assert (out["tokens"][i * g:(i + 1) * g] == out["tokens"][i * g]).all()
