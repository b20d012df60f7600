"""The causal decoder (backbone), the language model head, and the scalar (reward / value) head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign import losses, sharding
from jaxalign.models import layer_stack
from jaxalign.models.attention import (Attention, LayerCache, MaskInfo, cache_axes, cache_mask_info, cache_slot_axes,
                                      sequence_mask_info)
from jaxalign.models.config import ModelConfig
from jaxalign.models.families import FAMILIES
from jaxalign.models.layers import ACTIVATIONS, MLP, Dense, Embed, RMSNorm
from jaxalign.models.moe import MoE
from jaxalign.ops.xla_chunked import soft_cap
from jaxalign.models.rope import model_rotary_tables

class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x)). With `sandwich_norms` (Gemma 2 / 3)
  each branch's output is normed too: x + norm(attn(norm(x))), then + norm(mlp(norm(x))). Norm names are HF's:
  `post_attention_layernorm` is the MLP's input norm in the plain block, the attention's output norm in the
  sandwich one (whose MLP norms are `pre_feedforward_layernorm` / `post_feedforward_layernorm`)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    norm_kw = dict(eps=cfg.rms_norm_eps, offset=cfg.norm_offset, param_dtype=cfg.weight_dtype, rngs=rngs)
    self.input_layernorm = RMSNorm(cfg.hidden_size, **norm_kw)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm_kw)
    if cfg.sandwich_norms:
      self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, **norm_kw)
      self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, **norm_kw)
    # The MLP under HF's name: `mlp`, or a mixture of experts under the family's (Mixtral: block_sparse_moe).
    self.mlp_name, expert_names = FAMILIES[cfg.family].moe_names if cfg.num_experts else ("mlp", None)
    mlp = MoE(cfg, expert_names, ACTIVATIONS[cfg.activation], rngs=rngs) if cfg.num_experts else MLP(cfg, rngs=rngs)
    setattr(self, self.mlp_name, mlp)
    self.sandwich = cfg.sandwich_norms

  def __call__(self, x, cos, sin, mask: MaskInfo, window=None):
    return self._mlp(self._residual(x, self.self_attn(self.input_layernorm(x), cos, sin, mask, window)))

  def decode(self, x, cos, sin, mask: MaskInfo, cache: LayerCache, index, window=None,
             layer=None) -> tuple[LayerCache, jax.Array]:
    """The block with a KV cache (see `Attention.decode`, also for `layer`). Returns (new_cache, x [B, T, D])."""
    cache, attn = self.self_attn.decode(self.input_layernorm(x), cos, sin, mask, cache, index, window, layer)
    return cache, self._mlp(self._residual(x, attn))

  def shared_prefix(self, x: tuple, cos: tuple, sin: tuple, mask: tuple, window=None) -> tuple:
    """The block on (prefixes, suffixes) pairs (see `Attention.shared_prefix`)."""
    attn = self.self_attn.shared_prefix(tuple(self.input_layernorm(part) for part in x), cos, sin, mask, window)
    return tuple(self._mlp(self._residual(part, a)) for part, a in zip(x, attn))

  def _residual(self, x, attn):
    """x plus the attention branch (normed first with sandwich norms)."""
    return x + (self.post_attention_layernorm(attn) if self.sandwich else attn)

  def _mlp(self, x):
    mlp = getattr(self, self.mlp_name)
    if self.sandwich:
      x = x + self.post_feedforward_layernorm(mlp(self.pre_feedforward_layernorm(x)))
    else:
      x = x + mlp(self.post_attention_layernorm(x))
    return sharding.constrain(x, ("batch", "seq", "act_embed"))


def default_positions(segment_ids: jax.Array) -> jax.Array:
  """Position ids [B, T] that count from 0 at each segment's first token (padding gets 0).

  For a left- or right-padded batch (segment ids = attention mask) this is `cumsum(mask) - 1`;
  for a packed row positions restart in every document.
  """
  t = jnp.arange(segment_ids.shape[1])
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  start_index = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
  return jnp.where(segment_ids != 0, t - start_index, 0)


# The decoder's KV cache, a pytree passed in and returned by `decode` (never module state):
#   "index":     [] int32, the next cache slot to write (all rows write the same slots);
#   "positions": [B, S] int32, the position id of the token in each slot;
#   "valid":     [B, S] bool, whether the slot holds a real token (False: empty or padding);
#   "layers":    tuple of one `LayerCache` ({"k", "v"}: [B, K, S, H]) per layer, or with scan_layers
#                one {"k", "v"} [L, B, K, S, H] (see `layer_stack.init_layer_caches`).
Cache = dict


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> Cache:
  """An empty cache for `batch` rows of up to `max_len` (S) tokens; dtype defaults to cfg.dtype."""
  dtype = cfg.compute_dtype if dtype is None else dtype
  kv = jnp.zeros((batch, cfg.num_kv_heads, max_len, cfg.head_size), dtype)  # [B, K, S, H]
  kv = sharding.constrain(kv, cache_axes())
  return {
    "index": jnp.zeros((), jnp.int32),
    "positions": jnp.zeros((batch, max_len), jnp.int32),
    "valid": jnp.zeros((batch, max_len), bool),
    "layers": layer_stack.init_layer_caches(cfg, kv),
  }


class Decoder(nnx.Module):
  """Embedding, N blocks, final norm. Returns the final hidden states [B, T, D]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
                              param_dtype=cfg.weight_dtype, rngs=rngs)
    blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
    self.layers = layer_stack.stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, offset=cfg.norm_offset,
                        param_dtype=cfg.weight_dtype, rngs=rngs)
    self.config = cfg

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
    """input_ids [B, T]; attention_mask [B, T] (1 = token, 0 = padding) or segment_ids [B, T] for
    packed rows (0 = padding, 1, 2, ... = documents). positions default to per-segment counts."""
    cfg = self.config
    if segment_ids is None:
      segment_ids = jnp.ones_like(input_ids) if attention_mask is None else attention_mask.astype(jnp.int32)
    if positions is None:
      positions = default_positions(segment_ids)
    cos, sin = model_rotary_tables(cfg, positions)
    x = layer_stack.forward(self.layers, cfg, self._embed(input_ids), cos, sin, sequence_mask_info(segment_ids))
    return self.norm(x)

  def shared_prefix(self, prefix_ids: jax.Array, prefix_segment_ids: jax.Array, suffix_ids: jax.Array,
                    suffix_segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows that share a prefix, with each prefix computed once: row r is prefix r // n followed by suffix r.

    prefix_ids, prefix_segment_ids [G, P]: left-padded (0 = padding); suffix_ids, suffix_segment_ids [G*n, S]:
    right-padded, rows g*n .. g*n+n-1 continue prefix g. Each suffix token sees its prefix's tokens and the
    tokens of its own suffix up to itself, at positions continuing the prefix's: the hidden states equal those
    of the [G*n, P+S] rows (prefix repeated) at n-fold less prefix compute.
    Returns the final-norm hidden states (prefixes [G, P, D], suffixes [G*n, S, D]).
    """
    cfg = self.config
    group = suffix_ids.shape[0] // prefix_ids.shape[0]
    prefix_seg = (prefix_segment_ids != 0).astype(jnp.int32)
    suffix_seg = (suffix_segment_ids != 0).astype(jnp.int32)
    prefix_pos = default_positions(prefix_seg)
    start = jnp.repeat(jnp.sum(prefix_seg, axis=1, dtype=jnp.int32), group)  # [G*n] each suffix's first position
    suffix_pos = start[:, None] + jnp.arange(suffix_ids.shape[1], dtype=jnp.int32)  # [G*n, S]
    (cos_p, sin_p), (cos_s, sin_s) = model_rotary_tables(cfg, prefix_pos), model_rotary_tables(cfg, suffix_pos)
    repeat = lambda x: jnp.repeat(x, group, axis=0)
    # Keys of a suffix row: its prefix's P tokens, then its own S; the causal rule runs on positions, which
    # grow from the prefix into the suffix.
    suffix_mask = MaskInfo(suffix_pos, suffix_seg, jnp.concatenate([repeat(prefix_pos), suffix_pos], axis=1),
                           jnp.concatenate([repeat(prefix_seg), suffix_seg], axis=1))
    x = layer_stack.forward(self.layers, cfg, (self._embed(prefix_ids), self._embed(suffix_ids)),
                            (cos_p, cos_s), (sin_p, sin_s), (sequence_mask_info(prefix_seg), suffix_mask),
                            method="shared_prefix")
    return self.norm(x[0]), self.norm(x[1])

  def decode(self, input_ids: jax.Array, positions: jax.Array, cache: Cache,
             segment_ids: jax.Array | None = None) -> tuple[Cache, jax.Array]:
    """Run T new tokens against the cache and append them at slots [index, index + T).

    input_ids, positions [B, T]; segment_ids [B, T] (0 = padding, not attended to later; default all
    real). A prefill passes the whole left-padded prompt; each decode step passes T = 1.
    Returns (new_cache, final-norm hidden states [B, T, D]).
    """
    cfg = self.config
    index = cache["index"]
    valid = jnp.ones_like(input_ids, bool) if segment_ids is None else segment_ids != 0
    k_positions = jax.lax.dynamic_update_slice(cache["positions"], positions.astype(jnp.int32), (0, index))
    k_valid = jax.lax.dynamic_update_slice(cache["valid"], valid, (0, index))
    cos, sin = model_rotary_tables(cfg, positions)
    mask = cache_mask_info(positions, k_positions, k_valid)
    layer_caches, x = layer_stack.decode(self.layers, cfg, self._embed(input_ids), cos, sin, mask,
                                         cache["layers"], index)
    new_cache = {
      "index": index + input_ids.shape[1],
      "positions": sharding.constrain(k_positions, cache_slot_axes()),
      "valid": sharding.constrain(k_valid, cache_slot_axes()),
      "layers": layer_caches,
    }
    return new_cache, self.norm(x)

  def _embed(self, input_ids: jax.Array) -> jax.Array:
    """Token embeddings [B, T, D] (scaled by sqrt(D) for Gemma)."""
    x = self.embed_tokens(input_ids)  # [B, T, D]
    if self.config.scale_embeddings:
      x = x * jnp.asarray(self.config.hidden_size**0.5, x.dtype)
    return sharding.constrain(x, ("batch", "seq", "act_embed"))


class CausalLM(nnx.Module):
  """Decoder + LM head. `hidden_states` feeds training (log-probs via ops); `__call__` gives logits."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.model = Decoder(cfg, rngs=rngs)
    self.lm_head = None if cfg.tie_embeddings else Dense(
      cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), dtype=cfg.compute_dtype,
      param_dtype=cfg.weight_dtype, rngs=rngs)
    self.config = cfg

  def hidden_states(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None) -> jax.Array:
    """Final-norm hidden states [B, T, D]."""
    return self.model(input_ids, attention_mask, positions=positions, segment_ids=segment_ids)

  def shared_prefix_hidden_states(self, prefix_ids, prefix_segment_ids, suffix_ids, suffix_segment_ids):
    """Final-norm hidden states of prefixes [G, P, D] and of the suffixes continuing them [G*n, S, D]
    (see `Decoder.shared_prefix`)."""
    return self.model.shared_prefix(prefix_ids, prefix_segment_ids, suffix_ids, suffix_segment_ids)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
    """An empty KV cache for `decode` (see `Cache`): `batch` rows, `max_len` slots."""
    return init_cache(self.config, batch, max_len, dtype)

  def decode(self, input_ids, positions, cache: Cache, *, segment_ids=None) -> tuple[Cache, jax.Array]:
    """Cached forward (prefill or one decode step): (new_cache, final-norm hidden [B, T, D]).

    Logits for sampling are `self.logits(hidden)`; see `Decoder.decode` for the arguments.
    """
    return self.model.decode(input_ids, positions, cache, segment_ids)

  def head_weight(self) -> jax.Array:
    """The LM head as a [D, V] matrix (the transposed embedding when tied)."""
    if self.lm_head is None:
      return self.model.embed_tokens.embedding[...].T
    return self.lm_head.kernel[...]

  def logits(self, hidden: jax.Array) -> jax.Array:
    """float32 logits [..., V] from hidden states [..., D] (soft-capped for Gemma 2). Only for eval and
    sampling: training reads log-probs through `ops.token_logprobs`, which applies the same cap."""
    weight = self.head_weight().astype(self.config.compute_dtype)
    logits = jnp.einsum("...d,dv->...v", hidden, weight, preferred_element_type=jnp.float32)
    return soft_cap(logits, self.config.final_logit_softcap)

  def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None) -> jax.Array:
    """Logits [B, T, V] (float32)."""
    return self.logits(self.hidden_states(input_ids, attention_mask, positions=positions, segment_ids=segment_ids))


class ScalarModel(nnx.Module):
  """Decoder + a scalar head (`score`, [D, 1]): reward models and PPO critics.

  The HF counterpart is `*ForSequenceClassification` with one label, read at the last real token.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.model = Decoder(cfg, rngs=rngs)
    self.score = Dense(cfg.hidden_size, 1, ("embed", "scalar"), dtype=cfg.compute_dtype,
                       param_dtype=cfg.weight_dtype, rngs=rngs)
    self.config = cfg

  def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None) -> jax.Array:
    """Per-token scalars [B, T] (float32): values for a critic; read the last token for a reward."""
    hidden = self.model(input_ids, attention_mask, positions=positions, segment_ids=segment_ids)
    return self.score(hidden)[..., 0].astype(jnp.float32)


def last_token_values(values: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """values [B, T] read at each row's last real token (works for left and right padding). -> [B]."""
  return jnp.sum(values * losses.last_token_onehot(attention_mask), axis=1)
