"""IFT on real (tokenized, packed) batches: λ = 0, γ = 0 is SFT with the same
normalisation, loss and gradients; packed == unpacked; accumulated == full batch; sharded
(8-device CPU mesh) == single device. Gradients are compared with a float64 reference
assembled from per-target gradients, within the float32 bound of that sum
(tests/train/token_grads.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jalign.data.packing import pad_example, unpack_row
from jalign.data.pipeline import DataConfig, build_iterator
from jalign.data.tokenize import ChatTokenizer, load_tokenizer
from jalign.losses import sequences
from jalign.losses.ift import IFTConfig, ift_reduce, make_ift_loss, mixed_inputs
from jalign.losses.sft import next_token_log_probs, sft_loss
from jalign.models.build import create_model
from jalign.models.config import preset
from jalign.sharding import MeshConfig, make_mesh
from jalign.train.state import params_of
from jalign.train.recipe import custom
from jalign.train.roles import RunModels
from jalign.train.step import accumulate, batch_sharding
from tests.numerics import assert_f32_close, f32_tolerance, llama_logits_bound, llama_logp_bound
from tests.train.token_grads import assert_grads_close, gradient_and_bounds

CONFIG = preset("tiny", vocab_size=512)
LENGTH = 64
IFT = IFTConfig(lam=0.2, gamma=0.95)
WEIGHT_DEPTH = 4  # IFT's weights after the token losses: sums over the row, a division


@pytest.fixture(scope="module")
def model():
    return create_model(CONFIG, seed=0)


def _near_ties(model, batch):
    """[B, T] True at targets where pass 1's argmax is not determined under the float32
    bound: the top logit leads the next by at most twice the logits' bound, so another
    float32 evaluation (another CPU, mesh or micro-batch) could pick another token."""
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    logits = np.asarray(model(b["input_ids"], b["positions"], b["segment_ids"]), np.float64)
    top2 = np.sort(logits[:, :-1], -1)[..., -2:]
    tie = (top2[..., 1] - top2[..., 0]) <= 2 * f32_tolerance(**llama_logits_bound(model, LENGTH))
    return np.concatenate([np.zeros_like(tie[:, :1]), tie], 1) & (batch["loss_mask"] > 0)


@pytest.fixture(scope="module")
def data(model):
    """A packed batch of 4 rows of bundled addition conversations, and the same examples
    one per row (unpacked). Targets where the untrained model's top two logits are closer
    than the float32 bound are made non-targets (a handful), so that every evaluation
    compared here replaces the same tokens, provably, on any CPU."""
    chat = ChatTokenizer(load_tokenizer())
    config = DataConfig(path="bundled:add", format="messages", batch_size=4,
                        max_length=LENGTH, bundled_size=80, seed=5, packing=True, shuffle=False)
    packed = next(build_iterator(config, chat=chat))
    ties = _near_ties(model, packed)
    assert ties.sum() < 0.1 * packed["loss_mask"].sum(), "most targets are near-ties"
    packed["loss_mask"] = np.where(ties, 0, packed["loss_mask"]).astype(packed["loss_mask"].dtype)
    assert not _near_ties(model, packed).any()
    examples = [e for r in range(4) for e in unpack_row({k: v[r] for k, v in packed.items()})]
    assert len(examples) >= 8, "packing put fewer than two examples per row"
    rows = [pad_example(e, LENGTH, chat.pad_id) for e in examples]
    unpacked = {k: np.stack([u[k] for u in rows]) for k in rows[0]}
    return packed, unpacked


def _mean(loss_fn, config, params, batch, mesh, accum=1):
    """The mean loss, its gradient and output of ``loss_fn(model, batch, ctx)`` as a run's
    step computes them (one policy role of ``config``, trained whole)."""
    loss, models = custom(loss_fn).loss_fn, RunModels.single(config)
    out, grads = jax.jit(lambda p, b: accumulate(loss, models, {"policy": p}, None, b,
                                                 jax.random.key(0), accum, mesh=mesh))(params, batch)
    grads = grads["policy"]
    w = float(out.weight)
    return float(out.total) / w, jax.tree.map(lambda g: np.asarray(g, np.float64) / w, grads), out


def _token_losses(model, batch, config=IFT):
    """Pass 2's token losses (at the mixed inputs) and those inputs."""
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    embeds, x_mix, _ = mixed_inputs(model, b["input_ids"], b["loss_mask"], config.lam,
                                    positions_bt=b["positions"], segment_ids_bt=b["segment_ids"])
    hidden = model.backbone(positions=b["positions"], segment_ids=b["segment_ids"],
                            inputs_embeds=embeds)
    return -next_token_log_probs(model, hidden, b["input_ids"]), embeds, x_mix


def _ift_reference(model, params, batch, config=IFT):
    """(float64 gradient, bounds) of the IFT mean loss: g_t = d loss / d ℓ_t from
    ift_reduce at pass 2's token losses, per-target gradients at the mixed inputs."""
    losses, embeds, _ = _token_losses(model, batch, config)
    mask = jnp.asarray(batch["loss_mask"][:, 1:], jnp.float32)
    seg = jnp.asarray(batch["segment_ids"][:, 1:])

    def mean(l):
        total, weight = ift_reduce(l, mask, gamma=config.gamma, segment_ids=seg,
                                   stop_gradient=config.stop_gradient_weights,
                                   normalize=config.normalize)
        return total / weight

    coeffs = jax.grad(mean)(losses)
    return gradient_and_bounds(model, params, batch, coeffs, embeds=embeds,
                               extra_depth=WEIGHT_DEPTH)


