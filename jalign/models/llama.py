"""Llama (2, 3, 3.1, 3.2) as a Flax NNX module. Architecture only: no loading, no losses.

Layers are stored stacked (every per-layer parameter has a leading ``layers`` axis) so the
same parameters run scanned (``lax.scan``: compile time flat in depth) or unrolled (a
Python loop: faster on CPU), chosen by ``config.scan_layers``.

Matmuls run on 2-D activations [batch*length, features]: with 3-D operands XLA:CPU
materialises a transposed copy for each weight-gradient matmul.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jalign.models import lora as L
from jalign.models.attention import KERNELS, SelfMask, attention, make_mask, resolve_impl
from jalign.models.config import LlamaConfig
from jalign.models.rope import apply_rope, rope_angles
from jalign.sharding import constrain

# Per-layer parameter names and their logical axes (without the leading "layers").
LAYER_AXES: dict[str, tuple[str, ...]] = {
    "attn_norm": ("norm",),
    "wq": ("embed", "q_heads", "head_dim"),
    "wk": ("embed", "kv_heads", "head_dim"),
    "wv": ("embed", "kv_heads", "head_dim"),
    "wo": ("q_heads", "head_dim", "embed"),
    "mlp_norm": ("norm",),
    "w_gate": ("embed", "mlp"),
    "w_up": ("embed", "mlp"),
    "w_down": ("mlp", "embed"),
}
QKV_BIAS_AXES = {"bq": ("q_heads", "head_dim"), "bk": ("kv_heads", "head_dim"),
                 "bv": ("kv_heads", "head_dim")}
ATTN_BIAS_AXES = {**QKV_BIAS_AXES, "bo": ("norm",)}
QK_NORM_AXES = {"q_norm": ("head_dim",), "k_norm": ("head_dim",)}
MLP_BIAS_AXES = {"b_gate": ("mlp",), "b_up": ("mlp",), "b_down": ("norm",)}


def layer_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one layer's parameters (without the leading layers axis)."""
    d, f, h = config.hidden_size, config.intermediate_size, config.resolved_head_dim
    nq, nkv = config.num_heads, config.num_kv_heads
    shapes = {"attn_norm": (d,), "wq": (d, nq, h), "wk": (d, nkv, h), "wv": (d, nkv, h),
              "wo": (nq, h, d), "mlp_norm": (d,), "w_gate": (d, f), "w_up": (d, f),
              "w_down": (f, d)}
    if config.attention_bias or config.qkv_bias:
        shapes.update(bq=(nq, h), bk=(nkv, h), bv=(nkv, h))
    if config.attention_bias:
        shapes.update(bo=(d,))
    if config.qk_norm:
        shapes.update(q_norm=(h,), k_norm=(h,))
    if config.mlp_bias:
        shapes.update(b_gate=(f,), b_up=(f,), b_down=(d,))
    return shapes


def layer_axes(config: LlamaConfig) -> dict[str, tuple[str, ...]]:
    axes = dict(LAYER_AXES)
    if config.attention_bias:
        axes.update(ATTN_BIAS_AXES)
    elif config.qkv_bias:
        axes.update(QKV_BIAS_AXES)
    if config.qk_norm:
        axes.update(QK_NORM_AXES)
    if config.mlp_bias:
        axes.update(MLP_BIAS_AXES)
    return axes


def rms_norm(x, scale, eps):
    # Normalise in float32 then cast back before scaling, as Hugging Face does.
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def _dense(x_btd, w_d_out, b_out=None):
    """x @ w on 2-D views; w's trailing dims are flattened and restored."""
    b, t, d = x_btd.shape
    out_shape = w_d_out.shape[1:]
    y = x_btd.reshape(b * t, d) @ w_d_out.reshape(d, -1)
    y = y.reshape(b, t, *out_shape)
    return y if b_out is None else y + b_out


def _project(p: dict, name: str, x_bt_in, bias_name: str):
    """A layer projection on 2-D views (the base weight, plain or quantised, plus its LoRA
    update when it has one): [b, t, *in] -> [b, t, *out]."""
    b, t = x_bt_in.shape[:2]
    out_shape = L.logical_shape(p, name)[L.TARGETS_IN_DIMS[name]:]
    y = L.project(p, name, x_bt_in.reshape(b * t, -1)).reshape(b, t, *out_shape)
    return y + p[bias_name] if bias_name in p else y


def project_qkv(p: dict, x_btd, cos_bth, sin_bth, eps):
    """Pre-norm and the q/k/v projections (with Qwen3's per-head norms on q and k) and
    RoPE applied: shared by the full forward and the KV-cache decode path."""
    h_btd = rms_norm(x_btd, p["attn_norm"], eps)
    q_btnh = _project(p, "wq", h_btd, "bq")
    k_btgh = _project(p, "wk", h_btd, "bk")
    v_btgh = _project(p, "wv", h_btd, "bv")
    if "q_norm" in p:  # over head_dim, each head alike
        q_btnh, k_btgh = rms_norm(q_btnh, p["q_norm"], eps), rms_norm(k_btgh, p["k_norm"], eps)
    q_btnh = constrain(q_btnh, ("batch", "length", "act_heads", None))
    k_btgh = constrain(k_btgh, ("batch", "length", "act_kv_heads", None))
    v_btgh = constrain(v_btgh, ("batch", "length", "act_kv_heads", None))
    return apply_rope(q_btnh, cos_bth, sin_bth), apply_rope(k_btgh, cos_bth, sin_bth), v_btgh


