"""The decoder's blocks run as one unit: a Python loop over `nnx.List` blocks, or one `lax.scan` over
blocks whose parameters are stacked on a leading `layers` axis (compile time independent of depth), each
block rematerialised in the backward pass by the policy `ModelConfig.remat` names.

Both layouts hold the same parameters under the same names (`model/layers/...`); the scanned one has
one leading axis more (HF I/O and LoRA read it per layer). Shape letters: L layers, B batch, T
queries, S keys / cache slots, K kv heads, H head dim, D width.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models.attention import MaskInfo
from jaxalign.models.config import ModelConfig

log = logging.getLogger(__name__)

# A traced window larger than any sequence: "no sliding window" for a layer inside a scan.
NO_WINDOW = 2**30


def _offload_supported() -> bool:
  return any(m.kind == "pinned_host" for m in jax.devices()[0].addressable_memories())


def remat_policy(name: str):
  """The jax.checkpoint policy of `ModelConfig.remat`, or None for no rematerialisation."""
  policies = jax.checkpoint_policies
  if name == "none":
    return None
  if name == "offload":
    if _offload_supported():
      return policies.offload_dot_with_no_batch_dims(offload_src="device", offload_dst="pinned_host")
    log.warning("remat=offload: %s has no pinned host memory; keeping only block inputs (remat=full)",
                jax.devices()[0].platform)
    name = "full"
  return {"full": policies.nothing_saveable, "save_dots": policies.dots_with_no_batch_dims_saveable}[name]


def stack_blocks(blocks: list[nnx.Module]) -> nnx.Module:
  """One block whose every parameter is the layers' parameters stacked [L, ...] (logical axis `layers`)."""
  graphdef, _ = nnx.split(blocks[0])

  def stack(*variables):
    axes = variables[0].get_metadata().get("logical_axes") or (None,) * variables[0][...].ndim
    return variables[0].replace(jnp.stack([v[...] for v in variables]), logical_axes=("layers", *axes))

  states = [nnx.state(block) for block in blocks]
  return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _windows(cfg: ModelConfig):
  """A static window shared by every layer, or the per-layer windows [L] as data (NO_WINDOW = none)."""
  windows = [cfg.layer_window(i) for i in range(cfg.num_layers)]
  if len(set(windows)) == 1:
    return windows[0], None
  return None, jnp.asarray([NO_WINDOW if w is None else w for w in windows], jnp.int32)


def _ropes(cfg: ModelConfig):
  """Which RoPE table each layer takes (`ModelConfig.layer_rope`): a static index shared by every layer, or
  the per-layer indices [L] as data."""
  ropes = [cfg.layer_rope(i) for i in range(cfg.num_layers)]
  if len(set(ropes)) == 1:
    return ropes[0], None
  return None, jnp.asarray(ropes, jnp.int32)


def _table(tables, index):
  """The rotary tables [B, T, H] of RoPE `index` (static or traced) from [R, B, T, H] ones (or pairs of them)."""
  return jax.tree.map(lambda t: t[index], tables)


def _per_layer(cfg: ModelConfig):
  """(static window, static rope, xs): what every layer of a scan shares, and the per-layer data it does not
  ({"window": [L], "rope": [L]}, only the keys that vary)."""
  static_window, windows = _windows(cfg)
  static_rope, ropes = _ropes(cfg)
  xs = {k: v for k, v in (("window", windows), ("rope", ropes)) if v is not None}
  return static_window, static_rope, xs


def _block_fn(graphdef, policy, in_scan: bool = False, method: str = "__call__"):
  """apply(params, x, cos, sin, mask, window, replay) -> (x, routing) for one block's `method`, rematerialised by
  `policy`. The window is a static int or None.

  Outside a scan XLA would merge the recomputation with the original forward (CSE) and keep the
  activations after all, so the recomputation is fenced off there (`prevent_cse`); a scan body needs no fence.
  """

  def apply(params, x, cos, sin, mask, window, replay):
    return getattr(nnx.merge(graphdef, params), method)(x, cos, sin, mask, window, replay)

  if policy is None:
    return apply
  return jax.checkpoint(apply, policy=policy, prevent_cse=not in_scan, static_argnums=(5,))