@pytest.fixture(scope="module")
def reference(data, model):
    """The float64 gradient of the IFT mean loss on the packed batch, and its bounds: what
    every invariance below is compared with (computed once for them all)."""
    return _ift_reference(model, params_of(model), data[0])


@pytest.mark.parametrize("normalize", sequences.NORMALIZATIONS)
def test_lambda_0_gamma_0_is_sft_with_the_same_normalisation(data, model, normalize):
    packed, _ = data
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    graphdef, params = model.config, params_of(model)
    batch = {k: jnp.asarray(v) for k, v in packed.items()}
    sft = functools.partial(sft_loss, normalize=normalize)
    cfg = IFTConfig(lam=0.0, gamma=0.0, normalize=normalize)
    sft_value, sft_grads, sft_out = _mean(sft, graphdef, params, batch, mesh)
    for embedding_gradient in (True, False):
        ift = make_ift_loss(IFTConfig(**{**cfg.__dict__, "embedding_gradient": embedding_gradient}))
        value, grads, out = _mean(ift, graphdef, params, batch, mesh)
        assert float(out.weight) == float(sft_out.weight)  # exact: the same counts
        assert_f32_close(value, sft_value, **llama_logp_bound(model, LENGTH, mean=True))
        # SFT's gradient in float64 from per-target gradients: g_t = d mean / d ℓ_t.
        mask = jnp.asarray(packed["loss_mask"][:, 1:], jnp.float32)
        seg = jnp.asarray(packed["segment_ids"][:, 1:])
        coeffs = jax.grad(lambda l: (lambda t, w: t / w)(*sequences.reduce(
            l, mask, seg, normalize=normalize)))(jnp.ones_like(mask))
        want, tols = gradient_and_bounds(model, params, packed, coeffs)
        leaves = jax.tree_util.tree_leaves_with_path(grads)
        for (path, got), w, tol, sft_leaf in zip(leaves, want, tols, jax.tree.leaves(sft_grads)):
            name = jax.tree_util.keystr(path)
            if name == "['embed']" and not embedding_gradient:
                # The reference reads the input table without gradient; the table is
                # untied here, so it gets none at all (SFT's is not zero).
                assert np.all(got == 0) and np.abs(sft_leaf).max() > 0
                continue
            np.testing.assert_allclose(got, w, rtol=0, atol=tol, err_msg=name)
            np.testing.assert_allclose(sft_leaf, w, rtol=0, atol=tol, err_msg=f"sft {name}")


def test_packed_equals_unpacked(data, model, reference):
    packed, unpacked = data
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    graphdef, params = model.config, params_of(model)
    loss_fn = make_ift_loss(IFT)
    v_packed, g_packed, out_p = _mean(loss_fn, graphdef, params, {k: jnp.asarray(v) for k, v in packed.items()}, mesh)
    v_alone, g_alone, out_u = _mean(loss_fn, graphdef, params, {k: jnp.asarray(v) for k, v in unpacked.items()}, mesh)
    # exact: both count the same sequences, and replace the same targets
    assert float(out_p.weight) == float(out_u.weight) == len(unpacked["input_ids"])
    assert float(out_p.aux["replaced"][0]) == float(out_u.aux["replaced"][0]) > 0
    bound = llama_logp_bound(model, LENGTH, mean=True)
    assert_f32_close(v_packed, v_alone, **dict(bound, depth=bound["depth"] + WEIGHT_DEPTH))
    want, tols = reference
    assert_grads_close(g_packed, want, tols, "packed")
    assert_grads_close(g_alone, want, tols, "unpacked")


def test_accumulated_equals_full_batch(data, model, reference):
    packed, _ = data
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    graphdef, params = model.config, params_of(model)
    batch = {k: jnp.asarray(v) for k, v in packed.items()}
    loss_fn = make_ift_loss(IFT)
    v_full, g_full, out_full = _mean(loss_fn, graphdef, params, batch, mesh, accum=1)
    v_acc, g_acc, out_acc = _mean(loss_fn, graphdef, params, batch, mesh, accum=4)
    assert float(out_full.weight) == float(out_acc.weight)  # exact: counts
    bound = llama_logp_bound(model, LENGTH, mean=True)
    assert_f32_close(v_acc, v_full, **dict(bound, depth=bound["depth"] + WEIGHT_DEPTH))
    want, tols = reference
    assert_grads_close(g_full, want, tols, "full batch")
    assert_grads_close(g_acc, want, tols, "4 micro-batches")


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2)])
def test_sharded_equals_single_device(data, model, reference, shape):
    packed, _ = data
    mesh = make_mesh(MeshConfig(*shape))
    sharded = create_model(CONFIG, seed=0, mesh=mesh)
    params = params_of(sharded)
    assert any(len(x.sharding.device_set) > 1 for x in jax.tree.leaves(params))
    sh = batch_sharding(mesh, 4)
    batch = {k: jax.device_put(jnp.asarray(v), sh) for k, v in packed.items()}
    value, grads, out = _mean(make_ift_loss(IFT), sharded.config, params, batch, mesh,
                              accum=2)
    single = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    v1, _, out1 = _mean(make_ift_loss(IFT), model.config, params_of(model),
                        {k: jnp.asarray(v) for k, v in packed.items()}, single)
    assert float(out.weight) == float(out1.weight)
    assert float(out.aux["replaced"][0]) == float(out1.aux["replaced"][0])
    bound = llama_logp_bound(model, LENGTH, mean=True)
    assert_f32_close(value, v1, **dict(bound, depth=bound["depth"] + WEIGHT_DEPTH))
    want, tols = reference
    assert_grads_close(grads, want, tols, f"mesh {shape}")
