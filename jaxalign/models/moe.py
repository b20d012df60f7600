"""Mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): top-k routing and dropless grouped matmuls.

Shape letters: N tokens (B*T flattened), D width, E experts, k experts per token, F an expert's MLP width.

The router scores each token over E experts (float32 softmax of `gate(x)`), keeps the k best (optionally
renormalised to sum to 1: Mixtral always, Qwen's `norm_topk_prob`), and each token's output is the weighted sum
of its k experts' gated MLPs. Dispatch is dropless: the N*k (token, expert) assignments are sorted by expert
and every expert's rows run as one group of `jax.lax.ragged_dot` (a grouped matmul over [E, ...] stacked
weights), so no token is dropped and no capacity padding is computed. Expert weights carry the logical axis
"experts" (`sharding.DEFAULT_RULES`), and HF stores them per expert (`models.hf`).

On a mesh the dispatch runs per batch shard (`jax.shard_map`): each device sorts and multiplies only its own
tokens' assignments against the layer's expert weights, which enter sharded as their rules say and are gathered
inside, in the compute dtype, so their gradients leave already reduce-scattered (a global dispatch over sharded
tokens would sort and gather every token of the batch on every device; replicated weights would make the layer
scan's backward stack every layer's whole float32 expert gradient). Expert parallelism: when the rules map
"experts" to mesh axes (e.g. `("experts", "fsdp")`), each device keeps its E/n experts whole and the tokens
travel instead of the weights (`_expert_parallel`).

Routing itself (top-k, replay of a sampler's choice, the router's statistics and auxiliary losses) lives in
`models.routing`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import jax
import jax.numpy as jnp
from flax import nnx

from jax.sharding import PartitionSpec as P

from jaxalign import sharding
from jaxalign.models.config import ModelConfig
from jaxalign.models.layers import MLP, Dense, param
from jaxalign.models.routing import Routing, RouterStats, recorded_dtype, route, router_stats


class ExpertKernel(nnx.Module):
  """E stacked [in, out] kernels: `kernel` [E, in, out] (HF stores each expert's [out, in] under its index)."""

  def __init__(self, experts: int, in_features: int, out_features: int, axes: tuple[str, str], *, dtype,
               param_dtype, rngs: nnx.Rngs):
    self.kernel = param(rngs, nnx.initializers.normal(0.02), (experts, in_features, out_features), param_dtype,
                        ("experts", *axes))
    self.dtype = dtype

  def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M, in] sorted by expert, group_sizes [E] (rows of each expert, in order) -> [M, out]."""
    return grouped_matmul(x, self.kernel[...], group_sizes, self.dtype)


def grouped_matmul(x: jax.Array, kernel: jax.Array, group_sizes: jax.Array, dtype) -> jax.Array:
  """x [M, in] (rows sorted by expert) times each row's expert's kernel [E, in, out] -> [M, out] in `dtype`."""
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  if _PROJECTING.get():
    return jnp.dot(x, jnp.mean(kernel, axis=0), preferred_element_type=jnp.float32).astype(dtype)
  return jax.lax.ragged_dot(x, kernel, group_sizes, preferred_element_type=jnp.float32).astype(dtype)


_PROJECTING: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxalign_moe_projecting", default=False)


@contextlib.contextmanager
def projecting_memory():
  """Inside: every grouped matmul is one dense [M, in] x [in, out] matmul on the mean of the expert kernels
  (wrong numbers, the shapes and buffers of a grouped-matmul kernel), for the compiled memory analysis of
  `--plan` on a backend that lowers `ragged_dot` densely: XLA:CPU computes every row against every expert
  ([M, E, out] temp), where a GPU / TPU grouped-matmul kernel writes only [M, out]."""
  token = _PROJECTING.set(True)
  try:
    yield
  finally:
    _PROJECTING.reset(token)


class Experts(nnx.Module):
  """E gated MLPs down(act(gate(x)) * up(x)) as stacked kernels. `names`: the HF names of the gate, up and down
  projections (Mixtral: w1, w3, w2; Qwen: gate_proj, up_proj, down_proj)."""

  def __init__(self, cfg: ModelConfig, names: tuple[str, str, str], activation, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
    e, d, f = cfg.num_experts, cfg.hidden_size, cfg.expert_size
    self.names = names
    setattr(self, names[0], ExpertKernel(e, d, f, ("embed", "mlp"), **kw))
    setattr(self, names[1], ExpertKernel(e, d, f, ("embed", "mlp"), **kw))
    setattr(self, names[2], ExpertKernel(e, f, d, ("mlp", "embed"), **kw))
    self.activation = activation

  def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    return self.apply(self.kernels(), x, group_sizes)

  def kernels(self) -> list[jax.Array]:
    """The gate, up and down kernels [E, ...]."""
    return [getattr(self, n).kernel[...] for n in self.names]

  def apply(self, kernels, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The experts with these (gate, up, down) kernels on rows x [M, D] sorted by expert -> [M, D]."""
    dtype = getattr(self, self.names[0]).dtype
    gate, up, down = (functools.partial(grouped_matmul, kernel=k, group_sizes=group_sizes, dtype=dtype)
                      for k in kernels)
    return down(self.activation(gate(x)) * up(x))


