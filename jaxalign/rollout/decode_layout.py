"""A layout for generation inside the training step: tensor parallelism instead of FSDP.

The training layout (`sharding.DEFAULT_RULES`) shards every matmul weight on its model width ("embed" ->
fsdp). A decode loop over such weights needs each one whole on every device at every step, and XLA hoists
those all-gathers out of the `lax.while_loop`: the gathered weights then stay live for the whole rollout
(32 GB per device for an 8B policy). In the decode layout every weight is split on its *output* side
(heads, MLP width, vocab) and the model width is replicated, so a matmul needs only its local shard and
one all-reduce of a [B, T, D] activation: no weight moves during generation. The weights are resharded
once per step from the training layout (an all-to-all per weight, each device receiving its shard only).

The model cooperates through logical names only (`jaxalign.models.attention`): the KV cache's rows are
named "cache_batch" where the active rules define it (`cache_axes`), and under such rules cached attention
pins its projections to their weights' layout and runs in the cache's layout. Training never sees them.

Costs: prefill activations [B, P, D] are replicated over the tensor-parallel devices (the training layout
splits them by rows), and each layer does two all-reduces of [B, T, D] per step.

Use it inside a jitted step that runs under `sharding.use_mesh(mesh, rules)`::

  rollout = generate_in_decode_layout(model, prompt_ids, prompt_mask, key, sampling_cfg)

or by hand::

  with decoding(sharding.active_rules(), jax.sharding.get_abstract_mesh(), kv_heads=K):
    rollout = sampler.generate(decode_model(model, dtype), prompt_ids, prompt_mask, key, sampling_cfg)
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign import sharding
from jaxalign.rollout import sampler

# Logical names that split a weight's output side in the training rules: their mesh axes come first in the
# decode layout's tensor-parallel group (they are "tensor" in `sharding.DEFAULT_RULES`).
_OUTPUT_NAMES = ("q_heads", "kv_heads", "mlp", "vocab")
# Names whose mesh axes shard weights in training at all; every other mesh axis stays data-parallel.
_WEIGHT_NAMES = _OUTPUT_NAMES + ("embed",)
# Names that are replicated in the decode layout (whatever the training rules say).
_REPLICATED = ("seq", "embed", "act_embed", "norm", "head_dim", "scalar", "layers")


def _axes(rules: sharding.Rules, names) -> tuple[str, ...]:
  """The mesh axes `rules` maps any of `names` to, in order of first appearance."""
  table = dict(rules)
  out: list[str] = []
  for name in names:
    out += [a for a in sharding._as_tuple(table.get(name)) if a not in out]
  return tuple(out)


def _heads_axes(tp: tuple[str, ...], mesh, kv_heads: int) -> tuple[str, ...]:
  """The prefix of `tp` that `sharding.logical_to_spec` keeps for a dimension of `kv_heads` (it drops
  mesh axes from the end until their product divides the size)."""
  axes = list(tp)
  while axes and kv_heads % math.prod(mesh.shape[a] for a in axes):
    axes.pop()
  return tuple(axes)


def decode_rules(rules: sharding.Rules, mesh, kv_heads: int | None = None) -> sharding.Rules:
  """The logical-axis rules for generation, derived from the training `rules` on `mesh`.

  mesh: a `Mesh` or the `AbstractMesh` of a traced function (`jax.sharding.get_abstract_mesh()`).
  kv_heads: the model's number of KV heads K, which decides how the cache splits (see below); None
  assumes the tensor-parallel group divides K.

  The tensor-parallel (TP) group is every mesh axis the training rules shard weights over, output-side
  axes first: ("tensor", "fsdp") for `DEFAULT_RULES`, i.e. all devices of a (1, fsdp, tensor) mesh.
  The other mesh axes ("data") stay data-parallel: weights are replicated over them in training too.

  - "q_heads", "kv_heads", "mlp", "vocab" -> TP group. `logical_to_spec` drops trailing axes that do
    not divide a dimension, and the weights' dimensions are flattened (heads x head dim), so they split
    over all of TP even when the head count does not (a q_proj [D, N*H] needs 8 | N*H, not 8 | N).
  - "embed", "act_embed", "seq", "head_dim", "norm", "layers", "scalar" -> replicated: each matmul
    contracts a replicated activation with its local weight shard (an all-reduce after o_proj / down_proj).
  - "batch" -> the data-parallel axes only: activations are replicated over TP (batch-sharding them over
    TP would make XLA gather weights to keep the rows apart).
  - "cache_batch" (the rows of the KV cache [B, K, S, H], of its ("cache_batch", "kv_heads", "seq",
    "head_dim") names, see `jaxalign.models.attention.cache_axes`) -> data-parallel axes plus the TP
    axes the K heads cannot use, so the cache splits over all devices: with K = 8 on an 8-device group
    it is split by heads (attention is head-local, as in Megatron TP); with K = 2 on fsdp = 8 by rows
    (8 | B), and attention runs row-parallel, the queries and outputs [B, T, N, H] moving between the
    layouts by small all-to-alls; with K = 2 on (tensor=2, fsdp=4) 2-way by heads and 4-way by rows.
    `logical_to_spec` claims axes in the array's order, rows before heads, so the rows' share has to be
    decided here from K.
  Names the training rules add beyond these keep their training mapping.
  """
  table = dict(rules)
  tp = tuple(a for a in _axes(rules, _WEIGHT_NAMES) if mesh.shape[a] > 1)  # output-side axes first
  dp = tuple(a for a in mesh.axis_names if a not in tp and mesh.shape[a] > 1)
  heads = tp if kv_heads is None else _heads_axes(tp, mesh, kv_heads)
  spare = tuple(a for a in tp if a not in heads)
  decoded = {name: tp for name in _OUTPUT_NAMES}
  decoded.update({name: None for name in _REPLICATED})
  decoded.update(batch=dp or None, cache_batch=(dp + spare) or None)
  return tuple((name, decoded.get(name, axes)) for name, axes in table.items()) + tuple(
    (name, axes) for name, axes in decoded.items() if name not in table)


@contextlib.contextmanager
def decoding(rules: sharding.Rules | None = None, mesh=None, kv_heads: int | None = None):
  """Run the enclosed (traced) code in the decode layout: `sharding.constrain` (activations, the KV
  cache) follows `decode_rules(rules, mesh, kv_heads)`. Defaults: the active rules and the current
  (abstract) mesh. Outside a mesh, or with no rules active, it changes nothing. The mesh is not re-entered."""
  rules = sharding.active_rules() if rules is None else rules
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if rules is None or mesh.empty:
    yield rules
    return
  with sharding.use_rules(decode_rules(rules, mesh, kv_heads)) as active:
    yield active


def _casts(var: nnx.Variable) -> bool:
  """Whether `decode_model` casts this variable: floating weights, but not norm scales (RMSNorm reads
  them in float32 for Gemma; casting them would change the numerics and saves O(D) bytes)."""
  axes = var.get_metadata().get("logical_axes") or ()
  return jnp.issubdtype(var[...].dtype, jnp.floating) and "norm" not in axes


def decode_model(model, compute_dtype=None):
  """The model with every weight cast to `compute_dtype` (default: its config's) and constrained into the
  active layout by its `logical_axes` (inside `decoding`: the decode layout). Pure: `model` is unchanged.

  Call it inside the jitted step, once, before `generate`; it works on a model rebuilt from traced
  params (`nnx.merge`). Outside a mesh it only casts.
  """
  dtype = model.config.compute_dtype if compute_dtype is None else compute_dtype
  graphdef, state = nnx.split(model)

  def convert(var):
    value = var[...]
    if _casts(var) and value.dtype != dtype:
      # Cast the training-layout shard first, so the reshard moves compute-dtype bytes (XLA would
      # otherwise sink the convert below the all-to-all). The CPU backend still carries bf16 collectives
      # in float32.
      value = jax.lax.optimization_barrier(value.astype(dtype))
    names = var.get_metadata().get("logical_axes") or (None,) * value.ndim
    return var.replace(sharding.constrain(value, names))

  state = jax.tree.map(convert, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)


def generate_in_decode_layout(model, prompt_ids: jax.Array, prompt_mask: jax.Array, key: jax.Array,
                              cfg: sampler.SamplingConfig, *, compute_dtype=None, **kwargs) -> sampler.Rollout:
  """`sampler.generate` on the model in the decode layout (see the module docstring); kwargs go to
  `generate`. Under `sharding.use_mesh` it reshards the weights and runs generation in
  `decode_rules(active rules, mesh, K)`; outside a mesh it only casts the weights to the compute dtype."""
  with jax.named_scope("decode_layout"), decoding(kv_heads=model.config.num_kv_heads):
    return sampler.generate(decode_model(model, compute_dtype), prompt_ids, prompt_mask, key, cfg, **kwargs)
