"""PPO's model-level loss (make_ppo_loss) on a tiny policy and value model: the composition
policy + vf_coef·value − entropy_coef·entropy (+ coef·KL with kl_in='loss'), each term
recomputed from a plain full forward in float64, with one shared weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jalign.algos.ppo import PPOConfig, make_ppo_loss
from jalign.models.build import create_model
from jalign.models.config import preset
from jalign.models.heads import SCALAR
from tests.numerics import assert_f32_close, llama_logp_bound

B, T = 3, 10


@pytest.fixture(scope="module")
def setup():
    config = preset("tiny").replace(vocab_size=512, scan_layers=False)
    model = {"policy": create_model(config, seed=7),
             "value": create_model(config, seed=8, head=SCALAR)}
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 512, (B, T)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[0, :3] = 0   # left padding
    seg[2, -2:] = 0  # padding after the response
    pos = np.maximum(np.cumsum(seg, 1) - 1, 0).astype(np.int32)
    mask = np.zeros((B, T - 1), np.float32)
    mask[0, 5:] = 1
    mask[1, 3:7] = 1
    mask[2, 4:7] = 1
    batch = {"input_ids": ids, "segment_ids": seg, "positions": pos, "response_mask": mask,
             "old_logp": rng.normal(-6, 0.3, (B, T - 1)).astype(np.float32),
             "ref_logp": rng.normal(-6, 0.3, (B, T - 1)).astype(np.float32),
             "old_values": rng.normal(0, 0.1, (B, T - 1)).astype(np.float32),
             "advantages": rng.normal(0, 1, (B, T - 1)).astype(np.float32),
             "returns": rng.normal(0, 1, (B, T - 1)).astype(np.float32),
             "kl_coef": np.full((B,), 0.3, np.float32)}
    return model, batch


def _expected(model, batch, cfg: PPOConfig):
    """The loss from a full forward, float64, written out term by term."""
    ids, seg, pos = (jnp.asarray(batch[k]) for k in ("input_ids", "segment_ids", "positions"))
    logits = np.asarray(nnx.jit(lambda m, i, p, s: m["policy"](i, p, s))(model, ids, pos, seg),
                        np.float64)[:, :-1] / cfg.temperature
    values = np.asarray(nnx.jit(lambda m, i, p, s: m["value"](i, p, s))(model, ids, pos, seg),
                        np.float64)[:, :-1]
    z = logits - logits.max(-1, keepdims=True)
    logp_all = z - np.log(np.exp(z).sum(-1, keepdims=True))
    logp = np.take_along_axis(logp_all, batch["input_ids"][:, 1:, None], -1)[..., 0]
    entropy = -(np.exp(logp_all) * logp_all).sum(-1)
    m = batch["response_mask"] > 0
    a = batch["advantages"].astype(np.float64)
    ratio = np.exp(logp - batch["old_logp"])
    pol = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high))
    v_old, r = batch["old_values"].astype(np.float64), batch["returns"].astype(np.float64)
    vclip = v_old + np.clip(values - v_old, -cfg.value_clip, cfg.value_clip)
    val = 0.5 * np.maximum((values - r) ** 2, (vclip - r) ** 2)
    total = (pol[m].sum() + cfg.vf_coef * val[m].sum() - cfg.entropy_coef * entropy[m].sum())
    x = logp - batch["ref_logp"]
    kl = 0.3 * (np.expm1(-x) + x)  # k3, the batch's coefficient
    return total, total + kl[m].sum(), m.sum()


@pytest.mark.parametrize("kl_in", ["reward", "loss",
                                   pytest.param("loss", marks=pytest.mark.keep_logits,
                                                id="loss-kept-logits")])
def test_ppo_loss_composes_its_terms(setup, kl_in):
    """(chunk_tokens=8: chunks recomputed in the backward; with the keep rule, as the
    library runs a model this small, the tokens run as one chunk, logits kept.)"""
    model, batch = setup
    cfg = PPOConfig(vf_coef=0.7, entropy_coef=0.05, clip_low=0.1, clip_high=0.3,
                    temperature=0.8, kl_in=kl_in, kl_estimator="k3", chunk_tokens=8)
    out = nnx.jit(lambda m, b: make_ppo_loss(cfg)(m, b, None))(model, jax.tree.map(jnp.asarray, batch))
    without_kl, with_kl, tokens = _expected(model, batch, cfg)
    assert float(out.weight) == tokens
    want = with_kl if kl_in == "loss" else without_kl
    # Each term: a log-prob (the logits chain at temperature 0.8), a value (the same chain),
    # a few elementwise roundings; summed over the response tokens.
    bound = llama_logp_bound(model["policy"], T, tokens=int(tokens), temperature=0.8)
    scale = bound["scale"] * (1 + cfg.vf_coef + 5 * np.abs(batch["advantages"]).max())
    assert_f32_close(float(out.total), want, terms=bound["terms"] + int(tokens),
                     depth=bound["depth"] + 2, scale=scale)
    assert ("kl_loss" in out.aux) == (kl_in == "loss")
    # the terms' difference is not within the bound: the test can tell them apart
    assert abs(with_kl - without_kl) > 100 * abs(float(out.total) - want)
