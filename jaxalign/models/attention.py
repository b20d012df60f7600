"""Grouped-query self-attention and the attention masks (causal, padding, packing, sliding window)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign import sharding
from jaxalign.models.config import ModelConfig
from jaxalign.models.layers import Dense, RMSNorm
from jaxalign.models.rope import apply_rotary


def causal_segment_mask(segment_ids: jax.Array, window: int | None = None) -> jax.Array:
  """Boolean [B, T, S=T] mask: query t sees key s iff s <= t, both in the same non-zero segment,
  and (with a sliding window) t - s < window.

  segment_ids [B, T]: 0 marks padding, equal positive ids mark one document (a plain padded batch
  is its attention mask; a packed row numbers its documents 1, 2, ...).
  """
  t = jnp.arange(segment_ids.shape[1])
  causal = t[None, :] <= t[:, None]  # [T, S]
  if window is not None:
    causal &= t[:, None] - t[None, :] < window
  same_doc = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)
  return causal[None] & same_doc  # [B, T, S]


def cache_mask(q_positions: jax.Array, k_positions: jax.Array, k_valid: jax.Array,
               window: int | None = None) -> jax.Array:
  """Boolean [B, T, S] mask for cached decoding: query t sees cache slot s iff the slot holds a real
  token, its position is <= the query's, and (with a sliding window) q_pos - k_pos < window.

  q_positions [B, T], k_positions [B, S] int32; k_valid [B, S] bool. For one left-padded sequence per
  row this is `causal_segment_mask` of that row restricted to the cached slots.
  """
  q, k = q_positions[:, :, None], k_positions[:, None, :]  # [B, T, 1], [B, 1, S]
  mask = k_valid[:, None, :] & (k <= q)
  if window is not None:
    mask &= q - k < window
  return mask  # [B, T, S]


# One layer's KV cache: {"k": [B, S, K, H], "v": [B, S, K, H]} in the cache dtype, S = cache length.
LayerCache = dict[str, jax.Array]


class Attention(nnx.Module):
  """Multi-head attention with K <= N key/value heads, RoPE, optional qkv bias and q/k RMSNorm."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
    self.q_proj = Dense(d, n * h, ("embed", "q_heads"), use_bias=cfg.qkv_bias, **kw)
    self.k_proj = Dense(d, k * h, ("embed", "kv_heads"), use_bias=cfg.qkv_bias, **kw)
    self.v_proj = Dense(d, k * h, ("embed", "kv_heads"), use_bias=cfg.qkv_bias, **kw)
    self.o_proj = Dense(n * h, d, ("q_heads", "embed"), **kw)
    if cfg.qk_norm:
      norm_kw = dict(eps=cfg.rms_norm_eps, offset=cfg.norm_offset, param_dtype=cfg.weight_dtype, rngs=rngs)
      self.q_norm, self.k_norm = RMSNorm(h, **norm_kw), RMSNorm(h, **norm_kw)
    else:
      self.q_norm = self.k_norm = None
    self.num_heads, self.num_kv_heads, self.head_dim = n, k, h

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
    """x [B, T, D], rotary tables [B, T, H], mask [B, T, S] -> [B, T, D]."""
    return self._attend(*self._qkv(x, cos, sin), mask)

  def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, cache: LayerCache,
             index: jax.Array) -> tuple[LayerCache, jax.Array]:
    """Cached attention: write this call's keys/values at cache slots [index, index + T), then attend.

    x [B, T, D], rotary tables [B, T, H], mask [B, T, S] over the S cache slots (`cache_mask`),
    cache {"k", "v"} [B, S, K, H], index [] int32. Returns (new_cache, out [B, T, D]).
    """
    q, key, value = self._qkv(x, cos, sin)
    start = (0, index, 0, 0)
    key = jax.lax.dynamic_update_slice(cache["k"], key.astype(cache["k"].dtype), start)  # [B, S, K, H]
    value = jax.lax.dynamic_update_slice(cache["v"], value.astype(cache["v"].dtype), start)  # [B, S, K, H]
    names = ("batch", "seq", "kv_heads", "head_dim")
    new_cache = {"k": sharding.constrain(key, names), "v": sharding.constrain(value, names)}
    return new_cache, self._attend(q, new_cache["k"], new_cache["v"], mask)

  def _qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rotated queries [B, T, K, G, H], rotated keys [B, T, K, H] and values [B, T, K, H]."""
    b, t, _ = x.shape
    n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
    q = self.q_proj(x).reshape(b, t, n, h)  # [B, T, N, H]
    key = self.k_proj(x).reshape(b, t, k, h)  # [B, T, K, H]
    value = self.v_proj(x).reshape(b, t, k, h)  # [B, T, K, H]
    if self.q_norm is not None:
      q, key = self.q_norm(q), self.k_norm(key)
    q, key = apply_rotary(q, cos, sin), apply_rotary(key, cos, sin)
    q = sharding.constrain(q, ("batch", "seq", "q_heads", "head_dim"))
    return q.reshape(b, t, k, n // k, h), key, value  # q: [B, T, K, G, H]

  def _attend(self, q: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B, T, K, G, H], key/value [B, S, K, H], mask [B, T, S] -> [B, T, D]."""
    b, t, k, g, h = q.shape
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, key, preferred_element_type=jnp.float32) * h**-0.5
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)  # [B, K, G, T, S]
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, value).reshape(b, t, k * g * h)
    return self.o_proj(out)  # [B, T, D]
