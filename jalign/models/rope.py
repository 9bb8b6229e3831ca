"""Rotary position embeddings with the default, linear and llama3 frequency schedules.

Uses the half-split ("rotate_half") pairing of Hugging Face Llama checkpoints: dimension
i is rotated with dimension i + head_dim/2. Frequencies and angles are computed in
float32 whatever the compute dtype, as positions up to 128k need the precision.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jalign.models.config import LlamaConfig


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """[head_dim/2] float32 inverse frequencies after any scaling (computed on host)."""
    h = config.resolved_head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / h))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32)
    if scaling.rope_type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    # llama3: wavelengths longer than old_len/low_freq_factor are divided by `factor`,
    # shorter than old_len/high_freq_factor kept, and the band between interpolated.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_angles(positions_bt: jnp.ndarray, config: LlamaConfig):
    """cos, sin of shape [batch, length, head_dim] (float32) for integer positions."""
    inv_freq = jnp.asarray(inverse_frequencies(config))
    angles_btk = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    angles_bth = jnp.concatenate([angles_btk, angles_btk], axis=-1)
    return jnp.cos(angles_bth), jnp.sin(angles_bth)


def apply_rope(x_btnh: jnp.ndarray, cos_bth: jnp.ndarray, sin_bth: jnp.ndarray) -> jnp.ndarray:
    half = x_btnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    cos = cos_bth[:, :, None, :].astype(x_btnh.dtype)
    sin = sin_bth[:, :, None, :].astype(x_btnh.dtype)
    return x_btnh * cos + rotated * sin
