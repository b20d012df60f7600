"""Packed and shared-prompt training passes of the online step (`online.packing`, rl.share_prompt): placement,
fallback, and equality with the padded passes (log-probs, entropies, values and their gradients), on one device
and per shard on a mesh."""

import contextlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import sharding
from jaxalign.config import RLConfig
from jaxalign.algorithms.online.packing import (pack, packed_or_padded, packed_rows, plan, saves_slots, unpack,
                                                with_packing)
from jaxalign.algorithms.online.step import OnlineFns
from jaxalign.models import CausalLM, ModelConfig, ScalarModel

TINY = ModelConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_position_embeddings=32, remat="none")
PROMPT, NEW = 6, 6


def rows_of(prompt_lengths, completion_lengths, seed=0) -> dict:
  """Rollout rows [R, P+N]: left-padded prompts, right-padded completions, random tokens."""
  p = np.arange(PROMPT)[None] >= PROMPT - np.asarray(prompt_lengths)[:, None]
  c = np.arange(NEW)[None] < np.asarray(completion_lengths)[:, None]
  ids = np.random.default_rng(seed).integers(1, TINY.vocab_size, (len(prompt_lengths), PROMPT + NEW))
  seg = np.concatenate([p, c], 1).astype(np.int32)
  return {"input_ids": jnp.asarray(ids * seg, jnp.int32), "segment_ids": jnp.asarray(seg),
          "loss_mask": jnp.asarray(np.concatenate([0 * p, c], 1), jnp.int32)}


def test_rows_are_placed_first_fit_longest_first_as_worked_out_by_hand():
  # Real lengths 5, 3, 7, 2 in rows of 12 slots, packed into 3 rows of 8 (ratio 3 x 8 / (4 x 12) = 0.5).
  rows = rows_of([3, 2, 4, 1], [2, 1, 3, 1])
  packing = plan(rows["segment_ids"], 0.5, length=8)
  # Longest first: 7 -> row 0; 5 -> row 1; 3 -> row 1 after the 5; 2 does not fit row 0 (1 left) or 1 (0 left).
  expected_docs = [[1] * 7 + [0], [1] * 5 + [2] * 3, [1] * 2 + [0] * 6]
  np.testing.assert_array_equal(packing.segment_ids[0], expected_docs)
  assert bool(packing.fits)
  ids = np.asarray(rows["input_ids"])
  real = [ids[r][np.asarray(rows["segment_ids"][r]) != 0] for r in range(4)]
  expected_ids = [list(real[2]) + [0], list(real[0]) + list(real[1]), list(real[3]) + [0] * 6]
  np.testing.assert_array_equal(pack(rows["input_ids"], packing), expected_ids)
  # Back to rows: every real token where it was, `fill` elsewhere.
  back = unpack(pack(rows["input_ids"], packing), packing, fill=-7)
  np.testing.assert_array_equal(back, np.where(np.asarray(rows["segment_ids"]) != 0, ids, -7))
  # Two packed rows hold 16 slots for 17 real tokens: the plan says so.
  assert not bool(plan(rows["segment_ids"], 2 * 8 / 48, length=8).fits)


def online_fns(rl: RLConfig, critic) -> OnlineFns:
  return OnlineFns(types.SimpleNamespace(op={"impl": "xla"}), None, rl, None, None, False, critic)


def passes(ctx: OnlineFns, rows, floor, ratio: float, length: int = 0):
  """Completion log-probs, entropies and values, and the gradient of their masked sum, packed or padded."""

  def objective(params, rows):
    policy, critic = nnx.merge(graphdef, params["policy"]), params["value"]
    logps, mask, entropy = ctx.completion_logps(policy, rows, floor, entropy=True)
    values = ctx.values(critic, rows)
    total = jnp.sum((logps + 0.3 * entropy + 0.1 * values * values) * mask)
    return total, (logps, mask, entropy, values)

  return packed_or_padded(lambda r: jax.value_and_grad(objective, has_aux=True)(params, r), rows, ratio, length)


graphdef, policy_params = nnx.split(CausalLM(TINY, rngs=nnx.Rngs(0)))
critic_graphdef, critic_params = nnx.split(ScalarModel(TINY, rngs=nnx.Rngs(1)))
params = {"policy": policy_params, "value": critic_params}


def top_k_floor(rows, k: int, temperature: float):
  """A sampler-like logit floor [R, T-1]: the k-th largest tempered logit, never above the target's."""
  logits = nnx.merge(graphdef, policy_params)(rows["input_ids"], segment_ids=rows["segment_ids"])[:, :-1]
  logits = logits / temperature
  kth = jnp.sort(logits, -1)[..., -k]
  target = jnp.take_along_axis(logits, rows["input_ids"][:, 1:, None], -1)[..., 0]
  return jnp.minimum(kth, target) - 1e-3


def assert_same_passes(got, want):
  """`passes` outputs ((total, (logps, mask, entropy, values)), grads) equal: the masked per-token values, the
  total and the gradients."""
  (total, (logps, mask, entropy, values)), grads = want
  (g_total, (g_logps, g_mask, g_entropy, g_values)), g_grads = got
  np.testing.assert_array_equal(g_mask, mask)
  for a, b in ((g_logps, logps), (g_entropy, entropy), (g_values, values)):
    np.testing.assert_allclose(a * mask, b * mask, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_total, total, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))


