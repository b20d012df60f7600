"""Generation in the decode layout (tensor parallel) inside a step whose policy is FSDP-sharded: the same
rollout as on one device, no weight gathered inside the decode loop nor materialised whole, and a per-device
footprint of (weights + cache) / devices plus a stated working set; plain `generate` fails the same checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxalign import sharding
from jaxalign.models import CausalLM, tiny
from jaxalign.rollout import SamplingConfig, generate, left_pad
from jaxalign.rollout.decode_layout import decode_model, decode_rules, generate_in_decode_layout

from compiled import arrays, computations, loop_computations, matrix_shapes  # tests/compiled.py

FSDP8 = sharding.MeshConfig(fsdp=-1)  # the training layout: every weight split on its model width
B, PROMPT, NEW = 8, 16, 16
MOVES = ("all-gather", "all-to-all", "collective-permute")


def config(kv_heads=8, scan_layers=False):
  """Heads, KV heads, MLP width and vocab all divide by 8 (kv_heads=2 does not)."""
  return tiny("llama", hidden_size=64, num_heads=8, num_kv_heads=kv_heads, intermediate_size=256,
              vocab_size=512, num_layers=2, scan_layers=scan_layers)


def prompts():
  rng = np.random.default_rng(0)
  return left_pad([rng.integers(3, 512, size=n).tolist() for n in (16, 5, 9, 1, 12, 16, 3, 7)], pad_id=0)


def runner(graphdef, sampling, decode):
  def run(params, ids, mask, key):
    model = nnx.merge(graphdef, params)
    if decode:
      return generate_in_decode_layout(model, ids, mask, key, sampling)
    return generate(model, ids, mask, key, sampling)
  return jax.jit(run)


def test_use_rules_switches_and_restores_the_active_rules():
  mesh = sharding.make_mesh(FSDP8)
  other = (("batch", None),)
  assert sharding.active_rules() is None
  with sharding.use_mesh(mesh):
    with sharding.use_rules(other):
      assert sharding.active_rules() == other
    assert sharding.active_rules() == sharding.DEFAULT_RULES
    with pytest.raises(RuntimeError), sharding.use_rules(other):
      raise RuntimeError("inside")
    assert sharding.active_rules() == sharding.DEFAULT_RULES
  assert sharding.active_rules() is None


def test_decode_rules_split_weights_on_their_outputs_and_the_cache_over_every_device():
  mesh = sharding.make_mesh(FSDP8)
  spec = lambda names, shape, rules: sharding.logical_to_spec(names, shape, mesh, rules)  # noqa: E731
  cache = ("cache_batch", "seq", "kv_heads", "head_dim")
  rules = decode_rules(sharding.DEFAULT_RULES, mesh, kv_heads=8)
  assert spec(("embed", "q_heads"), (64, 64), rules) == P(None, "fsdp")
  assert spec(("mlp", "embed"), (256, 64), rules) == P("fsdp", None)
  assert spec(("vocab", "embed"), (512, 64), rules) == P("fsdp", None)
  assert spec(("batch", "seq", "act_embed"), (B, 1, 64), rules) == P(None, None, None)
  assert spec(cache, (B, 31, 8, 8), rules) == P(None, None, "fsdp", None)  # by heads
  rules = decode_rules(sharding.DEFAULT_RULES, mesh, kv_heads=2)
  assert spec(("embed", "kv_heads"), (64, 16), rules) == P(None, "fsdp")  # K * H still splits
  assert spec(cache, (B, 31, 2, 8), rules) == P("fsdp", None, None, None)  # by rows
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  rules = decode_rules(sharding.DEFAULT_RULES, mesh, kv_heads=2)
  assert sharding.logical_to_spec(cache, (B, 31, 2, 8), mesh, rules) == P(("data", "fsdp"), None, "tensor", None)
  assert sharding.logical_to_spec(("batch", "seq"), (B, 31), mesh, rules) == P("data", None)


def test_decode_model_casts_weights_but_not_norms_and_leaves_the_model_alone():
  model = CausalLM(config(), rngs=nnx.Rngs(0))
  cast = decode_model(model, jnp.bfloat16)
  assert cast.lm_head.kernel[...].dtype == jnp.bfloat16
  assert cast.model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
  assert cast.model.norm.weight[...].dtype == jnp.float32
  assert model.lm_head.kernel[...].dtype == jnp.float32


@pytest.mark.parametrize("kv_heads,scan_layers", [(8, False), (2, True)])
def test_greedy_rollout_in_the_decode_layout_equals_one_device(kv_heads, scan_layers):
  cfg = config(kv_heads, scan_layers)
  mesh = sharding.make_mesh(FSDP8)
  graphdef, params = nnx.split(sharding.create_sharded(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)), mesh))
  local = jax.device_put(params, jax.devices()[0])
  ids, mask = prompts()
  sampling = SamplingConfig(max_new_tokens=8, temperature=0.0, eos_token_id=-1)
  key = jax.random.key(0)
  single = runner(graphdef, sampling, decode=False)(local, ids, mask, key)
  cast_only = runner(graphdef, sampling, decode=True)(local, ids, mask, key)  # no mesh: casting only
  with sharding.use_mesh(mesh):
    batch = jax.device_put((ids, mask), sharding.batch_sharding(mesh, 2))
    sharded = runner(graphdef, sampling, decode=True)(params, *batch, key)
  assert len(sharded.tokens.sharding.device_set) == 8
  for rollout in (sharded, cast_only):
    np.testing.assert_array_equal(rollout.tokens, single.tokens)
    np.testing.assert_array_equal(rollout.mask, single.mask)
    np.testing.assert_allclose(rollout.logprobs, single.logprobs, atol=1e-5)


# --- compiled HLO and memory -----------------------------------------------------------------------------

def layout_problems(compiled, weight_shapes, devices):
  """What the compiled generation does wrong: weights moved inside a loop, a whole weight materialised by
  an all-gather, or a reshard whose output is bigger than a device's share of the largest weight."""
  comps, entry = computations(compiled.as_text())
  smallest_shard = min(math.prod(s) for s in weight_shapes) // devices
  largest_shard = max(math.prod(s) for s in weight_shapes) // devices
  problems = []
  for name in loop_computations(comps, entry):
    for shape, op, _ in comps[name]:
      if op.startswith(MOVES) and sum(math.prod(a) for a in arrays(shape)) >= smallest_shard:
        problems.append(f"{op} {shape} inside a loop")
  for shape, op, _ in comps[entry]:
    if op.startswith("all-gather") and set(arrays(shape)) & weight_shapes:
      problems.append(f"{op} {shape} materialises a whole weight")
    if op.startswith("all-to-all") and sum(math.prod(a) for a in arrays(shape)) > largest_shard:
      problems.append(f"{op} {shape} moves more than a weight shard")
  return problems


