"""LoRA adapters and the quantised base, at the model level: a fresh adapter changes
nothing (exactly, scanned and unrolled, sharded and single device), merging computes what
the adapters compute, the quantised weights follow qwix's block-wise numerics, and the
quantised matmul's gradient is the dequantised weight's."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jalign.models import lora as L
from jalign.models.build import create_model, forward
from jalign.models.config import LlamaConfig, preset
from jalign.models.heads import LM, SCALAR
from jalign.models.llama import layer_shapes
from jalign.models.lora import LoraConfig
from jalign.sharding import MeshConfig, make_mesh
from jalign.models.adapters import attach, merge
from jalign.models.build import params_of
from tests.numerics import assert_f32_close, llama_logits_bound

CONFIG = preset("tiny", vocab_size=128)  # GQA 4:2, untied
IDS = (np.arange(2 * 16).reshape(2, 16) * 7 % 120 + 3).astype(np.int32)
SEGMENTS = np.array([[1] * 16, [1] * 10 + [2] * 4 + [0] * 2], np.int32)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("tied", [False, True])
def test_fresh_adapters_leave_the_logits_unchanged_exactly(scan, tied):
    config = CONFIG.replace(scan_layers=scan, tie_word_embeddings=tied)
    base = create_model(config, seed=1)
    want = np.asarray(forward(base, IDS, None, SEGMENTS))
    adapted = attach(base, LoraConfig(rank=4, alpha=8), seed=2)
    assert adapted.config.lora.rank == 4 and adapted.layers.wq_lora_a[...].shape == (2, 64, 4)
    assert float(jnp.abs(adapted.layers.wq_lora_a[...]).max()) > 0  # A is random
    # exact by construction: x W + scale * (x A) 0 adds zeros to the base's products
    np.testing.assert_array_equal(np.asarray(forward(adapted, IDS, None, SEGMENTS)), want)


@pytest.mark.parametrize("shape, scan", [((2, 2, 2), True), ((1, 4, 2), False)])
def test_fresh_adapters_leave_sharded_logits_unchanged_exactly(shape, scan):
    mesh = make_mesh(MeshConfig(*shape))
    base = create_model(CONFIG.replace(scan_layers=scan), seed=1, mesh=mesh)
    want = np.asarray(forward(base, IDS, None, SEGMENTS, mesh=mesh))
    adapted = attach(base, LoraConfig(rank=4), seed=2, mesh=mesh)
    b = adapted.layers.wq_lora_b[...]
    assert b.sharding.spec[3 - 1] == "tensor"  # B's q_heads dim sharded by the rules table
    np.testing.assert_array_equal(np.asarray(forward(adapted, IDS, None, SEGMENTS, mesh=mesh)),
                                  want)


def _with_random_b(model, seed=0, scale=0.05):
    """``model`` with every B drawn at random (a trained adapter)."""
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    key = jax.random.key(seed)

    def fill(path, x):
        name = str(path[-1].key)
        if name.endswith("_lora_b"):
            return scale * jax.random.normal(jax.random.fold_in(key, hash(name) % 997), x.shape)
        return x

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, params))
    return nnx.merge(graphdef, state)


@pytest.mark.parametrize("layers", [None, (1,)])
def test_merged_weights_compute_what_the_adapters_compute(layers):
    adapted = _with_random_b(attach(create_model(CONFIG, seed=1),
                                    LoraConfig(rank=4, alpha=8, targets=("q", "o", "down"),
                                               layers=layers), seed=2))
    merged = merge(adapted)
    assert merged.config.lora is None and not any(
        L.is_adapter(k) for k in params_of(merged)["layers"])
    out = np.asarray(forward(adapted, IDS, None, SEGMENTS))
    want = np.asarray(forward(merged, IDS, None, SEGMENTS))
    # Two float32 programs for one forward (unmerged vs merged products).
    assert_f32_close(out, want, **llama_logits_bound(merged, IDS.shape[1]))
    if layers == (1,):  # layer 0 has adapters but scale 0: its merged weights are the base's
        base = create_model(CONFIG, seed=1)
        np.testing.assert_array_equal(np.asarray(merged.layers.wq[...][0]),
                                      np.asarray(base.layers.wq[...][0]))
        assert not np.array_equal(np.asarray(merged.layers.wq[...][1]),
                                  np.asarray(base.layers.wq[...][1]))


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantised_base_follows_blockwise_absmax_numerics(kind):
    import qwix
    base = create_model(CONFIG, seed=1)
    adapted = attach(base, LoraConfig(rank=2, quantize=kind, block_size=16), seed=2)
    layers = params_of(adapted)["layers"]
    w = np.asarray(params_of(create_model(CONFIG, seed=1))["layers"]["w_up"])  # [L, 64, 128]
    codes, scale = layers["w_up"], layers["w_up_scale"]
    assert scale.shape == (2, 64 // 16, 128) and scale.dtype == jnp.float32
    assert codes.dtype == (jnp.int8 if kind == "int8" else jnp.uint8)
    assert codes.shape == ((2, 64, 128) if kind == "int8" else (2, 64, 64))
    # scale = absmax of each block of 16 inputs / the code range's bound
    absmax = np.abs(w.reshape(2, 4, 16, 128)).max(axis=2)
    bound = 127.5 if kind == "int8" else 1.0
    np.testing.assert_allclose(np.asarray(scale), absmax / bound, rtol=1e-6)
    deq = np.stack([np.asarray(L.dequantized({"w_up": codes[i], "w_up_scale": scale[i]},
                                             "w_up", jnp.float32)) for i in range(2)])
    # The same numbers qwix gives for the unpacked weight.
    q = qwix.quantize(jnp.asarray(w), jnp.int8 if kind == "int8" else "nf4",
                      channelwise_axes=(0, 2), tiled_axes={1: 16}, scale_dtype=jnp.float32)
    np.testing.assert_array_equal(deq, np.asarray(qwix.dequantize(q)))
    # Rounding error per entry: at most half the widest gap between adjacent codes (int8:
    # one step of scale; NF4: its widest level gap, 0.304 of absmax, between -1 and -0.696),
    # plus the float32 rounding of w / scale (relative 2^-23, on values up to ``bound``).
    gap = 1.0 if kind == "int8" else 0.3039
    err = np.abs(deq - w).reshape(2, 4, 16, 128)
    slack = 2 * bound * 2.0 ** -23
    assert np.all(err <= (gap / 2 + slack) * np.asarray(scale)[:, :, None, :])


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantised_matmul_gradient_is_the_dequantised_weights(kind):
    w = jax.random.normal(jax.random.key(0), (1, 64, 4, 16))
    codes, scale = L.quantize_weight(w, "wq", kind, 16)
    p = {"wq": codes[0], "wq_scale": scale[0]}
    x = jax.random.normal(jax.random.key(1), (6, 64))
    g = jax.random.normal(jax.random.key(2), (6, 64))
    w2d = L.dequantized(p, "wq", jnp.float32).reshape(64, 64)
    y, vjp = jax.vjp(lambda x: L.project(p, "wq", x), x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x @ w2d))
    # The custom backward re-dequantises: the same product as through the float weight.
    np.testing.assert_array_equal(np.asarray(vjp(g)[0]), np.asarray(g @ w2d.T))


def test_memory_per_base_parameter():
    """Stored bytes per projection weight of the base: float32 4, int8 1 + 4/block (its
    float32 scale), NF4 1/2 + 4/block."""
    config = preset("tiny", vocab_size=128, hidden_size=128, intermediate_size=256)
    block = 64

    def projection_bytes(model):
        layers = params_of(model)["layers"]
        return sum(v.nbytes for k, v in layers.items()
                   if k in L.QUANTIZED_WEIGHTS or k.endswith(L.SCALE_SUFFIX))

    n = sum(int(np.prod(s)) for k, s in layer_shapes(config).items()
            if k in L.QUANTIZED_WEIGHTS) * config.num_layers
    full = projection_bytes(create_model(config, seed=0))
    assert full == 4 * n
    for kind, per_param in (("int8", 1 + 4 / block), ("nf4", 0.5 + 4 / block)):
        adapted = attach(create_model(config, seed=0), LoraConfig(rank=2, quantize=kind,
                                                                    block_size=block))
        assert projection_bytes(adapted) == per_param * n


def test_every_head_takes_adapters():
    for head in (LM, SCALAR):
        model = attach(create_model(CONFIG, seed=0, head=head), LoraConfig(rank=2))
        flat = jax.tree_util.tree_flatten_with_path(params_of(model))[0]
        names = {"/".join(str(k.key) for k in path) for path, _ in flat}
        layers = "backbone/layers" if head == SCALAR else "layers"
        assert f"{layers}/wq_lora_a" in names and f"{layers}/w_down_lora_b" in names


def test_lora_config_round_trips_and_rejects_bad_values():
    config = CONFIG.replace(lora=LoraConfig(rank=4, targets=["q", "v"], layers=[1],
                                            quantize="nf4"))
    again = LlamaConfig.from_dict(json.loads(config.to_json()))
    assert again == config and hash(again) == hash(config)
    assert CONFIG.replace(lora=LoraConfig()).lora is None  # rank 0 on a plain base
    for bad, field in ((dict(rank=-1), "rank"), (dict(targets=("q", "x")), "targets"),
                       (dict(quantize="int4"), "quantize"), (dict(dropout=1.0), "dropout"),
                       (dict(layers=()), "layers"), (dict(value_base="x"), "value_base")):
        with pytest.raises(ValueError, match=field):
            LoraConfig(**bad)


def test_adapter_dropout_acts_only_inside_its_context():
    adapted = _with_random_b(attach(create_model(CONFIG, seed=1), LoraConfig(rank=4,
                                                                             dropout=0.5), seed=2))
    plain = np.asarray(forward(adapted, IDS, None, SEGMENTS))  # no context: no dropout
    graphdef, state = nnx.split(adapted)

    def run(key):
        with L.dropout_key(key):
            return nnx.merge(graphdef, state)(IDS, None, SEGMENTS)

    a, b = jax.jit(run)(jax.random.key(0)), jax.jit(run)(jax.random.key(1))
    again = jax.jit(run)(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(again))  # keyed: reproducible
    assert float(jnp.abs(a - b).max()) > 1e-3 and float(jnp.abs(a - plain).max()) > 1e-3
    # Dropout is on the adapters' input only: with B = 0 it changes nothing.
    fresh = attach(create_model(CONFIG, seed=1), LoraConfig(rank=4, dropout=0.5), seed=2)
    g2, s2 = nnx.split(fresh)
    with L.dropout_key(jax.random.key(0)):
        out = jax.jit(lambda s: nnx.merge(g2, s)(IDS, None, SEGMENTS))(s2)
    np.testing.assert_array_equal(np.asarray(out),
                                  np.asarray(forward(create_model(CONFIG, seed=1), IDS, None,
                                                     SEGMENTS)))
