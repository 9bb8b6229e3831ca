"""Group sampling (the GRPO family): each prompt is prefilled once and its G completions
sampled from its cache (the prompt's keys and values shared by the group,
jalign.models.group_decode); the tokens are those of G independent samplings of the
repeated prompt with the same keys (which run the plain cache, jalign.models.decode),
and the log-probs equal theirs within the float32 bound."""

import jax
import numpy as np
import pytest

from jalign.models.build import create_model
from jalign.models.config import preset
from jalign.rl import generate as gen
from tests.numerics import assert_f32_close, llama_logp_bound

EOS, PAD, G, N = 2, 0, 3, 6
PROMPT_LENS = (9, 4)
P = max(PROMPT_LENS)


@pytest.fixture(scope="module", params=[None, 3], ids=["full", "window3"])
def model(request):
    """The tiny model, and with a sliding window of 3 (Mistral's kind of attention), which
    the sampled tokens cross in both the prompt's and the completion's slots (N = 6)."""
    return create_model(preset("tiny", sliding_window=request.param), seed=7)


@pytest.fixture(scope="module")
def prompts(model):
    rng = np.random.default_rng(1)
    ids = np.full((len(PROMPT_LENS), P), PAD, np.int32)
    mask = np.zeros_like(ids)
    for r, n in enumerate(PROMPT_LENS):
        ids[r, P - n:] = rng.integers(3, model.config.vocab_size, n)
        mask[r, P - n:] = 1
    return ids, mask


def _sample(model, ids, mask, group_size, monkeypatch, draw):
    """The sampler's output and the batch shapes its prefill was traced with."""
    traced = []
    real = gen.prefill

    def counting(model, prompt_ids, *args):
        traced.append(tuple(prompt_ids.shape))
        return real(model, prompt_ids, *args)

    monkeypatch.setattr(gen, "prefill", counting)
    gen._jitted_rollout.cache_clear()  # trace afresh, through the counter
    out = gen.generate(model, ids, mask, max_new_tokens=N, rng=jax.random.key(3),
                       temperature=1.0, eos_id=EOS, pad_id=PAD, group_size=group_size,
                       draw=draw)
    return jax.device_get(out), traced


@pytest.mark.parametrize("draw, segment_tokens", [("gumbel", 32), ("inverse_cdf", 2)])
def test_one_prefill_per_prompt_and_the_tokens_of_independent_samplings(
        model, prompts, monkeypatch, draw, segment_tokens):
    """(With segments of 2 tokens the group sampler's loop runs in 3 segments, reading 1,
    3, then 5 completion slots.)"""
    monkeypatch.setattr(gen, "SEGMENT_TOKENS", segment_tokens)
    ids, mask = prompts
    grouped, traced = _sample(model, ids, mask, G, monkeypatch, draw)
    assert traced == [(len(PROMPT_LENS), P)]  # one prefill, of the B prompts, not B * G
    repeated, traced_rep = _sample(model, np.repeat(ids, G, 0), np.repeat(mask, G, 0), 1,
                                   monkeypatch, draw)
    assert traced_rep == [(len(PROMPT_LENS) * G, P)]
    assert grouped["tokens"].shape == (len(PROMPT_LENS) * G, N)
    np.testing.assert_array_equal(grouped["tokens"], repeated["tokens"])
    np.testing.assert_array_equal(grouped["lengths"], repeated["lengths"])
    assert_f32_close(grouped["logprobs"], repeated["logprobs"],
                     **llama_logp_bound(model, P + N))
    # the completions of a group differ (they are samples, not copies)
    for i in range(len(PROMPT_LENS)):
        group = grouped["tokens"][i * G:(i + 1) * G]
        assert len({tuple(r) for r in group}) > 1, group


def test_group_size_must_be_positive(model):
    with pytest.raises(ValueError, match="group_size"):
        gen.make_generate_fn(None, max_new_tokens=4, group_size=0)
