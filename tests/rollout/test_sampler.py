"""KV-cache sampler: greedy equals full recompute, log-probs equal the training path, filters, EOS, mesh,
shared prefill of a group of samples, log-probs renormalised over the kept set (the logit floor)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxalign import sharding
from jaxalign.algorithms.forward import token_logps
from jaxalign.models import CausalLM, tiny
from jaxalign.rollout import SamplingConfig, generate, left_pad, sample_token, top_k_filter, top_p_filter
from jaxalign.rollout.sampler import first_argmax

V = 50
generate_jit = nnx.jit(generate, static_argnames=("cfg", "group_size"))
NEVER = -1  # an EOS id no sampled token can equal


def prompts(lengths=(3, 7, 5), seed=0):
  """Left-padded prompts of mixed lengths: ids, mask [B, P] int32."""
  rng = np.random.default_rng(seed)
  return left_pad([rng.integers(1, V, size=n).tolist() for n in lengths], pad_id=0)


@nnx.jit
def full_forward(model, ids, mask):
  return model(ids, mask)  # [B, T, V]: no cache, every position recomputed


def naive_greedy(model, ids, mask, n, eos, pad=0):
  """Greedy decoding by re-running the full model on the whole sequence every step.

  The sequence lives in a [B, P + N] buffer whose not-yet-generated tail is masked out (right
  padding, which a causal model cannot see), so the full forward compiles once.
  """
  b, p = ids.shape
  tokens, out_mask = np.full((b, n), pad), np.zeros((b, n), np.int32)
  logps, done = np.zeros((b, n), np.float32), np.zeros(b, bool)
  seq = np.concatenate([ids, np.zeros((b, n), np.int32)], 1)
  seq_mask = np.concatenate([mask, np.zeros((b, n), np.int32)], 1)
  for i in range(n):
    logits = np.asarray(full_forward(model, jnp.asarray(seq), jnp.asarray(seq_mask)))[:, p + i - 1]  # [B, V]
    token = logits.argmax(-1)
    logp = np.asarray(jax.nn.log_softmax(logits))[np.arange(b), token]
    for r in np.flatnonzero(~done):
      tokens[r, i], out_mask[r, i], logps[r, i], done[r] = token[r], 1, logp[r], token[r] in eos
    seq[:, p + i], seq_mask[:, p + i] = token, 1
  return tokens, out_mask, logps, done


def first_new_token(row, start):
  """(token, step) of the first token of `row` at step >= start that it has not emitted before."""
  step = next(j for j in range(start, len(row)) if row[j] not in row[:j])
  return int(row[step]), step


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "gemma2", "gemma3_text", "qwen3_moe"])
def test_greedy_cached_generation_equals_full_recompute_with_early_eos(family):
  model = CausalLM(tiny(family, vocab_size=V), rngs=nnx.Rngs(0))
  ids, mask = prompts()
  n = 8  # prompt + completion > mistral's window of 4
  free_run = naive_greedy(model, ids, mask, n, eos=())[0]
  eos, step = first_new_token(free_run[1], start=2)  # row 1 stops early; other rows where they emit it
  tokens, out_mask, logps, done = naive_greedy(model, ids, mask, n, eos=(eos,))
  assert done[1] and out_mask[1].sum() == step + 1 < n and not done.all()

  cfg = SamplingConfig(max_new_tokens=n, temperature=0.0, eos_token_id=eos, pad_token_id=0)
  rollout = generate_jit(model, ids, mask, jax.random.key(0), cfg)
  np.testing.assert_array_equal(rollout.tokens, tokens)
  np.testing.assert_array_equal(rollout.mask, out_mask)
  np.testing.assert_array_equal(rollout.finished, done)
  np.testing.assert_allclose(rollout.logprobs, logps, atol=1e-5)
  np.testing.assert_array_equal(rollout.prompt_ids, ids)


@functools.partial(nnx.jit, static_argnames="temperature")
def _training_path(model, rollout, temperature):
  batch = {
    "input_ids": jnp.concatenate([rollout.prompt_ids, rollout.tokens], 1),
    "segment_ids": jnp.concatenate([rollout.prompt_mask, rollout.mask], 1),
    "loss_mask": jnp.concatenate([jnp.zeros_like(rollout.prompt_mask), rollout.mask], 1),
  }
  p = rollout.prompt_ids.shape[1]
  logps, loss_mask = token_logps(model, batch, temperature=temperature)  # [B, P + N - 1]
  return logps[:, p - 1:], loss_mask[:, p - 1:]  # completion token j is predicted at P - 1 + j


def training_path_logps(model, rollout, temperature):
  """Completion log-probs [B, N] recomputed on rows [prompt + completion] by the training forward."""
  logps, loss_mask = _training_path(model, rollout, temperature)
  np.testing.assert_array_equal(loss_mask, rollout.mask)
  return logps


@pytest.mark.parametrize("family,temperature,top_k,top_p,renormalize", [
  ("llama", 1.0, 0, 1.0, True), ("qwen2", 0.7, 0, 1.0, True), ("gemma", 0.7, 10, 0.9, False),
  ("gemma2", 0.7, 10, 0.9, False)])  # Gemma 2: the final-logit soft-cap in sampling and training alike
def test_sampled_logprobs_equal_training_path(family, temperature, top_k, top_p, renormalize):
  """Untruncated, or truncated but not renormalised: the full tempered distribution the training path computes."""
  model = CausalLM(tiny(family, vocab_size=V), rngs=nnx.Rngs(1))
  ids, mask = prompts((4, 9, 2, 6), seed=1)
  cfg = SamplingConfig(max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p,
                       eos_token_id=(3, 7, 11, 19), renormalize=renormalize)
  rollout = generate_jit(model, ids, mask, jax.random.key(2), cfg)
  expected = training_path_logps(model, rollout, temperature)
  on = rollout.mask == 1
  np.testing.assert_allclose(np.where(on, rollout.logprobs, 0.0), np.where(on, expected, 0.0), atol=1e-4)
  assert np.all(np.asarray(rollout.logprobs)[~np.asarray(on)] == 0.0)
  assert np.all(np.asarray(rollout.logprobs)[np.asarray(on)] < 0.0)
  assert np.all(np.asarray(rollout.logit_floor) == -np.inf)


def test_bfloat16_model_samples_with_a_bf16_cache_near_the_training_path():
  model = CausalLM(tiny("qwen2", vocab_size=V, param_dtype="bfloat16", dtype="bfloat16"), rngs=nnx.Rngs(1))
  assert model.init_cache(2, 3)["layers"][0]["k"].dtype == jnp.bfloat16
  ids, mask = prompts((4, 9, 2, 6), seed=1)
  rollout = generate_jit(model, ids, mask, jax.random.key(2), SamplingConfig(max_new_tokens=6, temperature=0.7))
  assert rollout.logprobs.dtype == jnp.float32 and rollout.tokens.dtype == jnp.int32
  expected = training_path_logps(model, rollout, 0.7)
  np.testing.assert_allclose(np.where(rollout.mask == 1, rollout.logprobs - expected, 0.0), 0.0, atol=2e-2)


def test_top_k_one_equals_greedy():
  model = CausalLM(tiny("llama", vocab_size=V), rngs=nnx.Rngs(3))
  ids, mask = prompts()
  greedy = generate_jit(model, ids, mask, jax.random.key(0), SamplingConfig(max_new_tokens=6, temperature=0.0))
  top1 = generate_jit(model, ids, mask, jax.random.key(5), SamplingConfig(max_new_tokens=6, top_k=1))
  full = generate_jit(model, ids, mask, jax.random.key(5),
                      SamplingConfig(max_new_tokens=6, top_k=1, renormalize=False))
  for rollout in (top1, full):
    np.testing.assert_array_equal(rollout.tokens, greedy.tokens)
    np.testing.assert_array_equal(rollout.mask, greedy.mask)
  np.testing.assert_allclose(full.logprobs, greedy.logprobs, atol=1e-6)  # both at T = 1
  np.testing.assert_array_equal(top1.logprobs, 0.0)  # the one kept token has probability 1
  on = np.asarray(top1.mask) == 1
  assert np.isfinite(np.asarray(top1.logit_floor)[on]).all() and (np.asarray(top1.logit_floor)[~on] == -np.inf).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
  probs = np.array([[0.05, 0.4, 0.1, 0.3, 0.15], [0.9, 0.02, 0.03, 0.04, 0.01]])
  logits = jnp.log(jnp.asarray(probs))
  kept = lambda p: np.isfinite(np.asarray(top_p_filter(logits, p)))  # noqa: E731
  # Row 0 sorted: 0.4, 0.3, 0.15, 0.1, 0.05 (cumulative 0.4, 0.7, 0.85, 0.95, 1.0).
  np.testing.assert_array_equal(kept(0.7)[0], [False, True, False, True, False])
  np.testing.assert_array_equal(kept(0.71)[0], [False, True, False, True, True])
  np.testing.assert_array_equal(kept(0.1)[0], [False, True, False, False, False])
  # Row 1 sorted: 0.9, 0.04, 0.03, 0.02, 0.01 (cumulative 0.9, 0.94, 0.97, ...).
  np.testing.assert_array_equal(kept(0.95)[1], [True, False, True, True, False])
  np.testing.assert_array_equal(kept(0.5)[1], [True, False, False, False, False])
  np.testing.assert_array_equal(top_p_filter(logits, 1.0), logits)
  kept_values = np.where(kept(0.71), np.asarray(logits), 0.0)
  np.testing.assert_array_equal(np.asarray(top_p_filter(logits, 0.71)), np.where(kept(0.71), kept_values, -np.inf))


def test_top_k_filter_keeps_the_k_largest():
  logits = jnp.array([[0.1, 2.0, -1.0, 3.0, 0.5]])
  np.testing.assert_array_equal(np.isfinite(top_k_filter(logits, 2)), [[False, True, False, True, False]])
  np.testing.assert_array_equal(top_k_filter(logits, 0), logits)
  np.testing.assert_array_equal(top_k_filter(logits, 9), logits)


def test_sample_token_frequencies_follow_the_filtered_tempered_softmax():
  logits = jnp.tile(jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1]])), (20000, 1))
  cfg = SamplingConfig(temperature=0.5, top_k=3)
  sample = jax.jit(sample_token, static_argnames="cfg")
  token, logp, floor = sample(logits, jax.random.key(0), cfg)
  tempered = np.array([0.5, 0.25, 0.15, 0.1]) ** 2
  filtered = np.where(np.arange(4) < 3, tempered, 0) / tempered[:3].sum()
  np.testing.assert_allclose(np.bincount(np.asarray(token), minlength=4) / 20000, filtered, atol=0.01)
  np.testing.assert_allclose(logp, np.log(filtered[:3])[np.asarray(token)], rtol=1e-5)  # the distribution sampled from
  np.testing.assert_allclose(floor, np.log(0.15) / 0.5, rtol=1e-6)  # the third largest tempered logit
  full_token, full_logp, full_floor = sample(logits, jax.random.key(0), dataclasses.replace(cfg, renormalize=False))
  np.testing.assert_array_equal(full_token, token)
  np.testing.assert_allclose(full_logp, np.log(tempered / tempered.sum())[np.asarray(token)], rtol=1e-5)
  np.testing.assert_array_equal(full_floor, -np.inf)


def test_eos_stops_each_row_masks_it_and_pads_after():
  model = CausalLM(tiny("llama", vocab_size=V), rngs=nnx.Rngs(4))
  ids, mask = prompts((2, 6, 4, 5), seed=2)
  cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, eos_token_id=NEVER, pad_token_id=0)
  key = jax.random.key(7)
  free = jax.device_get(generate_jit(model, ids, mask, key, cfg))
  assert free.mask.all() and not free.finished.any()
  eos = int(free.tokens[0, 3])
  stopped = jax.device_get(generate_jit(model, ids, mask, key, SamplingConfig(
    max_new_tokens=10, temperature=1.0, eos_token_id=eos, pad_token_id=0)))
  for row in range(4):
    hits = np.flatnonzero(free.tokens[row] == eos)
    end = hits[0] + 1 if len(hits) else 10  # tokens up to and including the first EOS
    assert stopped.finished[row] == bool(len(hits))
    np.testing.assert_array_equal(stopped.mask[row], np.arange(10) < end)
    np.testing.assert_array_equal(stopped.tokens[row, :end], free.tokens[row, :end])
    np.testing.assert_array_equal(stopped.tokens[row, end:], 0)
    np.testing.assert_allclose(stopped.logprobs[row, :end], free.logprobs[row, :end], atol=1e-6)
    np.testing.assert_array_equal(stopped.logprobs[row, end:], 0.0)
  assert stopped.finished[0] and stopped.mask[0].sum() <= 4


def test_every_row_stopping_at_the_first_token_ends_the_loop():
  model = CausalLM(tiny("llama", vocab_size=V), rngs=nnx.Rngs(0))
  ids, mask = prompts()
  cfg = SamplingConfig(max_new_tokens=5, temperature=0.0, eos_token_id=tuple(range(V)), pad_token_id=0)
  rollout = generate_jit(model, ids, mask, jax.random.key(0), cfg)
  np.testing.assert_array_equal(rollout.mask, np.eye(1, 5, dtype=np.int32).repeat(3, 0))
  np.testing.assert_array_equal(rollout.tokens[:, 1:], 0)
  assert bool(rollout.finished.all())


@pytest.mark.parametrize("group_size", [1, 2])
def test_generate_on_a_mesh_equals_one_device(group_size):
  cfg = tiny("llama", vocab_size=64)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  graphdef, params = nnx.split(sharding.create_sharded(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)), mesh))
  local = jax.device_put(params, jax.devices()[0])
  ids, mask = prompts((3, 7, 5, 1), seed=3)
  sampling = SamplingConfig(max_new_tokens=6, temperature=0.0)

  @jax.jit
  def run(params, ids, mask, key):
    return generate(nnx.merge(graphdef, params), ids, mask, key, sampling, group_size=group_size)

  single = run(local, ids, mask, jax.random.key(0))
  with sharding.use_mesh(mesh):
    batch = jax.device_put((ids, mask), sharding.batch_sharding(mesh, 2))
    sharded = run(params, *batch, jax.random.key(0))
  assert len(sharded.tokens.sharding.device_set) == 8 and sharded.tokens.shape == (4 * group_size, 6)
  assert params["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"][...].sharding.spec == P("fsdp", "tensor")
  np.testing.assert_array_equal(sharded.tokens, single.tokens)
  np.testing.assert_array_equal(sharded.mask, single.mask)
  np.testing.assert_allclose(sharded.logprobs, single.logprobs, atol=1e-5)


def test_sampling_config_errors_name_the_field():
  with pytest.raises(ValueError, match="max_new_tokens"):
    SamplingConfig(max_new_tokens=0)
  with pytest.raises(ValueError, match="temperature"):
    SamplingConfig(temperature=-0.1)
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match="top_k"):
    SamplingConfig(top_k=-1)
  assert SamplingConfig(eos_token_id=[1, 2]).eos_ids == (1, 2)


def log_softmax64(z, kept=None):
  """float64 log softmax of z [..., V] over the entries where `kept` (default: all)."""
  z = np.where(np.ones_like(z, bool) if kept is None else kept, z, -np.inf)
  top = z.max(-1, keepdims=True)
  return z - top - np.log(np.exp(z - top).sum(-1, keepdims=True))


@pytest.mark.parametrize("scan_layers,temperature,top_k,top_p", [
  (False, 0.7, 5, 0.8), (True, 0.7, 5, 0.8), (True, 1.0, 0, 1.0)])
def test_shared_prefill_equals_sampling_the_repeated_prompts(scan_layers, temperature, top_k, top_p):
  model = CausalLM(tiny("llama", vocab_size=V, scan_layers=scan_layers), rngs=nnx.Rngs(2))
  ids, mask = prompts((3, 7, 5), seed=5)
  g, key = 4, jax.random.key(11)
  cfg = SamplingConfig(max_new_tokens=8, temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=(3, 7, 11))
  grouped = jax.device_get(generate_jit(model, ids, mask, key, cfg, group_size=g))
  repeated = jax.device_get(generate_jit(model, np.repeat(ids, g, 0), np.repeat(mask, g, 0), key, cfg))
  np.testing.assert_array_equal(grouped.prompt_ids, np.repeat(ids, g, 0))
  np.testing.assert_array_equal(grouped.prompt_mask, np.repeat(mask, g, 0))
  for name in ("tokens", "mask", "finished"):
    np.testing.assert_array_equal(getattr(grouped, name), getattr(repeated, name), err_msg=name)
  np.testing.assert_allclose(grouped.logprobs, repeated.logprobs, atol=1e-6)
  np.testing.assert_allclose(grouped.logit_floor, repeated.logit_floor, atol=1e-6)  # -inf in the same places
  assert grouped.tokens.shape == (3 * g, 8) and 0 < grouped.mask.sum() < grouped.mask.size  # some rows stop early
  first = grouped.tokens[:, 0].reshape(3, g)
  assert any(len(set(row)) > 1 for row in first)  # the G first tokens are drawn independently


def dot_operand_shapes(fn, *args) -> list[tuple[int, ...]]:
  """Shapes of the operands of every dot_general in fn's jaxpr, nested jaxprs (jit, scan, while) included."""
  shapes = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        shapes.extend(tuple(v.aval.shape) for v in eqn.invars)
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return shapes