def finish_layer(p: dict, x_btd, o_btnh, eps):
    """Attention output projection + residual, then the SwiGLU MLP block + residual."""
    o_btnh = constrain(o_btnh, ("batch", "length", "act_heads", None))
    attn_btd = _project(p, "wo", o_btnh, "bo")
    x_btd = constrain(x_btd + attn_btd, ("batch", "length", "act_embed"))

    h_btd = rms_norm(x_btd, p["mlp_norm"], eps)
    gate_btf = _project(p, "w_gate", h_btd, "b_gate")
    up_btf = _project(p, "w_up", h_btd, "b_up")
    act_btf = constrain(jax.nn.silu(gate_btf) * up_btf, ("batch", "length", "act_mlp"))
    mlp_btd = _project(p, "w_down", act_btf, "b_down")
    return constrain(x_btd + mlp_btd, ("batch", "length", "act_embed"))


def decoder_layer(p: dict, x_btd, cos_bth, sin_bth, mask_bts, *, config: LlamaConfig):
    """One pre-norm transformer block on one layer's parameters ``p`` (already in compute dtype)."""
    eps = config.rms_norm_eps
    q_btnh, k_btgh, v_btgh = project_qkv(p, x_btd, cos_bth, sin_bth, eps)
    o_btnh = attention(q_btnh, k_btgh, v_btgh, mask_bts, impl=config.attention_impl)
    return finish_layer(p, x_btd, o_btnh, eps)


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _with_remat(fn, policy: str, scanned: bool):
    if policy == "none":
        return fn
    # Inside scan, CSE cannot merge the recomputation into the forward, so
    # prevent_cse=False is safe there and avoids needless barriers.
    return jax.checkpoint(fn, policy=_REMAT_POLICIES[policy], prevent_cse=not scanned)


