"""Grouped-query self-attention and the attention masks (causal, padding, packing, sliding window)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from typing import NamedTuple

from jaxalign import sharding
from jaxalign.models.config import ModelConfig
from jaxalign.ops.attention import attention
from jaxalign.models.layers import Dense, RMSNorm
from jaxalign.models.rope import apply_rotary


class MaskInfo(NamedTuple):
  """Which keys each query sees, as O(T + S) data: query t sees key s iff both are in the same non-zero
  segment, k_positions[s] <= q_positions[t] and (with a window w) q_positions[t] - k_positions[s] < w.

  No [T, S] mask is ever built for a whole sequence; the attention op derives each block's mask.
  """

  q_positions: jax.Array  # [B, T] int32
  q_segment_ids: jax.Array  # [B, T] int32
  # [B, S] int32 each; None for self-attention over the same tokens (S = T, the q arrays serve), which
  # lets the attention kernels (splash, Pallas GPU) take the call.
  k_positions: jax.Array | None = None
  k_segment_ids: jax.Array | None = None


def sequence_mask_info(segment_ids: jax.Array) -> MaskInfo:
  """Training / full forward: query t sees key s iff s <= t and both are in the same non-zero segment."""
  index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)  # [B, T]
  return MaskInfo(index, segment_ids.astype(jnp.int32))


def cache_mask_info(q_positions: jax.Array, k_positions: jax.Array, k_valid: jax.Array) -> MaskInfo:
  """Cached decoding: query t (a real token) sees cache slot s iff the slot holds a real token and its
  position is <= the query's (the layer's window then applies to q_pos - k_pos). For one left-padded
  sequence per row this is `sequence_mask_info`'s rule restricted to the cached slots."""
  ones = jnp.ones_like(q_positions, jnp.int32)
  return MaskInfo(q_positions.astype(jnp.int32), ones, k_positions.astype(jnp.int32), k_valid.astype(jnp.int32))


# One layer's KV cache: {"k": [B, K, S, H], "v": [B, K, S, H]} in the cache dtype, S = cache length. Heads
# before slots: the attention dots batch over (B, K), so their operands need no transposed copy of the cache
# (XLA:CPU copied the whole [B, S, K, H] cache at every decode step to get there).
LayerCache = dict[str, jax.Array]


def cache_axes() -> tuple[str, str, str, str]:
  """Logical names of a KV cache [B, K, S, H]. Its rows are "cache_batch" where the active rules name it
  (the decode layout, `jaxalign.rollout.decode_layout`, splits the cache's rows apart from the
  activations' to spread it over devices its K heads cannot use), else "batch" like every activation."""
  rules = sharding.active_rules()
  rows = "cache_batch" if rules is not None and "cache_batch" in dict(rules) else "batch"
  return (rows, "kv_heads", "seq", "head_dim")


def cache_slot_axes() -> tuple[str, str]:
  """Logical names of the cache's per-slot arrays [B, S] (positions, valid): its rows and slots."""
  rows, _, slots, _ = cache_axes()
  return (rows, slots)


def _write(cache: jax.Array, entries: jax.Array, index: jax.Array, layer: jax.Array | None,
           names: tuple[str, ...]) -> jax.Array:
  """cache [B, K, S, H] (or [L, B, K, S, H] with `layer`) with entries [B, T, K, H] at slots
  [index, index + T) (of that layer), constrained to the cache's logical `names`."""
  entries = jnp.swapaxes(entries, 1, 2).astype(cache.dtype)  # [B, K, T, H]
  if layer is None:
    return sharding.constrain(jax.lax.dynamic_update_slice(cache, entries, (0, 0, index, 0)), names)
  updated = jax.lax.dynamic_update_slice(cache, entries[None], (layer, 0, 0, index, 0))
  return sharding.constrain(updated, (None, *names))