def forward(layers, cfg: ModelConfig, x, cos, sin, mask, method: str = "__call__", replay=None):
  """x [B, T, D] through every block (loop or scan) -> (x, the blocks' routing stacked [L, ...]: None for dense
  blocks, else (experts [L, B, T, k], `RouterStats` [L, ...])). `layers`: nnx.List of blocks, or one stacked
  block. cos, sin: the model's rotary tables [R, B, T, H] (`rope.model_rotary_tables`); each layer takes its own.
  replay: None, or the experts to route each layer's tokens to [L, B, T, k] (`routing.route`). method: the
  blocks' method; "shared_prefix" takes (prefixes, suffixes) pairs of x, cos, sin, mask and replay, and returns
  pairs."""
  policy = remat_policy(cfg.remat)
  if not cfg.scan_layers:
    routing = []
    for i, block in enumerate(layers):
      graphdef, params = nnx.split(block)
      r = cfg.layer_rope(i)
      x, layer_routing = _block_fn(graphdef, policy, method=method)(
        params, x, _table(cos, r), _table(sin, r), mask, cfg.layer_window(i), _table(replay, i))
      routing.append(layer_routing)
    return x, jax.tree.map(lambda *layers: jnp.stack(layers), *routing)
  graphdef, params = nnx.split(layers)
  static_window, static_rope, xs = _per_layer(cfg)
  apply = _block_fn(graphdef, policy, in_scan=True, method=method)
  windows, xs = _window_choices(cfg, xs)

  def body(x, layer):
    params_i, data, replay_i = layer
    r = data.get("rope", static_rope)
    args = (params_i, x, _table(cos, r), _table(sin, r), mask)
    if "window" not in data:
      return apply(*args, static_window, replay_i)
    # Each layer's window as a static int for the attention kernels (splash, Triton take no traced window):
    # one branch per distinct window, the layer's chosen by its index.
    return jax.lax.switch(data["window"], [functools.partial(_with_window, apply, w, replay_i) for w in windows],
                          *args)

  return jax.lax.scan(body, x, (params, xs, replay))


def _with_window(apply, window, replay, *args):
  return apply(*args, window, replay)


def _window_choices(cfg: ModelConfig, xs: dict):
  """(the distinct sliding windows of the layers (None: global), xs with each layer's window replaced by its index
  in them) when the windows vary, else ((), xs)."""
  if "window" not in xs:
    return (), xs
  windows = [cfg.layer_window(i) for i in range(cfg.num_layers)]
  choices = tuple(dict.fromkeys(windows))
  return choices, {**xs, "window": jnp.asarray([choices.index(w) for w in windows], jnp.int32)}


def init_layer_caches(cfg: ModelConfig, kv: jax.Array):
  """Per-layer caches: a tuple of {"k", "v"} [B, K, S, H] (loop), or one {"k", "v"} [L, B, K, S, H] (scan)."""
  if cfg.scan_layers:
    stacked = jnp.broadcast_to(kv, (cfg.num_layers, *kv.shape))
    return {"k": stacked, "v": stacked}
  return tuple({"k": kv, "v": kv} for _ in range(cfg.num_layers))


def decode(layers, cfg: ModelConfig, x: jax.Array, cos, sin, mask: MaskInfo, caches, index: jax.Array):
  """Cached decoding through every block: (new per-layer caches, x [B, T, D], routing as `forward`'s). See
  `Block.decode`."""
  if not cfg.scan_layers:
    new_caches, routing = [], []
    for i, block in enumerate(layers):
      r = cfg.layer_rope(i)
      cache, x, layer_routing = block.decode(x, cos[r], sin[r], mask, caches[i], index, cfg.layer_window(i))
      new_caches.append(cache)
      routing.append(layer_routing)
    return tuple(new_caches), x, jax.tree.map(lambda *layers: jnp.stack(layers), *routing)
  graphdef, params = nnx.split(layers)
  static_window, static_rope, xs = _per_layer(cfg)

  def body(carry, layer):
    x, caches = carry  # {"k", "v"} [L, B, K, S, H]
    i, params_i, data = layer
    block = nnx.merge(graphdef, params_i)
    r = data.get("rope", static_rope)
    # Layer i writes only its new entries into the stack and reads its own slice: slicing the layer's
    # [B, K, S, H] out and writing all of it back made XLA copy the whole stacked cache every step.
    caches, x, routing = block.decode(x, cos[r], sin[r], mask, caches, index, data.get("window", static_window),
                                      layer=i)
    return (x, caches), routing

  (x, caches), routing = jax.lax.scan(body, (x, caches), (jnp.arange(cfg.num_layers), params, xs))
  return caches, x, routing
