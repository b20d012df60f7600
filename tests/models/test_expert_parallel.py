"""Expert parallelism on 8 fake CPU devices: a rule that maps "experts" to mesh axes gives each device its E/n
experts, moves tokens instead of expert weights, and computes what one device computes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxalign import sharding
from jaxalign.models import CausalLM, tiny
from jaxalign.models.moe import sharded_dispatch
from jaxalign.models.routing import Routing

VOCAB, E = 64, 8


def ep_rules(axes) -> sharding.Rules:
  """The default rules with the experts axis mapped to mesh `axes`."""
  return tuple((name, axes if name == "experts" else rule) for name, rule in sharding.DEFAULT_RULES)


def _config(family, **overrides):
  return tiny(family, **{**dict(vocab_size=VOCAB, num_experts=E, num_experts_per_tok=2, hidden_size=32, head_dim=16),
                         **overrides})


def _batch():
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, VOCAB, (8, 9)))
  mask = jnp.asarray(np.arange(9)[None] < rng.integers(4, 10, (8, 1))).astype(jnp.int32)
  return ids, mask


def lm_loss(model, ids, mask):
  logits = model(ids[:, :-1], mask[:, :-1])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
  return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:]), logits


CASES = {
  # EP over fsdp inside each data replica; "embed" -> fsdp yields that axis to the experts dim
  "fsdp": ("qwen3_moe", False, (2, 4, 1), "fsdp"),
  # the experts' "mlp" dim stays tensor-sharded and is gathered inside; the layers scanned
  "fsdp_with_tensor": ("qwen3_moe", True, (2, 2, 2), "fsdp"),
  # 8-way EP, one expert per device, over both token axes; Qwen2-MoE's shared expert beside it
  "data_fsdp": ("qwen2_moe", True, (2, 4, 1), ("data", "fsdp")),
  # tensor's devices hold the same tokens: their experts' outputs are summed, not scattered
  "fsdp_tensor": ("qwen3_moe", False, (2, 2, 2), ("fsdp", "tensor")),
}


@pytest.mark.parametrize("case", CASES)
def test_expert_parallel_logits_and_gradients_equal_one_device(case):
  family, scan, (data, fsdp, tensor), axes = CASES[case]
  model = CausalLM(_config(family, scan_layers=scan), rngs=nnx.Rngs(0))
  ids, mask = _batch()
  step = nnx.jit(nnx.value_and_grad(lm_loss, has_aux=True))
  (_, logits_1), grads_1 = step(model, ids, mask)

  rules = ep_rules(axes)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=data, fsdp=fsdp, tensor=tensor, rules=rules))
  sharded = sharding.shard_module(nnx.clone(model), mesh, rules)
  gate = sharded.model.layers.mlp.experts.gate_proj if scan else sharded.model.layers[0].mlp.experts.gate_proj
  assert gate.kernel[...].sharding.spec[-3] == axes
  with sharding.use_mesh(mesh, rules):
    (_, logits_8), grads_8 = step(sharded, *jax.device_put((ids, mask), sharding.batch_sharding(mesh, 2, rules)))
  np.testing.assert_allclose(logits_8, logits_1, rtol=1e-5, atol=1e-6)
  for g1, g8 in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_8), strict=True):
    np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=1e-5, atol=1e-7)


def _expert_gathers(hlo: str, shapes) -> list[str]:
  """The all-gathers in compiled HLO whose result ends in one of `shapes` (whole [E, ...] expert kernels, alone or
  stacked over layers)."""
  tails = tuple("," + ",".join(map(str, s)) for s in shapes)
  return [m.group(0) for m in re.finditer(r"= \w+\[([\d,]*)\]\S* all-gather\(", hlo)
          if ("," + m.group(1)).endswith(tails)]


def _sharded_forward(model, rules):
  """The model sharded on a data=1, fsdp=8 mesh by `rules`, and its compiled forward's HLO text."""
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=8, tensor=1, rules=rules))
  sharded = sharding.shard_module(nnx.clone(model), mesh, rules)
  graphdef, state = nnx.split(sharded)
  batch = jax.device_put(_batch(), sharding.batch_sharding(mesh, 2, rules))
  with sharding.use_mesh(mesh, rules):
    forward = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
    return sharded, forward.lower(state, *batch).compile().as_text()


