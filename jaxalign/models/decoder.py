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
from jaxalign.models.routing import NOT_RECORDED, recorded_dtype, report
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

  def __call__(self, x, cos, sin, mask: MaskInfo, window=None, replay=None):
    """-> (x [B, T, D], this block's routing: None, or for a mixture of experts (the chosen experts [B, T, k],
    `RouterStats`)). replay [B, T, k]: the experts to route to where recorded (`routing.route`)."""
    x = self._residual(x, self.self_attn(self.input_layernorm(x), cos, sin, mask, window))
    return self._mlp(x, mask.q_segment_ids, replay)

  def decode(self, x, cos, sin, mask: MaskInfo, cache: LayerCache, index, window=None,
             layer=None) -> tuple[LayerCache, jax.Array, tuple | None]:
    """The block with a KV cache (see `Attention.decode`, also for `layer`). Returns (new_cache, x [B, T, D],
    routing as `__call__`'s)."""
    cache, attn = self.self_attn.decode(self.input_layernorm(x), cos, sin, mask, cache, index, window, layer)
    return (cache, *self._mlp(self._residual(x, attn), mask.q_segment_ids))

  def shared_prefix(self, x: tuple, cos: tuple, sin: tuple, mask: tuple, window=None, replay=None) -> tuple:
    """The block on (prefixes, suffixes) pairs (see `Attention.shared_prefix`): (x pair, routing pair); replay:
    None or a pair."""
    attn = self.self_attn.shared_prefix(tuple(self.input_layernorm(part) for part in x), cos, sin, mask, window)
    replay = (None,) * len(x) if replay is None else replay
    out = [self._mlp(self._residual(part, a), m.q_segment_ids, r) for part, a, m, r in zip(x, attn, mask, replay)]
    return tuple(o[0] for o in out), tuple(o[1] for o in out)

  def _residual(self, x, attn):
    """x plus the attention branch (normed first with sandwich norms)."""
    return x + (self.post_attention_layernorm(attn) if self.sandwich else attn)

  def _mlp(self, x, segment_ids, replay=None):
    """x plus the MLP branch, and the routing of a mixture of experts (None for a dense MLP)."""
    mlp = getattr(self, self.mlp_name)
    h = (self.pre_feedforward_layernorm if self.sandwich else self.post_attention_layernorm)(x)
    h, *routing = mlp(h, segment_ids != 0, replay) if isinstance(mlp, MoE) else (mlp(h),)
    x = x + (self.post_feedforward_layernorm(h) if self.sandwich else h)
    return sharding.constrain(x, ("batch", "seq", "act_embed")), tuple(routing) if routing else None


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
#                one {"k", "v"} [L, B, K, S, H] (see `layer_stack.init_layer_caches`);
#   "routing":   mixture-of-experts models only: [B, S, L, k] the experts each slot's token was routed to in each
#                layer (`routing.NOT_RECORDED` in empty slots), what routing replay hands the training passes.
Cache = dict


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> Cache:
  """An empty cache for `batch` rows of up to `max_len` (S) tokens; dtype defaults to cfg.dtype."""
  dtype = cfg.compute_dtype if dtype is None else dtype
  kv = jnp.zeros((batch, cfg.num_kv_heads, max_len, cfg.head_size), dtype)  # [B, K, S, H]
  kv = sharding.constrain(kv, cache_axes())
  cache = {
    "index": jnp.zeros((), jnp.int32),
    "positions": jnp.zeros((batch, max_len), jnp.int32),
    "valid": jnp.zeros((batch, max_len), bool),
    "layers": layer_stack.init_layer_caches(cfg, kv),
  }
  if cfg.num_experts:
    shape = (batch, max_len, cfg.num_layers, cfg.num_experts_per_tok)
    cache["routing"] = sharding.constrain(jnp.full(shape, NOT_RECORDED, recorded_dtype(cfg.num_experts)),
                                          cache_routing_axes())
  return cache


