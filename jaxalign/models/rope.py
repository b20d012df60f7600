"""Rotary position embeddings (Su et al. 2021, arXiv:2104.09864), in the HF "rotate half" layout."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models.config import ModelConfig, RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
  """The H/2 rotary frequencies, with linear or Llama-3.1 context scaling. Returns float32 [H/2]."""
  inv_freq = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
  if rope.type == "linear":
    return (inv_freq / rope.factor).astype(np.float32)
  if rope.type == "llama3":
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    context = rope.original_max_position_embeddings
    low_freq_wavelen = context / rope.low_freq_factor
    high_freq_wavelen = context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  return inv_freq.astype(np.float32)


def rotary_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables for integer positions [B, T]. Returns two float32 [B, T, H]."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
  return jnp.cos(emb), jnp.sin(emb)


def model_rotary_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin [R, B, T, H] of each of the model's R RoPEs (`ModelConfig.ropes`; a layer takes table
  `cfg.layer_rope(layer)`) at positions [B, T]."""
  tables = [rotary_tables(positions, inverse_frequencies(rope, cfg.head_size)) for rope in cfg.ropes()]
  return jnp.stack([c for c, _ in tables]), jnp.stack([s for _, s in tables])


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate x [B, T, N, H] by the tables [B, T, H]; returns x's dtype."""
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin
