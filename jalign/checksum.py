"""Checksums of (sharded) arrays, to catch a checkpoint whose bytes changed on disk.

A flipped bit in a saved array either breaks decoding or, worse, restores as a plausible
number and training goes on with garbage. Each checkpoint records one checksum per array
and restore compares it with the array read back.

The checksum of an array is Σ bits(x_i) · (2i + 1) mod 2³², i the flat index in the
*global* array and bits the raw bytes as unsigned integers. The weights are odd, so any
change to a single element changes the sum; it is a sum, so each device reduces its own
shard and the cross-device reduction is an exact integer add: the value does not depend
on the mesh, and a checkpoint saved on one mesh verifies on another. It runs jitted
where the arrays live, without copying them to the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _bits_u32(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    size = x.dtype.itemsize
    if size > 4:  # [..., size / 4] words
        return lax.bitcast_convert_type(x, jnp.uint32)
    return lax.bitcast_convert_type(x, _UNSIGNED[size]).astype(jnp.uint32)


def _leaf(x: jax.Array) -> jax.Array:
    bits = _bits_u32(jnp.asarray(x))
    if bits.ndim == 0:
        return bits
    flat = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(bits.ndim)):  # row-major flat index from per-dim iotas (fused)
        flat = flat + lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(stride)
        stride = (stride * bits.shape[d]) % 2**32
    return jnp.sum(bits * (flat * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


_checksums = jax.jit(lambda tree: jax.tree.map(_leaf, tree))


def _name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_paths(tree) -> list[str]:
    """'a/b/0'-style paths of the array leaves of ``tree`` (stable across JAX versions)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return ["/".join(_name(k) for k in path) for path, _ in flat]


def checksums(tree) -> dict[str, str]:
    """{leaf path: 8 hex digits} for every array leaf of ``tree`` (None leaves skipped)."""
    if tree is None:
        return {}
    values = jax.device_get(_checksums(tree))
    return {path: f"{int(v):08x}" for path, v in zip(leaf_paths(values),
                                                     jax.tree_util.tree_leaves(values))}


def mismatches(expected: dict[str, str], tree) -> list[str]:
    """Leaves of ``tree`` whose checksum differs from ``expected`` (or is missing there)."""
    got = checksums(tree)
    bad = [f"{k} (recorded {expected.get(k, 'none')}, read {v})" for k, v in got.items()
           if expected.get(k) != v]
    bad += [f"{k} (recorded, not read)" for k in expected if k not in got]
    return bad