def cache_routing_axes() -> tuple:
  """Logical names of the cache's recorded routing [B, S, L, k]."""
  return (*cache_slot_axes(), None, None)


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
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
               routing: jax.Array | None = None) -> jax.Array:
    """input_ids [B, T]; attention_mask [B, T] (1 = token, 0 = padding) or segment_ids [B, T] for
    packed rows (0 = padding, 1, 2, ... = documents). positions default to per-segment counts. routing
    [B, T, L, k]: a mixture of experts routes each token to these experts where recorded (routing replay).
    A mixture of experts reports its `RouterStats` to `routing.collecting`."""
    cfg = self.config
    if segment_ids is None:
      segment_ids = jnp.ones_like(input_ids) if attention_mask is None else attention_mask.astype(jnp.int32)
    if positions is None:
      positions = default_positions(segment_ids)
    cos, sin = model_rotary_tables(cfg, positions)
    x, layers_routing = layer_stack.forward(self.layers, cfg, self._embed(input_ids), cos, sin,
                                            sequence_mask_info(segment_ids), replay=_layers_first(routing))
    _report(layers_routing)
    return self.norm(x)

  def shared_prefix(self, prefix_ids: jax.Array, prefix_segment_ids: jax.Array, suffix_ids: jax.Array,
                    suffix_segment_ids: jax.Array, prefix_routing: jax.Array | None = None,
                    suffix_routing: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Rows that share a prefix, with each prefix computed once: row r is prefix r // n followed by suffix r.

    prefix_ids, prefix_segment_ids [G, P]: left-padded (0 = padding); suffix_ids, suffix_segment_ids [G*n, S]:
    right-padded, rows g*n .. g*n+n-1 continue prefix g. Each suffix token sees its prefix's tokens and the
    tokens of its own suffix up to itself, at positions continuing the prefix's: the hidden states equal those
    of the [G*n, P+S] rows (prefix repeated) at n-fold less prefix compute.
    prefix_routing [G, P, L, k], suffix_routing [G*n, S, L, k]: routing replay, as in `__call__` (both or none).
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
    replay = None if prefix_routing is None else (_layers_first(prefix_routing), _layers_first(suffix_routing))
    x, layers_routing = layer_stack.forward(self.layers, cfg, (self._embed(prefix_ids), self._embed(suffix_ids)),
                                            (cos_p, cos_s), (sin_p, sin_s),
                                            (sequence_mask_info(prefix_seg), suffix_mask), method="shared_prefix",
                                            replay=replay)
    for part in layers_routing:
      _report(part)
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
    layer_caches, x, layers_routing = layer_stack.decode(self.layers, cfg, self._embed(input_ids), cos, sin, mask,
                                                         cache["layers"], index)
    new_cache = {
      "index": index + input_ids.shape[1],
      "positions": sharding.constrain(k_positions, cache_slot_axes()),
      "valid": sharding.constrain(k_valid, cache_slot_axes()),
      "layers": layer_caches,
    }
    if layers_routing is not None:  # [L, B, T, k] -> the cache's [B, S, L, k] at slots [index, index + T)
      experts = jnp.moveaxis(layers_routing[0], 0, 2).astype(cache["routing"].dtype)
      new_cache["routing"] = sharding.constrain(
        jax.lax.dynamic_update_slice(cache["routing"], experts, (0, index, 0, 0)), cache_routing_axes())
    return new_cache, self.norm(x)

  def _embed(self, input_ids: jax.Array) -> jax.Array:
    """Token embeddings [B, T, D] (scaled by sqrt(D) for Gemma)."""
    x = self.embed_tokens(input_ids)  # [B, T, D]
    if self.config.scale_embeddings:
      x = x * jnp.asarray(self.config.hidden_size**0.5, x.dtype)
    return sharding.constrain(x, ("batch", "seq", "act_embed"))


def _layers_first(routing: jax.Array | None) -> jax.Array | None:
  """Recorded routing [B, T, L, k] -> [L, B, T, k] (per layer, as the blocks take it)."""
  return None if routing is None else jnp.moveaxis(routing, 2, 0)


def _report(layers_routing) -> None:
  """Hands a forward pass's router statistics [L, ...] (if it has experts) to `routing.collecting`."""
  if layers_routing is not None:
    report(layers_routing[1])


class CausalLM(nnx.Module):
  """Decoder + LM head. `hidden_states` feeds training (log-probs via ops); `__call__` gives logits."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.model = Decoder(cfg, rngs=rngs)
    self.lm_head = None if cfg.tie_embeddings else Dense(
      cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), dtype=cfg.compute_dtype,
      param_dtype=cfg.weight_dtype, rngs=rngs)
    self.config = cfg

  def hidden_states(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None,
                    routing=None) -> jax.Array:
    """Final-norm hidden states [B, T, D] (routing: replay, see `Decoder.__call__`)."""
    return self.model(input_ids, attention_mask, positions=positions, segment_ids=segment_ids, routing=routing)

  def shared_prefix_hidden_states(self, prefix_ids, prefix_segment_ids, suffix_ids, suffix_segment_ids,
                                  prefix_routing=None, suffix_routing=None):
    """Final-norm hidden states of prefixes [G, P, D] and of the suffixes continuing them [G*n, S, D]
    (see `Decoder.shared_prefix`)."""
    return self.model.shared_prefix(prefix_ids, prefix_segment_ids, suffix_ids, suffix_segment_ids,
                                    prefix_routing, suffix_routing)

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
