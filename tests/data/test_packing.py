"""Packed and shared-prompt preference pairs and ranked lists: the same statistics, losses and gradients as the
padded layout.

A packed batch holds the B examples' B*C (prompt + response) sequences in N <= B*C rows, with `pack_row` /
`pack_segment` [B, C] saying where each landed; `forward.sequence_sums` reads both layouts. A shared-prompt batch
lays each row out as the prompt left-padded to P, then the response, and `forward.example_logps` runs each
prompt once.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.algorithms.forward import rows, sequence_sums, token_logps
from jaxalign.algorithms.objectives import objective_for
from jaxalign.data import DataConfig, digits_tokenizer, load_split
from jaxalign import sharding
from jaxalign.data.batching import (collate_multi, collate_packed, equal_packed_rows, equal_prompt_layouts,
                                    first_fit_decreasing, packed_row_count)
from jaxalign.data.pipeline import Batches
from jaxalign.data.tokenize import Encoded
from jaxalign.models import CausalLM, ModelConfig, ScalarModel, default_positions

TINY = ModelConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_position_embeddings=64, remat="none")
BUCKETS = (16, 32)


def examples(count, responses, seed=0, scored=False):
  """Examples of varied prompt (2-10) and response (1-12) lengths; scores 0..C-1 in random order if scored."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    prompt = rng.integers(6, 24, rng.integers(2, 11)).astype(np.int32)
    resp = tuple(rng.integers(6, 24, rng.integers(1, 13)).astype(np.int32) for _ in range(responses))
    out.append(Encoded(prompt, resp, tuple(map(float, rng.permutation(responses))) if scored else ()))
  return out


def sequences(batch):
  """(example, response) -> the token ids of its packed segment (as lists), in a batch holding one or more whole
  packing groups (a process's rows)."""
  ids, seg = batch["input_ids"], batch["segment_ids"]
  return {(b, c): ids[r % len(ids)][seg[r % len(ids)] == s].tolist()
          for (b, c), r in np.ndenumerate(batch["pack_row"]) for s in [batch["pack_segment"][b, c]]}


@functools.cache
def models():
  """((graphdef, state) of the policy, a reference model): built once, the slow part of these tests."""
  return nnx.split(CausalLM(TINY, rngs=nnx.Rngs(0))), CausalLM(TINY, rngs=nnx.Rngs(1))


def loss_and_grads(objective, batch, **loss_params):
  """(stats, loss, grads) of `objective` on one micro-batch, jitted."""
  (graphdef, state), reference = models()
  batch = jax.tree.map(jnp.asarray, batch)
  counts = objective.step_counts(jax.tree.map(lambda x: x[None], batch))

  def loss(state):
    stats = objective.stats(nnx.merge(graphdef, state), reference if objective.uses_reference else None, batch)
    return objective.loss(stats, counts, loss_params)[0], stats

  (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
  return stats, value, grads, counts


def assert_close(packed, padded, rtol=1e-5):
  """Equal to float tolerance: relative per element, with an absolute floor of rtol * the largest magnitude."""
  for a, b in zip(jax.tree.leaves(packed), jax.tree.leaves(padded)):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(np.abs(b).max(), 1e-30))


def test_first_fit_decreasing_and_row_counts():
  assert first_fit_decreasing([5, 9, 3, 7, 2], 10) == [[1], [3, 2], [0, 4]]
  assert packed_row_count(3, 16) == 4 and packed_row_count(5, 16) == 6 and packed_row_count(16, 16) == 16
  assert packed_row_count(1, 16, multiple=4) == 4 and packed_row_count(0, 4) == 1


