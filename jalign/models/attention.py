"""Attention: one entry point, several backends.

Shapes: q_btnh [batch, q_len, q_heads, head_dim], k_bsgh / v_bsgh [batch, kv_len,
kv_heads, head_dim]. Grouped-query attention maps q head n to kv head n // (q_heads /
kv_heads), the same grouping Hugging Face uses. Masks: ``jalign.models.masks``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jalign.models.masks import MASK_VALUE, SelfMask, make_mask  # noqa: F401 (re-exported)


# Kernels that take a SelfMask; other masks (a KV cache's, a shared prompt's) run on XLA.
KERNELS = ("splash", "blockwise")
IMPLS = ("xla", "cudnn", "splash", "blockwise", "auto")


def target_platform() -> str:
    """The platform the program being traced runs on: the active mesh's devices (a TPU
    topology's when ``jalign plan`` compiles for one), else JAX's default backend."""
    from jalign.sharding import active_mesh
    active = active_mesh()
    if active is not None and isinstance(active[0], jax.sharding.Mesh):  # not an AbstractMesh
        return active[0].devices.flat[0].platform
    return jax.default_backend()


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """``auto``: splash on TPU, cudnn on GPU, blockwise elsewhere (measured faster than xla
    on CPU: docs/benchmarks.md, "Attention kernels")."""
    if impl != "auto":
        return impl
    return AUTO.get(platform or target_platform(), "blockwise")


AUTO = {"tpu": "splash", "gpu": "cudnn"}


def _xla_attention(q_btnh, k_bsgh, v_bsgh, mask_bts, scale):
    b, t, n, h = q_btnh.shape
    g = k_bsgh.shape[2]
    q_btgrh = q_btnh.reshape(b, t, g, n // g, h)
    scores = jnp.einsum("btgrh,bsgh->bgrts", q_btgrh, k_bsgh,
                        preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask_bts[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bsgh.dtype)
    out = jnp.einsum("bgrts,bsgh->btgrh", probs, v_bsgh)
    return out.reshape(b, t, n, h)


def _dpa_attention(q_btnh, k_bsgh, v_bsgh, mask_bts, scale, implementation):
    # jax.nn.dot_product_attention handles GQA itself (q heads a multiple of kv heads).
    return jax.nn.dot_product_attention(
        q_btnh, k_bsgh, v_bsgh, mask=mask_bts[:, None, :, :], scale=scale,
        implementation=implementation)


def attention(q_btnh, k_bsgh, v_bsgh, mask_bts, *, impl: str = "xla"):
    """Softmax attention with a boolean mask [batch, q_len, kv_len] or a ``SelfMask``;
    returns [batch, q_len, q_heads, head_dim].

    impl: ``xla`` (plain einsums, a [T, T] mask), ``cudnn`` (the fused GPU
    kernel via ``jax.nn.dot_product_attention``), ``splash`` (the TPU's Pallas kernel on a
    SelfMask; interpret mode off TPU), ``blockwise`` (query blocks with their own backward,
    plain JAX, on a SelfMask) or ``auto`` (``resolve_impl``). A dense mask always runs on
    xla or cudnn.
    """
    scale = q_btnh.shape[-1] ** -0.5
    impl = resolve_impl(impl)
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; one of {IMPLS}")
    if isinstance(mask_bts, SelfMask):
        if impl == "splash":
            from jalign.models.splash import splash_attention
            return splash_attention(q_btnh, k_bsgh, v_bsgh, mask_bts.segment_ids,
                                    window=mask_bts.window,
                                    interpret=target_platform() != "tpu")
        if impl == "blockwise":
            from jalign.models.blockwise import blockwise_attention
            return blockwise_attention(q_btnh, k_bsgh, v_bsgh, mask_bts.segment_ids,
                                       mask_bts.window)
        mask_bts = mask_bts.dense()
    if impl == "cudnn":
        backend = "cudnn" if target_platform() == "gpu" else None
        return _dpa_attention(q_btnh, k_bsgh, v_bsgh, mask_bts, scale, backend)
    return _xla_attention(q_btnh, k_bsgh, v_bsgh, mask_bts, scale)
