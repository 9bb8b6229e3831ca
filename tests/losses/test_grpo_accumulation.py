"""The GRPO loss in the generic train step: with the ``dapo`` aggregation (token sum over
the active tokens of the whole accumulated batch), 4 accumulated micro-batches equal the
full batch within the float32 bound; ``bnpo`` (each micro-batch's own token mean) does
not."""

import jax
import jax.numpy as jnp
import numpy as np

from jalign.algos.grpo import GRPOConfig, make_grpo_loss
from jalign.models.build import create_model
from jalign.models.config import preset
from jalign.sharding import MeshConfig, make_mesh
from jalign.train.roles import RunModels
from jalign.train.state import params_of
from jalign.train.step import accumulate
from tests.numerics import f32_tolerance, llama_logp_bound

CONFIG = preset("tiny", vocab_size=128, num_heads=4, num_kv_heads=2)
ROWS, LENGTH, PROMPT = 8, 16, 6


def _rollout(seed=0):
    """A rollout's rows: prompts then completions of very different lengths, the old
    log-probs near the policy's (a ratio != 1), and per-sequence advantages."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, CONFIG.vocab_size, (ROWS, LENGTH)).astype(np.int32)
    mask = np.zeros((ROWS, LENGTH - 1), np.float32)
    for r in range(ROWS):
        mask[r, PROMPT - 1:PROMPT - 1 + 1 + (r * 3) % (LENGTH - PROMPT)] = 1
    adv = rng.normal(size=(ROWS, 1)).astype(np.float32)
    return {"input_ids": ids, "segment_ids": np.ones_like(ids),
            "positions": np.broadcast_to(np.arange(LENGTH, dtype=np.int32), ids.shape).copy(),
            "response_mask": mask, "advantages": adv * mask,
            "old_logp": np.where(mask > 0, -5.0 + rng.normal(0, 0.1, mask.shape), 0.0).astype(np.float32)}


def _loss(aggregation, accum, rows=slice(None)):
    model = create_model(CONFIG, seed=0)
    params = {"policy": params_of(model)}
    # two updates per rollout: the ratio is against the rollout's old log-probs; the rows
    # are a PROMPT-token prompt and LENGTH - PROMPT response slots, as a rollout's
    # (each row its own prompt: not groups, so the prompt is not shared)
    loss_fn = make_grpo_loss(GRPOConfig(aggregation=aggregation, epochs=2, clip_low=0.2,
                                        clip_high=0.28, max_new_tokens=LENGTH - PROMPT,
                                        share_prompt=False))
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    batch = jax.tree.map(lambda x: jnp.asarray(x[rows]), _rollout())
    out, _ = jax.jit(lambda p, b: accumulate(loss_fn, RunModels.single(CONFIG), p, None, b,
                                             jax.random.key(0), accum, mesh=mesh))(params, batch)
    return float(out.total / out.weight), model


def test_dapo_accumulated_equals_the_full_batch_and_bnpo_does_not():
    full, model = _loss("dapo", 1)
    accumulated, _ = _loss("dapo", 4)
    rows = _rollout()
    m = rows["response_mask"]
    # Each term is -A * clip(rho) with rho = exp(logp - old): a log-prob error e (its own
    # float32 bound) moves rho by at most rho * e, so a term by |A| * max_rho * e (max_rho:
    # this data's largest ratio, computed); then the mean over the tokens rounds on its own.
    e = f32_tolerance(**llama_logp_bound(model, LENGTH))
    from jalign.losses.ppo import response_log_probs
    logp, _ = response_log_probs(model, rows["input_ids"], rows["segment_ids"],
                                 rows["positions"], temperature=1.0, chunk_tokens=2048)
    max_rho = float(np.max(np.where(m > 0, np.exp(np.asarray(logp) - rows["old_logp"]), 0.0)))
    max_rho = max(max_rho, 1.28) * np.exp(e)  # this data's largest ratio, within its error
    bound = (np.abs(rows["advantages"]).max() * max_rho * e
             + f32_tolerance(int(m.sum()), np.abs(rows["advantages"]).max() * max_rho))
    assert abs(accumulated - full) <= bound, (accumulated, full, bound)
    assert accumulated != 0
    # bnpo: the mean of the 4 micro-batches' own token means (micro-batch i holds rows i::4;
    # each is the dapo loss of its rows alone), not the batch's token mean.
    bnpo_full, _ = _loss("bnpo", 1)
    bnpo_accumulated, _ = _loss("bnpo", 4)
    assert abs(bnpo_full - full) <= bound  # one micro-batch: the same token mean
    each = [_loss("dapo", 1, slice(i, None, 4))[0] for i in range(4)]  # rows i::4
    assert abs(bnpo_accumulated - np.mean(each)) <= bound
    assert abs(np.mean(each) - full) > 0  # unequal token counts: the two differ