def test_dpo_stats_loss_and_gradients_equal_the_padded_batch():
  data = examples(8, 2)
  padded, packed = collate_multi(data, BUCKETS), collate_packed(data, BUCKETS)
  assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0] * 2  # fewer rows than B * C
  assert packed["input_ids"].shape[1] == padded["input_ids"].shape[2]
  objective = objective_for("preference", "dpo")
  want, want_loss, want_grads, want_counts = loss_and_grads(objective, padded, beta=0.1)
  got, got_loss, got_grads, got_counts = loss_and_grads(objective, packed, beta=0.1)
  assert_close(got, want)
  assert_close(got_loss, want_loss)
  assert_close(got_grads, want_grads)
  assert {k: int(v) for k, v in got_counts.items()} == {k: int(v) for k, v in want_counts.items()}
  assert abs(float(want_loss) - np.log(2)) > 1e-3  # policy and reference differ: the test has teeth

  # precomputed reference log-probs (reference.mode=precomputed) read the same way in either layout
  ref = np.stack([want.ref_chosen, want.ref_rejected], 1)
  data = [Encoded(e.prompt, e.responses, ref_logps=tuple(map(float, r))) for e, r in zip(data, ref)]
  graphdef, state = models()[0]
  stats = jax.jit(lambda state, batch: objective.stats(nnx.merge(graphdef, state), None, batch))
  assert_close(stats(state, collate_packed(data, BUCKETS)), want)


def test_ranked_list_loss_and_gradients_equal_the_padded_batch():
  data = examples(6, 3, seed=1, scored=True)
  padded, packed = collate_multi(data, BUCKETS), collate_packed(data, BUCKETS)
  assert packed["input_ids"].shape[0] < 6 * 3
  objective = objective_for("preference", "dpo_pl")
  want, want_loss, want_grads, _ = loss_and_grads(objective, padded)
  got, got_loss, got_grads, _ = loss_and_grads(objective, packed)
  assert_close(got, want)
  assert_close(got_loss, want_loss)
  assert_close(got_grads, want_grads)


def test_reward_model_reads_each_sequence_last_token():
  data = examples(6, 2, seed=2)
  objective = objective_for("reward", "bradley_terry")
  graphdef, state = nnx.split(ScalarModel(TINY, rngs=nnx.Rngs(0)))
  stats = jax.jit(lambda state, batch: objective.stats(nnx.merge(graphdef, state), None, batch))
  assert_close(stats(state, collate_packed(data, BUCKETS)), stats(state, collate_multi(data, BUCKETS)))


def test_segments_never_see_each_other_and_positions_restart(monkeypatch):
  data = examples(8, 2, seed=3)
  batch = collate_packed(data, BUCKETS)
  crowded = np.argmax((batch["pack_row"][..., None] == np.arange(batch["input_ids"].shape[0])).sum((0, 1)))
  first = tuple(np.argwhere((batch["pack_row"] == crowded) & (batch["pack_segment"] == 1))[0])
  assert np.sum(batch["pack_row"] == crowded) >= 2  # a row that holds several sequences

  import jaxalign.models.decoder as decoder
  seen = []
  tables = decoder.model_rotary_tables
  monkeypatch.setattr(decoder, "model_rotary_tables",
                      lambda cfg, positions: seen.append(positions) or tables(cfg, positions))
  graphdef, state = models()[0]

  @jax.jit
  def logps(state, batch):  # per-sequence log-probs, and the positions the rotary embedding was given
    values, mask = token_logps(nnx.merge(graphdef, state), rows(batch))
    return sequence_sums(values, mask, batch)[0], seen[-1]

  before, positions = map(np.asarray, logps(state, batch))
  for (b, c), r in np.ndenumerate(batch["pack_row"]):
    where = batch["segment_ids"][r] == batch["pack_segment"][b, c]
    np.testing.assert_array_equal(positions[r][where], np.arange(where.sum()))
  np.testing.assert_array_equal(positions, default_positions(jnp.asarray(batch["segment_ids"])))

  changed = {k: v.copy() for k, v in batch.items()}
  where = changed["segment_ids"][crowded] == 1
  changed["input_ids"][crowded, where] = (changed["input_ids"][crowded, where] + 5 - 6) % 18 + 6
  after = np.asarray(logps(state, changed)[0])
  others = np.ones(before.shape, bool)
  others[first] = False
  assert abs(after[first] - before[first]) > 1e-3  # the edited sequence moved
  np.testing.assert_array_equal(after[others], before[others])  # no other sequence did, bit for bit


