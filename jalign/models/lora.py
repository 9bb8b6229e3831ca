"""LoRA adapters and a quantised frozen base, for the stacked-layer Llama.

An adapted projection computes ``y = x W + scale * (dropout(x) A) B`` with A [in, r]
(random) and B [r, out] (zero at the start, so the adapted model equals its base
exactly), ``scale = alpha / rank``. A and B are parameters of ``DecoderLayers`` named
``<weight>_lora_a`` / ``<weight>_lora_b``, stacked on the leading ``layers`` axis like the
weights they adapt (one pair per layer, scanned or unrolled alike) and annotated with
logical axes, so the one rules table shards them.

Why not qwix's LoRA provider: it intercepts each ``dot_general`` and finds the weight by
identity with a module parameter, creating one adapter pair per parameter *name*. The
layers here are one stacked parameter sliced inside ``lax.scan``, so every layer would
share one adapter (and under scan the weight is no longer identifiable). The adapter math
is a few lines; qwix does serve the quantised base's numerics (NF4 and int8 codes with
block-wise absmax scales), see ``quantize_weight``.

A quantised base weight ``w`` is stored as ``w`` (codes: int8, or NF4 packed two per
byte) and ``w_scale`` (float32, one per ``block_size`` inputs per output), and dequantised
per layer inside the layer body, with a custom gradient that re-dequantises in the
backward pass instead of keeping the float weight as a residual.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import jax
import jax.numpy as jnp

# Target name -> (weight name, number of leading input dims of the weight after `layers`).
TARGETS = {"q": ("wq", 1), "k": ("wk", 1), "v": ("wv", 1), "o": ("wo", 2),
           "gate": ("w_gate", 1), "up": ("w_up", 1), "down": ("w_down", 1)}
ALL_TARGETS = tuple(TARGETS)
TARGETS_IN_DIMS = {w: n for w, n in TARGETS.values()}
QUANTIZE = ("int8", "nf4")
ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
SCALE_SUFFIX = "_scale"
# The base weights a quantised base stores as codes (every projection, adapted or not).
QUANTIZED_WEIGHTS = tuple(w for w, _ in TARGETS.values())


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on a frozen base. ``rank=0``: full fine-tuning (no adapters).

    ``targets``: projections to adapt (q, k, v, o, gate, up, down). ``layers``: indices of
    the layers that get adapters (None: all). ``quantize``: store the frozen base as
    ``int8`` or ``nf4`` codes with a float32 absmax scale per ``block_size`` inputs (QLoRA).
    ``value_base``: PPO's value model with LoRA: ``shared`` (an adapter set and a score
    head on the policy's frozen base: one base in memory) or ``own`` (a frozen base of its
    own, e.g. a reward model given by ``PPOConfig.value_init``)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_TARGETS
    layers: tuple[int, ...] | None = None
    quantize: str | None = None
    block_size: int = 64
    value_base: str = "shared"

    def __post_init__(self):
        for name in ("targets", "layers"):
            value = getattr(self, name)
            if isinstance(value, list):  # gin and JSON give lists: keep the config hashable
                object.__setattr__(self, name, tuple(value))
        if self.rank < 0:
            raise ValueError(f"LoraConfig.rank must be >= 0, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoraConfig.targets={self.targets!r}: name each of "
                             f"{ALL_TARGETS} at most once (unknown: {unknown})")
        if self.quantize not in (None, *QUANTIZE):
            raise ValueError(f"LoraConfig.quantize={self.quantize!r}; one of None, {QUANTIZE}")
        if self.block_size <= 0 or self.block_size % 2:
            raise ValueError(f"LoraConfig.block_size must be a positive even number, got "
                             f"{self.block_size}")
        if self.value_base not in ("shared", "own"):
            raise ValueError(f"LoraConfig.value_base={self.value_base!r}; 'shared' or 'own'")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(f"LoraConfig.layers={self.layers!r}: non-negative layer indices")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def weights(self) -> tuple[str, ...]:
        """The adapted weights' names (``wq`` ...), in the model's order."""
        return tuple(TARGETS[t][0] for t in ALL_TARGETS if t in self.targets)

    def adapters_off(self) -> "LoraConfig | None":
        """The same frozen base without adapters (the DPO/PPO reference), or None when the
        base is plain."""
        if self.quantize is None:
            return None
        return dataclasses.replace(self, rank=0)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["targets"] = list(self.targets)
        out["layers"] = None if self.layers is None else list(self.layers)
        return out


def check(lora: LoraConfig, shapes: dict, num_layers: int, binding: str = "LoraConfig") -> None:
    """Problems knowable from the shapes alone, raised as ValueError naming the field."""
    if lora.layers is not None and max(lora.layers) >= num_layers:
        raise ValueError(f"{binding}.layers={lora.layers}: the model has {num_layers} layers")
    if lora.quantize is not None:
        for w in QUANTIZED_WEIGHTS:
            n_in = math.prod(shapes[w][:TARGETS_IN_DIMS[w]])
            if n_in % lora.block_size:
                raise ValueError(f"{binding}.block_size={lora.block_size} does not divide the "
                                 f"{n_in} inputs of {w} {shapes[w]}")
            if lora.quantize == "nf4" and shapes[w][-1] % 2:
                raise ValueError(f"{binding}.quantize='nf4' packs two codes per byte along the "
                                 f"last axis of {w} {shapes[w]}, which is odd; use 'int8'")


def is_adapter(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


def adapter_shapes(lora: LoraConfig, shapes: dict, axes: dict) -> dict:
    """{param name: (shape without layers, logical axes without layers)} of the adapters."""
    out = {}
    for w in lora.weights():
        k = TARGETS_IN_DIMS[w]
        in_shape, out_shape = shapes[w][:k], shapes[w][k:]
        out[w + "_lora_a"] = ((*in_shape, lora.rank), (*axes[w][:k], "lora_rank"))
        out[w + "_lora_b"] = ((lora.rank, *out_shape), ("lora_rank", *axes[w][k:]))
    return out


def init_adapter(key, name: str, shape: tuple[int, ...], dtype):
    """A: uniform in +-1/sqrt(fan_in) (the scale PEFT's default Kaiming init gives);
    B: zeros, so that a fresh adapter changes nothing."""
    if name.endswith("_lora_b"):
        return jnp.zeros(shape, dtype)
    fan_in = math.prod(shape[1:-1])  # shape is [layers, *in, rank]
    bound = fan_in ** -0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def layer_scales(lora: LoraConfig, num_layers: int) -> jax.Array:
    """[layers] float32: alpha/rank on the adapted layers, 0 on the others."""
    chosen = range(num_layers) if lora.layers is None else lora.layers
    return jnp.asarray([lora.scale if i in chosen else 0.0 for i in range(num_layers)],
                       jnp.float32)


# ------------------------------------------------------------------ quantised base

def _quantize_codes(w3, kind: str, block: int):
    """qwix's absmax quantisation of a [layers, in, out] weight, a scale per ``block``
    inputs per output."""
    import qwix
    qtype = jnp.int8 if kind == "int8" else "nf4"
    q = qwix.quantize(w3.astype(jnp.float32), qtype, channelwise_axes=(0, 2),
                      tiled_axes={1: block}, scale_dtype=jnp.float32)
    return q.qvalue, q.scale


def quantize_weight(w, weight: str, kind: str, block: int) -> tuple[jax.Array, jax.Array]:
    """(codes, scale) of a stacked base weight [layers, *in, *out]. Codes keep the weight's
    shape: int8, or uint8 with two NF4 codes per byte along the last axis (even and odd
    entries, so a shard of heads holds its own codes); scale float32
    [layers, in/block, *out], absmax over each block of ``block`` (flattened) inputs."""
    k = TARGETS_IN_DIMS[weight]
    n_layers, in_shape, out_shape = w.shape[0], w.shape[1:1 + k], w.shape[1 + k:]
    w3 = w.reshape(n_layers, math.prod(in_shape), math.prod(out_shape))
    codes, scale = _quantize_codes(w3, kind, block)
    codes = codes.reshape(w.shape)
    if kind == "nf4":
        codes = codes.astype(jnp.uint8)
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale.reshape(n_layers, scale.shape[1], *out_shape)


def logical_shape(p: dict, weight: str) -> tuple[int, ...]:
    """One layer's ``weight`` shape as the model sees it (codes of NF4 are half as wide)."""
    shape = p[weight].shape
    if quantized_kind(p, weight) == "nf4":
        return (*shape[:-1], 2 * shape[-1])
    return tuple(shape)


def _dequantize(codes, scale, kind: str):
    """One layer's float32 weight [*in, *out] from its codes and scale."""
    import qwix
    if kind == "nf4":
        codes = jnp.stack([codes & 15, codes >> 4], axis=-1).reshape(
            *codes.shape[:-1], 2 * codes.shape[-1]).astype(jnp.uint4)
    shape = codes.shape
    n_out = math.prod(scale.shape[1:])
    codes2d, scale2d = codes.reshape(-1, n_out), scale.reshape(scale.shape[0], n_out)
    qarray = (qwix.QArray(codes2d, scale2d, qtype="nf4") if kind == "nf4"
              else qwix.QArray(codes2d, scale2d))
    return qwix.dequantize(qarray).reshape(shape)


def _w2d(codes, scale, kind, n_in, dtype):
    return _dequantize(codes, scale, kind).astype(dtype).reshape(n_in, -1)


@jax.custom_vjp
def _qmatmul_int8(x2d, codes, scale):
    return x2d @ _w2d(codes, scale, "int8", x2d.shape[1], x2d.dtype)


@jax.custom_vjp
def _qmatmul_nf4(x2d, codes, scale):
    return x2d @ _w2d(codes, scale, "nf4", x2d.shape[1], x2d.dtype)


def _make_vjp(kind):
    def fwd(x2d, codes, scale):
        return x2d @ _w2d(codes, scale, kind, x2d.shape[1], x2d.dtype), (codes, scale)

    def bwd(res, g):
        # The base is frozen: only the input's gradient, from a re-dequantised weight (so
        # the float weight is never a stored residual of the forward).
        codes, scale = res
        w = _dequantize(codes, scale, kind).astype(g.dtype).reshape(-1, g.shape[1])
        return g @ w.T, None, None

    return fwd, bwd


_qmatmul_int8.defvjp(*_make_vjp("int8"))
_qmatmul_nf4.defvjp(*_make_vjp("nf4"))


def quantized_kind(p: dict, weight: str) -> str | None:
    """'int8' / 'nf4' when the layer dict ``p`` holds ``weight`` as codes, else None."""
    if weight + SCALE_SUFFIX not in p:
        return None
    return "int8" if p[weight].dtype == jnp.int8 else "nf4"


def dequantized(p: dict, weight: str, dtype):
    """One layer's ``weight`` as a float array of its logical shape (no layers axis)."""
    kind = quantized_kind(p, weight)
    if kind is None:
        return p[weight].astype(dtype)
    return _dequantize(p[weight], p[weight + SCALE_SUFFIX], kind).astype(dtype)


# ------------------------------------------------------------------ adapted projection

_DROPOUT: contextvars.ContextVar = contextvars.ContextVar("jalign_lora_dropout", default=None)


@contextlib.contextmanager
def dropout_key(key):
    """Adapter dropout is applied inside this block (a train step), keyed by ``key``."""
    token = _DROPOUT.set(key)
    try:
        yield
    finally:
        _DROPOUT.reset(token)


def current_dropout_key():
    return _DROPOUT.get()


def project(p: dict, weight: str, x2d):
    """``x2d [N, in] @ weight`` plus, when ``p`` holds an adapter for it, the scaled
    low-rank update: [N, out]. ``p`` is one layer's parameters (compute dtype), with
    ``lora_scale`` (and, in a train step with dropout, ``lora_dropout_key`` and
    ``lora_keep``) added by ``DecoderLayers.stacked``."""
    kind = quantized_kind(p, weight)
    if kind is None:
        y = x2d @ p[weight].reshape(x2d.shape[1], -1)
    else:
        fn = _qmatmul_int8 if kind == "int8" else _qmatmul_nf4
        y = fn(x2d, p[weight], p[weight + SCALE_SUFFIX])
    a_name = weight + "_lora_a"
    if a_name not in p:
        return y
    a, b = p[a_name], p[weight + "_lora_b"]
    rank = a.shape[-1]
    x_in = x2d
    if "lora_dropout_key" in p:
        key = jax.random.fold_in(jax.random.wrap_key_data(p["lora_dropout_key"]),
                                 QUANTIZED_WEIGHTS.index(weight))
        keep_p = p["lora_keep"]
        keep = jax.random.bernoulli(key, keep_p, x2d.shape)
        x_in = jnp.where(keep, x2d / keep_p.astype(x2d.dtype), 0).astype(x2d.dtype)
    delta = (x_in @ a.reshape(-1, rank)) @ b.reshape(rank, -1)
    return y + delta * p["lora_scale"].astype(delta.dtype)


# ------------------------------------------------------------------ merging

def merged_layers(layers: dict, lora: LoraConfig, dtype) -> dict:
    """The stacked layer params of a plain model: each adapted weight becomes
    ``W + scale * A B`` (computed in float32), quantised weights are dequantised, adapter
    and scale entries dropped."""
    n = next(iter(layers.values())).shape[0]
    scales = layer_scales(lora, n) if lora.enabled else None
    out = {}
    for name, value in layers.items():
        if is_adapter(name) or (name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in layers):
            continue
        if name + SCALE_SUFFIX in layers:
            value = jnp.stack([dequantized({name: value[i], name + SCALE_SUFFIX:
                                            layers[name + SCALE_SUFFIX][i]}, name, jnp.float32)
                               for i in range(n)])
        if name + "_lora_a" in layers:
            a, b = layers[name + "_lora_a"], layers[name + "_lora_b"]
            r = a.shape[-1]
            delta = jnp.einsum("lir,lro->lio", a.reshape(n, -1, r).astype(jnp.float32),
                               b.reshape(n, r, -1).astype(jnp.float32))
            value = value.astype(jnp.float32) + (scales[:, None, None] * delta).reshape(
                value.shape)
        out[name] = value.astype(dtype)
    return out