def dispatch(x: jax.Array, routing: Routing, experts: Experts, kernels=None) -> jax.Array:
  """sum_j w_j expert_{e_j}(x) for each token of x [N, D]: the N*k assignments sorted by expert, run as one
  grouped matmul per projection, weighted and added back to their tokens. -> [N, D] in x's dtype. kernels:
  the experts' (gate, up, down) kernels to use (default: their own)."""
  kernels = experts.kernels() if kernels is None else kernels
  return _local_dispatch(x, routing, experts, kernels, 0).astype(x.dtype)


def experts_count(experts: Experts) -> int:
  return getattr(experts, experts.names[0]).kernel.shape[0]


def sharded_dispatch(x: jax.Array, routing: Routing, experts: Experts) -> jax.Array:
  """`dispatch` per batch shard under the enclosing `sharding.use_mesh` (each device its own tokens x [N, D],
  N = B*T flattened row-major from a batch-sharded [B, T, D]), or as is outside one. Tokens that the batch's mesh
  axes do not divide run replicated. The expert weights enter sharded as their rules say; each device gathers them
  whole, or, when the rule for "experts" names mesh axes, keeps its own experts (expert parallelism,
  `_expert_parallel`) and gathers only their other dims."""
  rules, mesh = sharding.active_rules(), jax.sharding.get_abstract_mesh()
  if rules is None or mesh.empty:
    return dispatch(x, routing, experts)
  tokens = sharding.logical_to_spec(("batch", None), x.shape, mesh, rules)  # P(batch axes, None) or P(None, None)
  variables = [getattr(experts, n).kernel for n in experts.names]
  # A scanned layer's kernel [E, ...] keeps its stack's names ("layers", "experts", ...): the trailing ones are its own
  specs = [sharding.logical_to_spec(v.get_metadata()["logical_axes"][-v.ndim:], v.shape, mesh, rules)
           for v in variables]
  dtype = getattr(experts, experts.names[0]).dtype
  axes = _expert_axes(rules, mesh, experts_count(experts))

  def local(x, routing, *kernels):
    if not axes:
      return dispatch(x, routing, experts, [_gathered(k.astype(dtype), spec) for k, spec in zip(kernels, specs)])
    own = [_gathered(k.astype(dtype), P(None, *spec[1:])) for k, spec in zip(kernels, specs)]  # [E/n, ...] each
    return _expert_parallel(x, routing, experts, own, axes, _mesh_axes(tokens[0]))

  return jax.shard_map(local, mesh=mesh, in_specs=(tokens, Routing(tokens, tokens), *specs),
                       out_specs=tokens, check_vma=False)(x, routing, *(v[...] for v in variables))


def _gathered(shard: jax.Array, spec: P) -> jax.Array:
  """Inside shard_map: the whole array from this device's shard laid out by `spec` (tiled all-gathers)."""
  for dim, axes in enumerate(spec):
    if axes is not None:
      shard = jax.lax.all_gather(shard, axes, axis=dim, tiled=True)
  return shard


def _mesh_axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
  """A rule's or a PartitionSpec entry's mesh axes as a tuple."""
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _expert_axes(rules: sharding.Rules, mesh, count: int) -> tuple[str, ...]:
  """The mesh axes (of more than one device) that the rule for "experts" splits E = `count` experts over, as
  `sharding.logical_to_spec` lays out an [E, ...] kernel; () when none. A ValueError when they do not divide E."""
  rule = dict(rules).get("experts")
  axes = tuple(a for a in _mesh_axes(rule) if mesh.shape[a] > 1)
  devices = math.prod(mesh.shape[a] for a in axes)
  if count % devices:
    raise ValueError(f"rule ('experts', {rule!r}) splits {count} experts over {devices} devices, which do not "
                     "divide them")
  return axes