class Attention(nnx.Module):
  """Multi-head attention with K <= N key/value heads, RoPE, optional qkv bias, q/k RMSNorm and logit soft-cap."""

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
    self.softcap, self.impl, self.scale = cfg.attn_logit_softcap, cfg.attention_impl, cfg.attention_scale

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: MaskInfo, window=None) -> jax.Array:
    """x [B, T, D], rotary tables [B, T, H], mask over T keys, window (int, traced int or None) -> [B, T, D]."""
    return self._attend(*self._qkv(x, cos, sin), mask, window)

  def shared_prefix(self, x: tuple, cos: tuple, sin: tuple, mask: tuple, window=None) -> tuple:
    """Prefixes and the suffixes that continue them, each prefix computed once (`Decoder.shared_prefix`).

    x: (prefixes [G, P, D], suffixes [G*n, S, D]: rows g*n .. g*n+n-1 continue prefix g); cos, sin, mask:
    the same pairs (the prefixes' self-attention mask, the suffixes' over their prefix's P keys and their own
    S). -> (out [G, P, D], out [G*n, S, D]).
    """
    (qp, kp, vp), (qs, ks, vs) = self._qkv(x[0], cos[0], sin[0]), self._qkv(x[1], cos[1], sin[1])
    group = x[1].shape[0] // x[0].shape[0]

    def with_prefix(prefix, own):  # [G*n, P + S, K, H]: each suffix row's prefix keys / values, then its own
      keys = jnp.concatenate([jnp.repeat(prefix, group, axis=0), own], axis=1)
      return sharding.constrain(keys, ("batch", "seq", "kv_heads", "head_dim"))

    return (self._attend(qp, kp, vp, mask[0], window),
            self._attend(qs, with_prefix(kp, ks), with_prefix(vp, vs), mask[1], window))

  def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: MaskInfo, cache: LayerCache,
             index: jax.Array, window=None, layer: jax.Array | None = None) -> tuple[LayerCache, jax.Array]:
    """Cached attention: write this call's keys/values at cache slots [index, index + T), then attend.

    x [B, T, D], rotary tables [B, T, H], mask over the S cache slots (`cache_mask_info`),
    cache {"k", "v"} [B, K, S, H], index [] int32. Returns (new_cache, out [B, T, D]).
    layer: with every layer's cache stacked {"k", "v"} [L, B, K, S, H] (scan_layers), this layer's
    index: only the new entries are written into the stack (in place) and the layer's slice is read.
    """
    names = cache_axes()
    # In a decode layout (rows of the cache named apart) attention runs in the cache's layout: the
    # queries and the output [B, T, N, H] move between it and the heads' layout, never the cache.
    layout = names if names[0] != "batch" else None
    q, key, value = self._qkv(x, cos, sin, pin_projections=layout is not None)
    new_cache = {name: _write(cache[name], entries, index, layer, names)
                 for name, entries in (("k", key), ("v", value))}
    if layer is not None:
      key, value = (jax.lax.dynamic_index_in_dim(new_cache[name], layer, 0, keepdims=False) for name in "kv")
    else:
      key, value = new_cache["k"], new_cache["v"]
    key, value = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)  # [B, S, K, H] views for the attention op
    if layout is not None:
      layout = (layout[0], layout[2], layout[1], layout[3])  # [B, T, N, H] like the keys
      q = sharding.constrain(q, layout)
    return new_cache, self._attend(q, key, value, mask, window, layout)

  def _qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
           pin_projections: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rotated queries [B, T, N, H], rotated keys [B, T, K, H] and values [B, T, K, H].

    pin_projections (the decode layout): constrain the projections [B, T, N*H], [B, T, K*H] to their
    weights' output layout, so each comes from the local weight shard, then keys and values to whole
    heads [B, T, K, H]: a K that the devices do not divide is then gathered (a few KB), where XLA would
    otherwise gather the weight, or split the cache on the head dim and gather it every step.
    """
    b, t, _ = x.shape
    n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
    q, key, value = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, N*H], [B, T, K*H] x 2
    if pin_projections:
      q = sharding.constrain(q, ("batch", "seq", "q_heads"))
      key, value = (sharding.constrain(y, ("batch", "seq", "kv_heads")) for y in (key, value))
    q, key, value = q.reshape(b, t, n, h), key.reshape(b, t, k, h), value.reshape(b, t, k, h)
    if pin_projections:
      key, value = (sharding.constrain(y, ("batch", "seq", "kv_heads", "head_dim")) for y in (key, value))
    if self.q_norm is not None:
      q, key = self.q_norm(q), self.k_norm(key)
    q, key = apply_rotary(q, cos, sin), apply_rotary(key, cos, sin)
    return sharding.constrain(q, ("batch", "seq", "q_heads", "head_dim")), key, value

  def _attend(self, q: jax.Array, key: jax.Array, value: jax.Array, mask: MaskInfo, window,
              layout: tuple[str, ...] | None = None) -> jax.Array:
    """q [B, T, N, H], key/value [B, S, K, H] -> [B, T, D]. layout: logical names the attention output
    [B, T, N, H] is pinned to before it moves to the heads' layout of o_proj (a decode layout's cache names)."""
    b, t, n, h = q.shape
    self_attention = mask.k_positions is None  # the same arrays for q and k: the kernels can take it
    # A kernel asked for by name serves the training-shaped calls it supports; cached decoding and a
    # scan's traced per-layer windows take the blockwise path ("auto") instead of failing.
    kernel_fits = self_attention and not isinstance(window, jax.Array)
    out = attention(q, key.astype(q.dtype), value.astype(q.dtype), q_positions=mask.q_positions,
                    k_positions=mask.q_positions if self_attention else mask.k_positions,
                    q_segment_ids=mask.q_segment_ids,
                    k_segment_ids=mask.q_segment_ids if self_attention else mask.k_segment_ids,
                    window=window, softcap=self.softcap, scale=self.scale,
                    impl=self.impl if kernel_fits or self.impl in ("naive", "xla") else "auto")
    if layout is not None:
      out = sharding.constrain(out, layout)
    out = sharding.constrain(out, ("batch", "seq", "q_heads", "head_dim"))  # [B, T, N, H]
    return self.o_proj(out.reshape(b, t, n * h))  # [B, T, D]