@pytest.mark.parametrize("scan_layers", [False, True])
def test_prefill_runs_once_per_distinct_prompt(scan_layers):
  model = CausalLM(tiny("llama", vocab_size=V, scan_layers=scan_layers), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  ids, mask = prompts((3, 7, 5))  # B = 3 prompts, P = 7
  b, p, g = 3, 7, 4
  cfg = SamplingConfig(max_new_tokens=4, top_k=5)  # decode steps see [B*G, 1] queries and S = 10 keys

  def shapes(ids, mask, group_size):
    def run(params, ids, mask):
      return generate(nnx.merge(graphdef, params), ids, mask, jax.random.key(0), cfg, group_size=group_size)

    return dot_operand_shapes(run, params, ids, mask)

  def prefill_rows(shapes):
    """The row counts of the [rows, P, ...] dot operands: only the prefill has P query slots."""
    return {s[0] for s in shapes if len(s) >= 3 and s[1] == p}

  assert prefill_rows(shapes(ids, mask, g)) == {b}
  assert prefill_rows(shapes(np.repeat(ids, g, 0), np.repeat(mask, g, 0), 1)) == {b * g}  # the check can fail


def test_renormalised_logprobs_match_a_float64_recompute_over_the_kept_set():
  model = CausalLM(tiny("qwen2", vocab_size=V), rngs=nnx.Rngs(5))
  ids, mask = prompts((4, 9, 2, 6), seed=4)
  t, n, key = 0.7, 8, jax.random.key(3)
  cfg = SamplingConfig(max_new_tokens=n, temperature=t, top_k=5, top_p=0.8, eos_token_id=(3, 7))
  rollout = jax.device_get(generate_jit(model, ids, mask, key, cfg))
  full = jax.device_get(generate_jit(model, ids, mask, key, dataclasses.replace(cfg, renormalize=False)))
  np.testing.assert_array_equal(full.tokens, rollout.tokens)  # renormalize changes log-probs, not samples
  np.testing.assert_array_equal(full.mask, rollout.mask)

  p, on = ids.shape[1], rollout.mask == 1
  logits = full_forward(model, np.concatenate([ids, rollout.tokens], 1), np.concatenate([mask, rollout.mask], 1))
  z = np.asarray(logits, np.float64)[:, p - 1:-1] / t  # [B, N, V] tempered logits predicting completion token j
  floor = rollout.logit_floor.astype(np.float64)
  assert np.isfinite(floor[on]).all() and (floor[~on] == -np.inf).all()
  assert (full.logit_floor == -np.inf).all()
  kept = z >= floor[..., None] - 1e-5  # the set sampled from (1e-5: cached vs recomputed logits)
  assert (kept.sum(-1)[on] <= 5).all() and (kept.sum(-1)[on] >= 1).all()
  assert (kept.sum(-1)[on] < 5).any()  # top_p (not only top_k) sets some floors
  token_z = np.take_along_axis(z, rollout.tokens[..., None], -1)[..., 0]
  assert (token_z[on] >= floor[on] - 1e-5).all()  # every sampled token is in its kept set
  tokens = rollout.tokens[..., None]
  expected = np.take_along_axis(log_softmax64(z, kept), tokens, -1)[..., 0]
  expected_full = np.take_along_axis(log_softmax64(z), tokens, -1)[..., 0]
  np.testing.assert_allclose(rollout.logprobs[on], expected[on], atol=1e-5)
  np.testing.assert_allclose(full.logprobs[on], expected_full[on], atol=1e-5)
  assert (rollout.logprobs[on] >= full.logprobs[on]).all()  # renormalising over fewer tokens raises each
  assert (rollout.logprobs[on] > full.logprobs[on] + 0.1).any()  # ... by the truncated mass


def test_logit_floor_is_minus_inf_exactly_when_nothing_is_truncated():
  logits = 3.0 * jax.random.normal(jax.random.key(0), (6, V))
  sample = jax.jit(sample_token, static_argnames="cfg")
  untruncated = [SamplingConfig(temperature=0.7), SamplingConfig(temperature=0.7, top_k=V),
                 SamplingConfig(temperature=0.0, top_k=5, top_p=0.5),
                 SamplingConfig(temperature=0.7, top_k=5, top_p=0.5, renormalize=False)]
  for cfg in untruncated:
    token, logp, floor = sample(logits, jax.random.key(1), cfg)
    np.testing.assert_array_equal(floor, -np.inf)
    full = log_softmax64(np.asarray(logits, np.float64) / (cfg.temperature or 1.0))
    np.testing.assert_allclose(logp, full[np.arange(6), np.asarray(token)], atol=1e-5)
  cfg = SamplingConfig(temperature=0.7, top_k=5, top_p=0.5)
  token, logp, floor = sample(logits, jax.random.key(1), cfg)
  # z / T as XLA computes it (x * (1 / T) on CPU: NumPy's x / T differs in the last bit now and then).
  scaled, filtered = jax.device_get(jax.jit(lambda z: (z / 0.7, top_p_filter(top_k_filter(z / 0.7, 5), 0.5)))(logits))
  assert (np.isfinite(filtered).sum(-1) < 5).any()  # top_p truncates further than top_k somewhere
  np.testing.assert_array_equal(scaled >= np.asarray(floor)[:, None], np.isfinite(filtered))  # the same set
  np.testing.assert_allclose(logp, log_softmax64(scaled, np.isfinite(filtered))[np.arange(6), np.asarray(token)],
                             atol=1e-5)


def test_group_size_must_be_a_positive_integer():
  model = CausalLM(tiny("llama", vocab_size=V), rngs=nnx.Rngs(0))
  ids, mask = prompts()
  for bad in (0, 1.5):
    with pytest.raises(ValueError, match="group_size"):
      generate(model, ids, mask, jax.random.key(0), SamplingConfig(), group_size=bad)


def test_first_argmax_is_numpys_argmax_ties_included_and_sampling_is_jax_categorical():
  x = np.random.default_rng(0).integers(0, 4, (64, 9)).astype(np.float32)  # many tied maxima
  np.testing.assert_array_equal(first_argmax(jnp.asarray(x)), np.argmax(x, -1))
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(32, 50)), jnp.float32)
  key = jax.random.key(3)
  token, _, _ = sample_token(logits, key, SamplingConfig(temperature=0.5))
  np.testing.assert_array_equal(token, jax.random.categorical(key, logits / 0.5, axis=-1))
