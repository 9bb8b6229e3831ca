"""Self-attention through the TPU's Pallas splash-attention kernel.

``jax.experimental.pallas.ops.tpu.splash_attention`` computes causal (or sliding-window)
attention block by block with its own backward, never materialising the [heads, T, T]
scores, and skips blocks the mask empties. Packing is by segment ids; grouped-query
attention is native (q heads a multiple of kv heads). Off TPU the same kernel runs in
Pallas interpret mode: the numerics tests compare it with the XLA path on CPU.

Rows are padded to a multiple of the kernel's block with a segment id no token has, so
real tokens never see the padding. Under a mesh the kernel (a custom call XLA cannot
partition) runs per shard in ``shard_map``: rows over the batch axes, heads over the
tensor axis.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

BLOCK = 512          # the kernel's query and key block (fewer for shorter rows)
_PAD_SEGMENT = -1    # segment id of the rows' padding up to a whole block


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, length: int, block: int, window: int | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk, splash_attention_mask as sm)
    shape = (length, length)
    # jalign's window: a query sees keys fewer than `window` tokens back (and itself)
    one = sm.CausalMask(shape) if window is None else sm.LocalMask(shape, (window - 1, 0), 0)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q_bnth, k_bgth, v_bgth, seg_bt, window, interpret):
    """The kernel on one shard's rows and heads (vmapped over rows)."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import (
        SegmentIds)
    t = q_bnth.shape[2]
    kernel = _kernel(q_bnth.shape[1], t, min(BLOCK, t), window, interpret)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(s, s)))(
        q_bnth, k_bgth, v_bgth, seg_bt)


def _block(t: int) -> int:
    """Rows padded to a multiple of 128 (the TPU's lane width) and of BLOCK when longer."""
    return BLOCK * math.ceil(t / BLOCK) if t > BLOCK else 128 * math.ceil(t / 128)


def splash_attention(q_btnh, k_bsgh, v_bsgh, segment_ids_bt, *, window=None,
                     interpret: bool = False):
    """Causal self-attention of rows whose tokens sit at indices 0..T-1, masked by segment
    (and ``window``); returns [batch, T, q_heads, head_dim] like ``attention``."""
    from jalign.sharding import active_mesh, logical_to_spec
    b, t, n, h = q_btnh.shape
    g = k_bsgh.shape[2]
    padded = _block(t)
    pad = ((0, 0), (0, padded - t), (0, 0), (0, 0))
    # The kernel does not scale: q carries the softmax scale.
    q = jnp.pad(q_btnh * jnp.asarray(h ** -0.5, q_btnh.dtype), pad).transpose(0, 2, 1, 3)
    k = jnp.pad(k_bsgh, pad).transpose(0, 2, 1, 3)
    v = jnp.pad(v_bsgh, pad).transpose(0, 2, 1, 3)
    seg = jnp.pad(segment_ids_bt.astype(jnp.int32), ((0, 0), (0, padded - t)),
                  constant_values=_PAD_SEGMENT)
    local = functools.partial(_local, window=window, interpret=interpret)
    active = active_mesh()
    if active is not None:
        mesh, rules = active
        rows = logical_to_spec(("batch",), (b,), mesh, rules)[0]
        heads = logical_to_spec(("act_heads",), (n,), mesh, rules)[0]
        kv_heads = logical_to_spec(("act_kv_heads",), (g,), mesh, rules)[0]
        if heads != kv_heads:  # kv heads that do not split like q's: give every q head its own
            k, v = (jnp.repeat(x, n // g, axis=1) for x in (k, v))
            kv_heads = heads
        P = jax.sharding.PartitionSpec
        local = jax.shard_map(local, mesh=mesh, check_vma=False,
                              in_specs=(P(rows, heads), P(rows, kv_heads), P(rows, kv_heads),
                                        P(rows)), out_specs=P(rows, heads))
    out = local(q, k, v, seg)
    return out.transpose(0, 2, 1, 3)[:, :t]