@pytest.mark.parametrize("scan_layers", [False, True])
def test_compiled_rollout_moves_no_weight_in_the_loop_and_fits_weights_plus_cache_per_device(scan_layers):
  cfg = config(8, scan_layers)
  mesh = sharding.make_mesh(FSDP8)
  n = mesh.size
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
  shardings = sharding.param_shardings(abstract, mesh)
  params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), abstract, shardings)
  leaves = jax.tree.leaves(abstract)
  weight_shapes = matrix_shapes(abstract)
  ids = jax.ShapeDtypeStruct((B, PROMPT), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))
  sampling = SamplingConfig(max_new_tokens=NEW, temperature=0.0)

  f32 = 4
  weights = sum(v.size * v.dtype.itemsize for v in leaves)  # training layout (arguments), float32
  weights_compute = sum(v.size for v in leaves) * jnp.dtype(cfg.compute_dtype).itemsize  # the decode copy
  slots = PROMPT + NEW - 1
  cache = 2 * cfg.num_layers * B * slots * cfg.num_kv_heads * cfg.head_size * f32
  d, v, heads = cfg.hidden_size, cfg.vocab_size, cfg.num_heads
  working = (4 * B * PROMPT * d * f32  # prefill hidden states: replicated over the tensor-parallel devices
             + 2 * B * (heads // n) * PROMPT**2 * f32  # prefill attention scores and probabilities
             + 2 * B * v * f32  # logits of a step and their softmax
             + 4 * cache // (2 * cfg.num_layers * n))  # a few copies of one layer's K or V (cache update, dot layout)
  budget = (weights + weights_compute + cache) // n + working

  def footprint(decode):
    with sharding.use_mesh(mesh):
      compiled = runner(graphdef, sampling, decode).lower(params, ids, ids, jax.random.key(0)).compile()
    memory = compiled.memory_analysis()
    return memory.argument_size_in_bytes + memory.temp_size_in_bytes, layout_problems(compiled, weight_shapes, n)

  used, problems = footprint(decode=True)
  assert problems == []
  assert used <= budget, (used, budget)
  # The control: plain generate on FSDP weights gathers them whole (hoisted out of the loop, or per layer in it).
  plain_used, plain_problems = footprint(decode=False)
  assert plain_problems
  assert plain_used > budget, (plain_used, budget)