def test_pipeline_packs_fewer_rows_and_every_response_once():
  tok = digits_tokenizer()
  for fmt, per_example in (("preference", 2), ("ranked", 3)):
    cfg = DataConfig(format=fmt, max_length=64, max_prompt_length=32, batch_size=16, packing=True,
                     synthetic_size=(64, 16), shuffle=True)
    encoded, _ = load_split(("synthetic:sort",), cfg, tok)
    packed = next(Batches(encoded, cfg, seed=3))
    padded = next(Batches(encoded, dataclasses.replace(cfg, packing=False), seed=3))
    n = packed["input_ids"].shape[0]
    assert n < 16 * per_example and packed["pack_row"].shape == (16, per_example)
    cells = {(int(r), int(s)) for r, s in zip(packed["pack_row"].ravel(), packed["pack_segment"].ravel())}
    assert len(cells) == 16 * per_example  # no two responses share a segment
    used = {(r, int(s)) for r in range(n) for s in np.unique(packed["segment_ids"][r]) if s}
    assert used == cells  # and every segment is some response
    for (b, c), ids in sequences(packed).items():
      np.testing.assert_array_equal(ids, padded["input_ids"][b, c][padded["segment_ids"][b, c] != 0])
      seg = packed["segment_ids"][packed["pack_row"][b, c]] == packed["pack_segment"][b, c]
      np.testing.assert_array_equal(packed["loss_mask"][packed["pack_row"][b, c]][seg],
                                    padded["loss_mask"][b, c][padded["segment_ids"][b, c] != 0])
    if fmt == "ranked":
      np.testing.assert_array_equal(packed["scores"], padded["scores"])


def test_process_blocks_pack_apart_and_micro_batches_stack():
  data = examples(8, 2, seed=4)
  whole = collate_packed(data, BUCKETS)
  halves = [collate_packed(data, BUCKETS, rows=list(range(4 * p, 4 * p + 4))) for p in range(2)]
  n = halves[0]["input_ids"].shape[0]
  assert halves[1]["input_ids"].shape[0] == n  # every process gets the rows the fullest block needs
  assert halves[0]["pack_row"].max() < n <= halves[1]["pack_row"].min()
  joined = {k: np.concatenate([h[k] for h in halves]) for k in halves[0]}
  assert sequences(joined) == sequences(whole)

  short = [Encoded(e.prompt[:2], tuple(r[:1] for r in e.responses)) for e in data]  # all fit in fewer rows
  before = [halves[1], collate_packed(short, BUCKETS, rows=[4, 5, 6, 7])]
  assert before[0]["input_ids"].shape[0] > before[1]["input_ids"].shape[0]
  after = equal_packed_rows(before)
  n = before[0]["input_ids"].shape[0]
  assert after[1]["input_ids"].shape == (n, 16) and np.all(after[1]["pack_row"] // n == 1)  # still block 1 of 2
  for b, a in zip(before, after):
    assert sequences(a) == sequences(b)


def test_packing_refuses_formats_it_cannot_pack():
  with pytest.raises(ValueError, match=r"^data.packing applies to the sft, preference and ranked formats, not unpaired$"):
    DataConfig(format="unpaired", packing=True)


def test_shared_prompt_rows_hold_the_prompt_left_padded_then_the_response():
  data = examples(5, 2, seed=3)
  batch = collate_multi(data, BUCKETS, share_prompt=True)
  assert batch["input_ids"].shape == (5, 2, 32) and batch["prompt_mask"].shape == (5, 16)  # P = N = 16
  for b, e in enumerate(data):
    np.testing.assert_array_equal(batch["prompt_mask"][b], np.arange(16) >= 16 - len(e.prompt))
    for c, response in enumerate(e.responses):
      ids, seg, mask = (batch[k][b, c] for k in ("input_ids", "segment_ids", "loss_mask"))
      np.testing.assert_array_equal(ids[16 - len(e.prompt):16 + len(response)], np.concatenate([e.prompt, response]))
      np.testing.assert_array_equal(seg, (np.arange(32) >= 16 - len(e.prompt)) & (np.arange(32) < 16 + len(response)))
      np.testing.assert_array_equal(mask, (np.arange(32) >= 16) & (np.arange(32) < 16 + len(response)))
  # Whole rows when sharing holds more slots: a long prompt and short responses need P + 2N = 32 + 32 slots
  # per pair, whole rows 2 x 32.
  long_prompt = [Encoded(np.arange(6, 24, dtype=np.int32), (np.asarray([7, 8], np.int32),) * 2)]
  assert "prompt_mask" not in collate_multi(long_prompt, BUCKETS, share_prompt=True)


@pytest.mark.parametrize("loss, responses, mesh_shape, wpo", [("dpo", 2, None, False), ("dpo_pl", 3, None, False),
                                                              ("dpo", 2, (2, 2, 1), True)])
def test_shared_prompt_loss_and_gradients_equal_the_padded_batch(loss, responses, mesh_shape, wpo):
  """Statistics (WPO's pair weights too), loss and gradients of the shared-prompt layout equal the padded one's."""
  data = examples(8, responses, seed=4, scored=responses > 2)
  padded, shared = collate_multi(data, BUCKETS), collate_multi(data, BUCKETS, share_prompt=True)
  assert "prompt_mask" in shared
  objective = objective_for("preference", loss, wpo=wpo)
  if mesh_shape:  # 2 pairs per shard: the prompts split over the shards as their rows do
    mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape), jax.devices()[:4])
    padded, shared = (jax.device_put(b, sharding.batch_sharding(mesh, 1)) for b in (padded, shared))
    with sharding.use_mesh(mesh):
      want, got = loss_and_grads(objective, padded), loss_and_grads(objective, shared)
  else:
    want, got = loss_and_grads(objective, padded), loss_and_grads(objective, shared)
  for a, b in zip(got[:3], want[:3]):  # stats, loss, gradients
    assert_close(a, b)
  assert {k: int(v) for k, v in got[3].items()} == {k: int(v) for k, v in want[3].items()}
  if mesh_shape is None:  # each prompt ran once: 8 x 16 + 8 x C x 16 tokens instead of 8 x C x 32
    (graphdef, state), reference = models()
    forward = jax.jit(lambda state, batch: objective.stats(nnx.merge(graphdef, state), reference, batch))
    flops = [forward.lower(state, b).compile().cost_analysis()["flops"] for b in (padded, shared)]
    assert flops[1] < 0.8 * flops[0]
  # The reward model reads each row's last token in either layout.
  reward = objective_for("reward", "bradley_terry")
  graphdef, state = nnx.split(ScalarModel(TINY, rngs=nnx.Rngs(0)))
  stats = jax.jit(lambda state, batch: reward.stats(nnx.merge(graphdef, state), None, batch))
  if responses == 2 and mesh_shape is None:
    assert_close(stats(state, shared), stats(state, padded))