def test_each_device_holds_its_experts_and_the_forward_moves_tokens_not_weights():
  model = CausalLM(_config("qwen3_moe", moe_intermediate_size=48, scan_layers=True), rngs=nnx.Rngs(0))
  sharded, hlo = _sharded_forward(model, ep_rules("fsdp"))
  kernel = model.model.layers.mlp.experts.down_proj.kernel[...]
  shards = sharded.model.layers.mlp.experts.down_proj.kernel[...]
  assert shards.sharding.spec == P(None, "fsdp", None, None)  # [L, E, F, D]: "embed" yields fsdp to "experts"
  for shard in shards.addressable_shards:
    assert shard.data.shape == (2, E // 8, 48, 32)
    np.testing.assert_array_equal(shard.data, kernel[shard.index])

  whole = [(E, 32, 48), (E, 48, 32)]  # an expert kernel [E, D, F] or [E, F, D] (one layer's, or one in [L, ...])
  assert not _expert_gathers(hlo, whole)
  assert "all-gather(" in hlo and "reduce-scatter(" in hlo  # the tokens' exchange
  assert _expert_gathers(_sharded_forward(model, sharding.DEFAULT_RULES)[1], whole)  # what the gathering path does


def test_expert_weights_per_device_are_their_share_and_never_gathered_whole():
  """One layer's dispatch with wide experts: each device's arguments hold 1/8 of the expert weights and its
  scratch less than one whole kernel; the gathering path's scratch holds all three whole."""
  f = 512
  cfg = _config("qwen3_moe", hidden_size=64, moe_intermediate_size=f)
  experts = CausalLM(cfg, rngs=nnx.Rngs(0)).model.layers[0].mlp.experts
  total = 3 * E * 64 * f * 4  # float32 gate, up, down
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 64)), jnp.float32)
  routing = Routing(jnp.asarray(rng.integers(0, E, (32, 2)), jnp.int32), jnp.full((32, 2), 0.5, jnp.float32))
  memory = {}
  for name, rules in (("ep", ep_rules("fsdp")), ("gathering", sharding.DEFAULT_RULES)):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=8, tensor=1, rules=rules))
    graphdef, state = nnx.split(sharding.shard_module(nnx.clone(experts), mesh, rules))
    args = jax.device_put((x, routing), sharding.batch_sharding(mesh, 2, rules))
    with sharding.use_mesh(mesh, rules):
      compiled = jax.jit(lambda s, x, r: sharded_dispatch(x, r, nnx.merge(graphdef, s))).lower(state, *args).compile()
    memory[name] = compiled.memory_analysis()
  tokens = (x.nbytes + routing.experts.nbytes + routing.weights.nbytes) / 8
  assert (memory["ep"].argument_size_in_bytes - tokens) / total == pytest.approx(1 / 8)
  assert memory["ep"].temp_size_in_bytes < total / 3  # less than one whole kernel
  assert memory["gathering"].temp_size_in_bytes > total


def test_experts_that_the_expert_axes_do_not_divide_are_refused():
  model = CausalLM(_config("qwen3_moe", num_experts=6), rngs=nnx.Rngs(0))
  rules = ep_rules("fsdp")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4, tensor=1, rules=rules))
  ids, mask = _batch()
  with sharding.use_mesh(mesh, rules), pytest.raises(ValueError, match=r"rule \('experts', 'fsdp'\) splits 6 experts "
                                                                       r"over 4 devices"):
    nnx.eval_shape(lambda m: m(ids, mask), model)