def _expert_parallel(x: jax.Array, routing: Routing, experts: Experts, kernels, axes: tuple[str, ...],
                     token_axes: tuple[str, ...]) -> jax.Array:
  """Inside shard_map, expert parallelism over the mesh `axes` (n devices): this device's (gate, up, down)
  kernels [E/n, ...] are the slices of the [E, ...] stacks at its index along `axes`. The n devices' tokens
  x [N, D] and routing [N, k] are all-gathered (over those of `axes` that shard the tokens, i.e. are among
  `token_axes`), each device runs its own experts on the assignments of the n*N tokens routed to them
  (`_local_dispatch`), and the float32 partial outputs [n*N, D] are summed back onto the tokens' devices by a
  reduce-scatter (a psum over those of `axes` whose devices hold the same tokens). -> [N, D] in x's dtype.

  Why an all-gather and a reduce-scatter: a dropless exchange with static shapes needs a worst-case buffer of the
  n*N*k assignments on every device whatever the collective (all of a group's tokens may choose one device's
  experts); `ragged_all_to_all` (exact-size exchange) is not implemented by XLA:CPU (jax 0.12), and an `all_to_all`
  of fixed buffers would send n buffers of N*k rows from each device, k times the tokens this sends. Per layer and
  device, forward: (n-1)*N*D values in the compute dtype (all-gather) plus (n-1)*N*D float32 (reduce-scatter),
  the backward the same two transposed; n/k times an exact all-to-all's ~2*(n-1)/n*N*k*D, and no expert weight
  moves (the gathering path all-gathers the 3*E*D*F weights and reduce-scatters as much gradient)."""
  gather = tuple(a for a in axes if a in token_axes)
  x, chosen, weights = (jax.lax.all_gather(a, gather, axis=0, tiled=True)
                        for a in (x, routing.experts, routing.weights))
  first = jax.lax.axis_index(axes) * kernels[0].shape[0]
  y = _local_dispatch(x, Routing(chosen, weights), experts, kernels, first)
  y = jax.lax.psum_scatter(y, gather, scatter_dimension=0, tiled=True)
  return jax.lax.psum(y, tuple(a for a in axes if a not in gather)).astype(x.dtype)


def _local_dispatch(x: jax.Array, routing: Routing, experts: Experts, kernels, first: jax.Array) -> jax.Array:
  """The share of `dispatch` that experts first .. first+E'-1 (kernels [E', ...]) compute for x [M, D], routing
  [M, k]: their assignments sorted by expert into E' groups, the others after them, outside every group of the
  grouped matmuls (whose rows there are zeros; whether they cost compute is the backend's ragged_dot's affair),
  and left out of the sum. -> [M, D] float32."""
  m, k = routing.experts.shape
  count = kernels[0].shape[0]
  local = routing.experts.reshape(-1) - first  # [M*k] each assignment's expert, counted from `first`
  mine = (local >= 0) & (local < count)
  local = jnp.where(mine, local, count)
  order = jnp.argsort(local, stable=True)
  token = order // k  # [M*k] the token of each sorted assignment
  group_sizes = jnp.bincount(local, length=count).astype(jnp.int32)  # [E'] (bincount drops the others' `count`)
  y = experts.apply(kernels, x[token], group_sizes)  # [M*k, D]
  y = jnp.where(mine[order][:, None], y.astype(jnp.float32) * routing.weights.reshape(-1)[order][:, None], 0.0)
  return jnp.zeros((m, x.shape[-1]), jnp.float32).at[token].add(y)


class MoE(nnx.Module):
  """The mixture-of-experts MLP of one block: router `gate` [D, E], stacked `experts`, and (Qwen2-MoE) a shared
  expert gated by sigmoid(`shared_expert_gate`(x)), added to every token."""

  def __init__(self, cfg: ModelConfig, names: tuple[str, str, str], activation, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
    self.gate = Dense(cfg.hidden_size, cfg.num_experts, ("embed", "scalar"), **kw)
    self.experts = Experts(cfg, names, activation, rngs=rngs)
    if cfg.shared_expert_size:
      self.shared_expert = MLP(cfg.replace(intermediate_size=cfg.shared_expert_size), rngs=rngs)
      self.shared_expert_gate = Dense(cfg.hidden_size, 1, ("embed", "scalar"), **kw)
    else:
      self.shared_expert = self.shared_expert_gate = None
    self.k, self.normalize = cfg.num_experts_per_tok, cfg.norm_topk_prob

  def __call__(self, x: jax.Array, token_mask: jax.Array,
               replay: jax.Array | None = None) -> tuple[jax.Array, jax.Array, RouterStats]:
    """x [B, T, D], token_mask [B, T] (1 on real tokens) -> (out [B, T, D], the chosen experts [B, T, k] (as
    `routing.recorded_dtype`), this layer's `RouterStats`). replay [B, T, k]: route to these experts where
    recorded (`routing.route`)."""
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    logits = self.gate(flat)
    routing = route(logits, self.k, self.normalize, None if replay is None else replay.reshape(b * t, -1))
    out = sharded_dispatch(flat, routing, self.experts).reshape(b, t, d)
    if self.shared_expert is not None:
      shared = self.shared_expert(x) * jax.nn.sigmoid(self.shared_expert_gate(x).astype(jnp.float32)).astype(x.dtype)
      out = out + shared
    experts = routing.experts.astype(recorded_dtype(logits.shape[-1])).reshape(b, t, -1)
    return (sharding.constrain(out, ("batch", "seq", "act_embed")), experts,
            router_stats(logits, routing.experts, token_mask.reshape(-1)))
