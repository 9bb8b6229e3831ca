"""The group forward (``jalign.models.group_forward``: each prompt's tokens run once for
its G completions) gives the full forward's hidden states, log-probs and gradients on
rows that repeat a prompt G times: left-padded prompts, completions padded after their
end, grouped-query attention, scanned + rematerialised layers, a sliding window that
crosses from the completion into the prompt."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jalign.losses.ppo import response_log_probs
from jalign.models.build import abstract_model, create_model, params_of
from jalign.models.config import preset
from jalign.models.group_forward import group_backbone
from tests.numerics import assert_f32_close, llama_hidden_bound, llama_logp_bound
from tests.train.token_grads import assert_grads_close, gradient_and_bounds

G, P, N = 3, 9, 6
PROMPT_LENS = (9, 6, 3)        # left padding
COMPLETION_LENS = (6, 4, 1, 6, 6, 2, 5, 6, 3)  # per row; padding after

CONFIGS = {
    "gqa_unrolled": preset("tiny", vocab_size=128, scan_layers=False),
    # window 4 < P: completion queries see only the prompt's last slots, or none of them
    "scan_remat_window": preset("tiny", vocab_size=128, scan_layers=True, remat_policy="full",
                                sliding_window=4),
}


def _rows():
    """[B·G, P+N] rows as a rollout lays them out (jalign.rl.rollout._score_pass)."""
    rng = np.random.default_rng(0)
    b = len(PROMPT_LENS)
    ids = rng.integers(1, 128, size=(b * G, P + N))
    seg = np.zeros((b * G, P + N), np.int32)
    for i, n in enumerate(PROMPT_LENS):
        ids[i * G:(i + 1) * G, :P] = ids[i * G, :P]  # one prompt per group
        seg[i * G:(i + 1) * G, P - n:P] = 1
    for r, n in enumerate(COMPLETION_LENS):
        seg[r, P:P + n] = 1
    pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    mask = np.zeros((b * G, P + N - 1), np.float32)
    mask[:, P - 1:] = seg[:, P:]
    return {"input_ids": ids.astype(np.int32), "segment_ids": seg, "positions": pos}, mask


@functools.lru_cache(maxsize=None)
def _model(name):
    return create_model(CONFIGS[name], seed=1)


@pytest.fixture(params=sorted(CONFIGS))
def model(request):
    return _model(request.param)


def _jit(fn, model):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a)), state


def _both_forwards(model):
    """(the full forward's hidden states, the group forward's prompt and completion ones)."""
    rows, _ = _rows()
    args = (rows["input_ids"], rows["segment_ids"], rows["positions"])
    full_fn, state = _jit(lambda m, i, s, p: m.backbone(i, p, s), model)
    group_fn, _ = _jit(lambda m, *a: group_backbone(m, *a, group_size=G, prompt_len=P), model)
    return np.asarray(full_fn(state, *args)), *map(np.asarray, group_fn(state, *args))


def test_hidden_states_are_the_full_forwards(model):
    full, h_p, h_c = _both_forwards(model)
    assert h_p.shape == (len(PROMPT_LENS), P, full.shape[-1]) and h_c.shape == (G * 3, N, full.shape[-1])
    bound = llama_hidden_bound(model, P + N)
    assert_f32_close(h_p, full[::G, :P], **bound)
    assert_f32_close(h_c, full[:, P:], **bound)


def test_log_probs_and_gradients_are_the_full_forwards(model):
    """Σ g_t log p_t of the responses: value, and its gradient against a float64 sum of
    per-target gradients (tests/train/token_grads.py)."""
    rows, mask = _rows()
    coeffs = mask * np.random.default_rng(1).uniform(0.5, 1.5, mask.shape)
    graphdef, _ = abstract_model(model.config)
    params = params_of(model)

    def loss(p, rows, group_size):
        lp, _ = response_log_probs(nnx.merge(graphdef, p), rows["input_ids"],
                                   rows["segment_ids"], rows["positions"], temperature=1.0,
                                   chunk_tokens=16, last=N, group_size=group_size)
        return -jnp.sum(lp * coeffs), lp

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=2)
    g_group, lp_group = grad(params, rows, G)
    _, lp_full = grad(params, rows, 1)
    assert_f32_close(np.where(mask > 0, lp_group, 0), np.where(mask > 0, lp_full, 0),
                     **llama_logp_bound(model, P + N))
    want, tols = gradient_and_bounds(model, params, rows, coeffs)
    assert_grads_close(g_group, want, tols, "group forward")


def test_rows_that_are_not_groups_are_refused():
    model = _model("gqa_unrolled")
    rows, _ = _rows()
    with pytest.raises(ValueError, match="not groups of 4"):
        group_backbone(model, rows["input_ids"], rows["segment_ids"], rows["positions"],
                       group_size=4, prompt_len=P)


def test_adapters_on_a_quantised_base():
    """LoRA adapters (B made nonzero) on an nf4-quantised base: the adapted projections
    run in both halves of the group forward as in the full forward; with adapter dropout
    on, the prompt's projections draw their own masks (not the completions' key)."""
    from jalign.models.adapters import attach
    from jalign.models.config import LoraConfig
    from jalign.models.group_forward import _prompt_params
    model = attach(_model("gqa_unrolled"), LoraConfig(rank=2, quantize="nf4", block_size=16),
                   seed=2)
    for name in ("wq_lora_b", "w_down_lora_b"):
        leaf = getattr(model.layers, name)
        leaf[...] = jax.random.normal(jax.random.key(5), leaf[...].shape) * 0.1
    full, h_p, h_c = _both_forwards(model)
    bound = llama_hidden_bound(model, P + N)
    assert_f32_close(h_p, full[::G, :P], **bound)
    assert_f32_close(h_c, full[:, P:], **bound)
    p = {"lora_dropout_key": jax.random.key_data(jax.random.key(0)), "wq": 1}
    folded = _prompt_params(p)
    assert folded["wq"] == 1 and not np.array_equal(folded["lora_dropout_key"],
                                                    p["lora_dropout_key"])
    assert _prompt_params({"wq": 1}) == {"wq": 1}