# Packed rows twice the rollout rows' length on one device; on a 4-shard mesh (4 rows per shard) their length.
@pytest.mark.parametrize("mesh_shape, length", [(None, 2 * (PROMPT + NEW)), ((2, 2, 1), 0)])
def test_packed_passes_equal_the_padded_ones_with_gradients(mesh_shape, length):
  rl = RLConfig(max_new_tokens=NEW, temperature=1.3, top_k=5)
  ctx = online_fns(rl, critic_graphdef)
  rng = np.random.default_rng(3)
  rows = rows_of(rng.integers(1, PROMPT + 1, 16), rng.integers(0, NEW + 1, 16), seed=4)
  floor = top_k_floor(rows, 5, rl.temperature)
  real = float(jnp.mean(rows["segment_ids"] != 0))

  def run(ratio, length=0):
    return jax.jit(lambda r, f: passes(ctx, r, f, ratio, length))(rows, floor)

  if mesh_shape:
    mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape), jax.devices()[:4])
    rows, floor = jax.device_put((rows, floor), sharding.batch_sharding(mesh, 2))
    with sharding.use_mesh(mesh):
      assert plan(rows["segment_ids"], 0.5).source.shape[:2] == (4, 2)  # 4 shards of 4 rows, 2 packed each
      (padded, _), (packed, metrics), (fallback, fallback_metrics) = run(0.0), run(real + 0.15, length), run(0.2)
  else:
    (padded, _), (packed, metrics), (fallback, fallback_metrics) = run(0.0), run(real + 0.15, length), run(0.2)
  assert float(metrics["packed_fraction"]) == 1.0 and float(fallback_metrics["packed_fraction"]) == 0.0
  assert real < float(metrics["pack_fill"]) <= 1.0  # fuller rows than the padded ones

  for other in (packed, fallback):
    assert_same_passes(other, padded)
  logps, mask = padded[0][1][:2]
  # The floor matters: the full distribution's log-probs are lower wherever it cut the vocabulary.
  full = ctx.completion_logps(nnx.merge(graphdef, policy_params), rows, None)[0]
  assert float(jnp.max((logps - full) * mask)) > 0.1


def test_every_rows_dict_of_a_unit_is_packed_and_one_misfit_falls_back():
  """Online DPO's pairs carry two rows dicts: both pack, and packing applies only when both fit."""
  short, long = rows_of([2] * 4, [2] * 4), rows_of([6] * 4, [6] * 4)
  tree, fits = with_packing({"chosen": short, "rejected": short}, 0.5)
  assert bool(fits) and "packing" in tree["chosen"] and "packing" in tree["rejected"]
  assert packed_rows(tree["chosen"], tree["chosen"]["packing"])["input_ids"].shape == (2, PROMPT + NEW)
  _, fits = with_packing({"chosen": short, "rejected": long}, 0.5)
  assert not bool(fits)


def test_whole_row_rounding_that_saves_no_slots_runs_padded():
  rows = rows_of([2] * 4, [2] * 4)  # 4 rows: 0.9 x 4 rounds up to 4 packed rows of the same length
  assert not saves_slots((4, PROMPT + NEW), 0.9) and saves_slots((4, PROMPT + NEW), 0.75)
  carries = lambda tree: jnp.asarray("packing" in tree)
  out, metrics = packed_or_padded(carries, rows, 0.9)
  assert not bool(out) and float(metrics["packed_fraction"]) == 0.0
  out, metrics = packed_or_padded(carries, rows, 0.75)
  assert bool(out) and float(metrics["packed_fraction"]) == 1.0 and float(metrics["pack_fill"]) == pytest.approx(16 / 36)


def grouped_rows(groups: int, group: int, seed: int = 0) -> dict:
  """Rollout rows of `groups` prompts x `group` completions: consecutive rows share their prompt."""
  rng = np.random.default_rng(seed)
  rows = rows_of(np.repeat(rng.integers(1, PROMPT + 1, groups), group), rng.integers(0, NEW + 1, groups * group), seed)
  ids = np.asarray(rows["input_ids"]).copy()
  ids[:, :PROMPT] = ids[np.repeat(np.arange(groups) * group, group), :PROMPT]
  return {**rows, "input_ids": jnp.asarray(ids)}


# One device (3 groups of 4); 4 shards holding one group of 2 rows each; 4 shards and 2 groups of 4: each shard
# holds half a group and computes its prompt once; 4 shards and one group of 4 (a row per shard): none shared.
@pytest.mark.parametrize("mesh_shape, groups, group, sharing", [(None, 3, 4, 4), ((2, 2, 1), 4, 2, 2),
                                                                ((2, 2, 1), 2, 4, 2), ((2, 2, 1), 1, 4, 1)])
def test_shared_prompt_passes_equal_whole_rows_with_gradients(mesh_shape, groups, group, sharing):
  rl = RLConfig(max_new_tokens=NEW, temperature=1.3, top_k=5, group_size=group)
  whole = online_fns(rl, critic_graphdef)
  shared = whole.with_shared_prompts()
  rows = grouped_rows(groups, group, seed=groups)
  floor = top_k_floor(rows, 5, rl.temperature)
  run = lambda ctx: jax.jit(lambda r, f: passes(ctx, r, f, 0.0)[0])
  if mesh_shape:
    mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape), jax.devices()[:4])
    rows, floor = jax.device_put((rows, floor), sharding.batch_sharding(mesh, 2))
  with sharding.use_mesh(mesh) if mesh_shape else contextlib.nullcontext():
    assert shared.prompt_sharing(rows) == sharing and whole.prompt_sharing(rows) == 1
    assert_same_passes(run(shared)(rows, floor), run(whole)(rows, floor))
    flops = [run(ctx).lower(rows, floor).compile().cost_analysis()["flops"] for ctx in (whole, shared)]
  # Each prompt ran once: the policy passes (forward and backward) cover 6 + 4 x 6 tokens per group, not 4 x 12
  # (the critic's pass stays whole).
  if mesh_shape is None:
    assert flops[1] < 0.85 * flops[0]
