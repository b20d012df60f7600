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
scan's backward stack every layer's whole float32 expert gradient).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax.sharding import PartitionSpec as P

from jaxalign import sharding
from jaxalign.models.config import ModelConfig
from jaxalign.models.layers import MLP, Dense, param


class Routing(NamedTuple):
  """One layer's routing of N tokens: router logits [N, E] (float32), chosen experts [N, k] and their weights
  [N, k] (float32)."""

  logits: jax.Array
  experts: jax.Array
  weights: jax.Array


def route(logits: jax.Array, k: int, normalize: bool) -> Routing:
  """Softmax-then-top-k routing of router logits [N, E]: the k most probable experts of each token and their
  probabilities (renormalised over the k when `normalize`)."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, k)  # [N, k] each
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return Routing(logits.astype(jnp.float32), experts, weights)


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
  return jax.lax.ragged_dot(x.astype(dtype), kernel.astype(dtype), group_sizes,
                            preferred_element_type=jnp.float32).astype(dtype)


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
  n, k = routing.experts.shape
  flat = routing.experts.reshape(-1)  # [N*k] expert of each assignment
  order = jnp.argsort(flat, stable=True)
  token = order // k  # [N*k] the token of each sorted assignment
  group_sizes = jnp.bincount(flat, length=experts_count(experts)).astype(jnp.int32)  # [E]
  y = experts.apply(kernels if kernels is not None else experts.kernels(), x[token], group_sizes)  # [N*k, D]
  y = y.astype(jnp.float32) * routing.weights.reshape(-1)[order][:, None]
  return jnp.zeros((n, x.shape[-1]), jnp.float32).at[token].add(y).astype(x.dtype)


def experts_count(experts: Experts) -> int:
  return getattr(experts, experts.names[0]).kernel.shape[0]


def sharded_dispatch(x: jax.Array, routing: Routing, experts: Experts) -> jax.Array:
  """`dispatch` per batch shard under the enclosing `sharding.use_mesh` (each device its own tokens x [N, D],
  N = B*T flattened row-major from a batch-sharded [B, T, D]; the expert weights whole), or as is outside one.
  Tokens that the batch's mesh axes do not divide run replicated."""
  rules, mesh = sharding.active_rules(), jax.sharding.get_abstract_mesh()
  if rules is None or mesh.empty:
    return dispatch(x, routing, experts)
  tokens = sharding.logical_to_spec(("batch", None), x.shape, mesh, rules)  # P(batch axes, None) or P(None, None)
  variables = [getattr(experts, n).kernel for n in experts.names]
  # A scanned layer's kernel [E, ...] keeps its stack's names ("layers", "experts", ...): the trailing ones are its own
  specs = [sharding.logical_to_spec(v.get_metadata()["logical_axes"][-v.ndim:], v.shape, mesh, rules)
           for v in variables]
  dtype = getattr(experts, experts.names[0]).dtype

  def local(x, routing, *kernels):
    whole = [_gathered(kernel.astype(dtype), spec) for kernel, spec in zip(kernels, specs)]
    return dispatch(x, routing, experts, whole)

  # the router logits stay outside: the dispatch reads only the chosen experts and their weights
  return jax.shard_map(local, mesh=mesh, in_specs=(tokens, Routing(None, tokens, tokens), *specs),
                       out_specs=tokens, check_vma=False)(x, routing._replace(logits=None),
                                                          *(v[...] for v in variables))


def _gathered(shard: jax.Array, spec: P) -> jax.Array:
  """Inside shard_map: the whole array from this device's shard laid out by `spec` (tiled all-gathers)."""
  for dim, axes in enumerate(spec):
    if axes is not None:
      shard = jax.lax.all_gather(shard, axes, axis=dim, tiled=True)
  return shard


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

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> [B, T, D]."""
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    routing = route(self.gate(flat), self.k, self.normalize)
    out = sharded_dispatch(flat, routing, self.experts).reshape(b, t, d)
    if self.shared_expert is not None:
      shared = self.shared_expert(x) * jax.nn.sigmoid(self.shared_expert_gate(x).astype(jnp.float32)).astype(x.dtype)
      out = out + shared
    return sharding.constrain(out, ("batch", "seq", "act_embed"))