def test_micro_batches_of_both_layouts_stack_in_one():
  shared = [collate_multi(examples(4, 2, seed=s), BUCKETS, share_prompt=True) for s in (5, 6)]
  short = [Encoded(np.asarray([9, 10 + i, 11], np.int32), (np.asarray([7, 8], np.int32), np.asarray([12, i], np.int32)))
           for i in range(4)]
  shared[1] = collate_multi(short, (2, 4, 8, 16, 32), share_prompt=True)  # P = 4, N = 2 (the other's: 16, 16)
  assert shared[1]["prompt_mask"].shape[-1] == 4
  widened = equal_prompt_layouts(shared)
  assert {b["prompt_mask"].shape[-1] for b in widened} == {16}
  np.testing.assert_array_equal(widened[1]["input_ids"][..., 12:], shared[1]["input_ids"])
  assert widened[1]["input_ids"][..., :12].sum() == 0
  objective = objective_for("preference", "dpo")
  assert_close(loss_and_grads(objective, widened[1])[:3], loss_and_grads(objective, shared[1])[:3])
  # A shared batch beside a whole-row one becomes whole rows: exactly the unshared collation.
  whole = collate_multi(examples(4, 2, seed=7), BUCKETS)
  mixed = equal_prompt_layouts([shared[0], whole])
  assert "prompt_mask" not in mixed[0] and mixed[1] is whole
  for key, value in collate_multi(examples(4, 2, seed=5), BUCKETS).items():
    np.testing.assert_array_equal(mixed[0][key], value)