def positions_from_segments(segment_ids_bt):
    """Positions that restart at 0 at the start of every segment of a packed row."""
    t = segment_ids_bt.shape[1]
    idx_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids_bt.shape)
    is_start = jnp.concatenate(
        [jnp.ones_like(segment_ids_bt[:, :1], dtype=bool),
         segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1)
    start_bt = jax.lax.cummax(jnp.where(is_start, idx_bt, 0), axis=1)
    return idx_bt - start_bt


class DecoderLayers(nnx.Module):
    """All decoder layers' parameters, stacked on a leading ``layers`` axis.

    With ``config.lora``, each adapted weight ``w`` gets ``w_lora_a`` / ``w_lora_b`` (also
    stacked), and a quantised base stores every projection as codes ``w`` plus ``w_scale``
    (``jalign.models.lora``)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        pdt = config.weight_dtype
        n = config.num_layers
        axes = layer_axes(config)
        shapes = layer_shapes(config)
        lora = config.lora
        for name, shape in shapes.items():
            if name.endswith("norm"):
                value = jnp.ones((n, *shape), pdt)
            elif name.startswith("b"):
                value = jnp.zeros((n, *shape), pdt)
            else:
                fan_in = shape[0] if name != "wo" else shape[0] * shape[1]
                value = jax.random.normal(rngs.params(), (n, *shape), pdt) * fan_in ** -0.5
            if lora is not None and lora.quantize and name in L.QUANTIZED_WEIGHTS:
                codes, scale = L.quantize_weight(value, name, lora.quantize, lora.block_size)
                setattr(self, name, nnx.Param(codes, logical_axes=("layers", *axes[name])))
                k = L.TARGETS_IN_DIMS[name]
                setattr(self, name + L.SCALE_SUFFIX, nnx.Param(
                    scale, logical_axes=("layers", "quant_blocks", *axes[name][k:])))
                continue
            setattr(self, name, nnx.Param(value, logical_axes=("layers", *axes[name])))
        if lora is not None and lora.enabled:
            for name, (shape, names) in L.adapter_shapes(lora, shapes, axes).items():
                value = L.init_adapter(rngs.params(), name, (n, *shape), pdt)
                setattr(self, name, nnx.Param(value, logical_axes=("layers", *names)))

    def param_names(self) -> list[str]:
        names = list(layer_shapes(self.config))
        lora = self.config.lora
        if lora is not None and lora.quantize:
            names += [w + L.SCALE_SUFFIX for w in L.QUANTIZED_WEIGHTS]
        if lora is not None and lora.enabled:
            names += [w + s for w in lora.weights() for s in L.ADAPTER_SUFFIXES]
        return names

    def stacked(self) -> dict:
        """The stacked parameter arrays, floats cast to the compute dtype (quantised codes
        and their float32 scales as stored), plus the adapters' per-layer scale and, inside
        a train step with adapter dropout, per-layer dropout keys."""
        cfg = self.config
        cdt = cfg.compute_dtype
        out = {}
        for name in self.param_names():
            value = getattr(self, name)[...]
            keep = name.endswith(L.SCALE_SUFFIX) or not jnp.issubdtype(value.dtype, jnp.floating)
            out[name] = value if keep else value.astype(cdt)
        lora = cfg.lora
        if lora is not None and lora.enabled:
            out["lora_scale"] = L.layer_scales(lora, cfg.num_layers)
            key = L.current_dropout_key()
            if lora.dropout > 0 and key is not None:
                out["lora_dropout_key"] = jax.random.key_data(
                    jax.random.split(key, cfg.num_layers))
                out["lora_keep"] = jnp.full((cfg.num_layers,), 1.0 - lora.dropout, jnp.float32)
        return out

    def run(self, layer, x, *args):
        """``x = layer(p, x, *args)`` for every layer's parameters ``p``, scanned or unrolled
        and rematerialised as the config says (``x`` may be a tuple of arrays)."""
        cfg = self.config
        params = self.stacked()
        if cfg.scan_layers:
            body = _with_remat(lambda c, p: (layer(p, c, *args), None), cfg.remat_policy,
                               scanned=True)
            x, _ = jax.lax.scan(body, x, params)
            return x
        body = _with_remat(layer, cfg.remat_policy, scanned=False)
        for i in range(cfg.num_layers):
            x = body({k: v[i] for k, v in params.items()}, x, *args)
        return x

    def __call__(self, x_btd, cos_bth, sin_bth, mask_bts):
        layer = functools.partial(decoder_layer, config=self.config)
        return self.run(layer, x_btd, cos_bth, sin_bth, mask_bts)


class Llama(nnx.Module):
    """Decoder-only Llama.

    ``model(input_ids, positions=None, segment_ids=None) -> logits [batch, length, vocab]``.
    ``inputs_embeds`` may replace ``input_ids`` (IFT mixes embeddings); ``backbone`` returns
    the final normalised hidden states for heads and memory-saving losses.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, lm_head: bool = True):
        """``lm_head=False`` builds the backbone only (reward/value models), without the
        untied output projection they would never use."""
        self.config = config
        pdt = config.weight_dtype
        d, v = config.hidden_size, config.vocab_size
        # Untied: unit-scale embeddings (RMSNorm follows). Tied: the table is also the
        # output projection, so scale it like one to keep initial logits O(1).
        embed_std = d ** -0.5 if config.tie_word_embeddings else 1.0
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (v, d), pdt) * embed_std,
                               logical_axes=("vocab", "embed"))
        self.layers = DecoderLayers(config, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones((d,), pdt), logical_axes=("norm",))
        if lm_head and not config.tie_word_embeddings:
            self.lm_head = nnx.Param(jax.random.normal(rngs.params(), (d, v), pdt) * d ** -0.5,
                                     logical_axes=("embed", "vocab"))

    def embedding_table(self):
        return self.embed[...]

    def embed_tokens(self, input_ids_bt):
        table = self.embed[...].astype(self.config.compute_dtype)
        return constrain(jnp.take(table, input_ids_bt, axis=0), ("batch", "length", "act_embed"))

    def lm_head_weight(self):
        """[embed, vocab] output projection (the embedding transposed when tied)."""
        if self.config.tie_word_embeddings:
            return self.embed[...].T
        return self.lm_head[...]

    def backbone(self, input_ids=None, positions=None, segment_ids=None, *, inputs_embeds=None):
        """Final-norm hidden states [batch, length, embed]."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x_btd = (self.embed_tokens(input_ids) if inputs_embeds is None
                 else constrain(inputs_embeds.astype(self.config.compute_dtype),
                                ("batch", "length", "act_embed")))
        b, t, _ = x_btd.shape
        index_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = positions_from_segments(segment_ids)
        if resolve_impl(self.config.attention_impl) in KERNELS:  # drawn block by block
            mask_bts = SelfMask(segment_ids, self.config.sliding_window)
        else:  # one [B, T, T] mask for every layer
            mask_bts = make_mask(segment_ids, segment_ids, index_bt, index_bt,
                                 window=self.config.sliding_window)
        cos_bth, sin_bth = rope_angles(positions, self.config)
        x_btd = self.layers(x_btd, cos_bth, sin_bth, mask_bts)
        return rms_norm(x_btd, self.final_norm[...].astype(x_btd.dtype), self.config.rms_norm_eps)

    def logits(self, hidden_btd):
        w_dv = self.lm_head_weight().astype(self.config.compute_dtype)
        return constrain(_dense(hidden_btd, w_dv), ("batch", "length", "act_vocab"))

    def __call__(self, input_ids=None, positions=None, segment_ids=None, *, inputs_embeds=None):
        return self.logits(self.backbone(input_ids, positions, segment_ids,
                                          inputs_embeds=inputs_embeds))
