"""Unit tests of the online algorithm objects (jaxalign/algorithms/online): each piece against a float64 NumPy
reference written here from OBJECTIVES.md §5-§8 (never from the code under test).

Hand-made rollouts: R = 6 rows, G = 3 samples per prompt (2 groups), N = 4 new tokens, P = 3 prompt tokens.
The fake `ctx` objects carry only what the unit under test reads (`.rl`, `.fns.loss_params`, and the methods
it calls).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import losses
from jaxalign.algorithms.forward import loss_targets
from jaxalign.algorithms.online import ALGORITHMS, OnlineFns, RLConfig, Scored
from jaxalign.algorithms.online.base import regularised, token_units
from jaxalign.algorithms.online.grpo import GroupRelative
from jaxalign.algorithms.online.online_dpo import OnlineDPO
from jaxalign.algorithms.online.ppo import PPO
from jaxalign.algorithms.online.reinforce import Reinforce, ReinforcePlusPlus
from jaxalign.algorithms.online.remax import ReMax
from jaxalign.algorithms.online.rft import RFT
from jaxalign.algorithms.online.rloo import RLOO
from jaxalign.algorithms.online.step import _select_groups, shaped_scores, trained_mask
from jaxalign.models import ScalarModel, tiny

R, G, N, P = 6, 3, 4, 3
T = P + N
LENGTHS = (4, 2, 3, 1, 4, 3)  # completion tokens of each row
V = 24  # vocabulary of the token ids below
RTOL, ATOL = 1e-5, 1e-6  # float32 code against float64 references


def make_scored(scores, *, lengths=LENGTHS, seed=0, distinct_prompts=False, mask=None):
  """(Scored of R rows in G-row groups, float64 NumPy copies of its arrays)."""
  rng = np.random.default_rng(seed)
  valid = (np.arange(N)[None] < np.asarray(lengths)[:, None]).astype(np.float32)  # [R, N] the rows' tokens
  mask = valid if mask is None else np.asarray(mask, np.float32)  # [R, N] tokens that train
  old = -rng.uniform(0.1, 3.0, (R, N)).astype(np.float32)
  ref = (old + rng.normal(0.0, 0.4, (R, N))).astype(np.float32)
  sampler = (old + rng.normal(0.0, 0.6, (R, N))).astype(np.float32)
  if distinct_prompts:  # every row its own prompt ids: shows which rows a callee read
    prompt_ids = rng.integers(3, V, (R, P))
  else:
    prompt_ids = np.repeat(rng.integers(3, V, (R // G, P)), G, axis=0)
  prompt_mask = np.ones((R, P), np.int32)
  prompt_mask[1, 0] = 0  # one left-padded prompt
  prompt_ids = np.where(prompt_mask > 0, prompt_ids, 0).astype(np.int32)
  tokens = np.where(valid > 0, rng.integers(3, V, (R, N)), 0).astype(np.int32)
  rows = {"input_ids": jnp.asarray(np.concatenate([prompt_ids, tokens], 1)),
          "loss_mask": jnp.asarray(np.concatenate([np.zeros_like(prompt_mask), valid.astype(np.int32)], 1)),
          "segment_ids": jnp.asarray(np.concatenate([prompt_mask, valid.astype(np.int32)], 1))}
  rollout = types.SimpleNamespace(prompt_ids=jnp.asarray(prompt_ids), prompt_mask=jnp.asarray(prompt_mask),
                                  tokens=jnp.asarray(tokens), mask=jnp.asarray(valid),
                                  logprobs=jnp.asarray(sampler))
  uid = np.arange(R) + 100 if distinct_prompts else np.repeat(np.arange(R // G) + 100, G)
  scores = np.asarray(scores, np.float32)
  s = Scored(rollout=rollout, rows=rows, floor=None, uid=jnp.asarray(uid), scores=jnp.asarray(scores),
             old=jnp.asarray(old), ref=jnp.asarray(ref), mask=jnp.asarray(mask),
             group_ids=jnp.repeat(jnp.arange(R // G), G), num_groups=R // G)
  ref64 = types.SimpleNamespace(scores=scores.astype(np.float64), old=old.astype(np.float64),
                                ref=ref.astype(np.float64), sampler=sampler.astype(np.float64),
                                mask=mask.astype(np.float64), rows={k: np.asarray(v) for k, v in rows.items()},
                                prompt_ids=prompt_ids, prompt_mask=prompt_mask, uid=uid)
  return s, ref64


def fake_ctx(loss_params=None, **rl):
  return types.SimpleNamespace(rl=RLConfig(group_size=G, max_new_tokens=N, **rl),
                               fns=types.SimpleNamespace(loss_params=dict(loss_params or {})))


def whiten64(x, mask, ddof=1, eps=1e-8):
  vals = x[mask > 0]
  out = (x - vals.mean()) / np.sqrt(vals.var(ddof=ddof) + eps)
  return np.where(mask > 0, out, 0.0)


def kl_k1_sum64(old, ref, mask):
  """Sequence KL k1: sum over the mask of (old - ref), [R]."""
  return ((old - ref) * mask).sum(-1)


# --- 1. token_units: truncated importance weight (TIS) ------------------------------------------------------


def test_token_units_weights_advantages_by_the_capped_sampler_ratio_per_token():
  s, x = make_scored(np.zeros(R), seed=1)
  cap = 1.5
  ratio = np.exp(x.old - x.sampler)
  assert (ratio[x.mask > 0] > cap).any() and (ratio[x.mask > 0] < cap).any()  # the cap binds on some tokens only
  weight = np.minimum(ratio, cap) * x.mask
  rl = RLConfig(group_size=G, max_new_tokens=N, is_cap=cap)

  adv = np.linspace(-1.0, 1.5, R)  # per sequence [R]
  units = token_units(rl, s, jnp.asarray(adv, jnp.float32))
  assert units.adv.shape == (R, N)
  np.testing.assert_allclose(units.adv, adv[:, None] * weight, rtol=RTOL, atol=ATOL)
  assert np.all(np.asarray(units.adv)[x.mask == 0] == 0.0)  # off the mask: exactly 0

  token_adv = np.random.default_rng(2).normal(size=(R, N))  # per token [R, N] (PPO, REINFORCE++)
  units = token_units(rl, s, jnp.asarray(token_adv, jnp.float32))
  np.testing.assert_allclose(units.adv, token_adv * weight, rtol=RTOL, atol=ATOL)
  # Everything else passes through.
  assert units.rows is s.rows and units.mask is s.mask and units.old is s.old and units.ref is s.ref
  assert units.floor is None


def test_token_units_importance_weight_is_detached():
  s, x = make_scored(np.zeros(R), seed=1)
  rl = RLConfig(group_size=G, max_new_tokens=N, is_cap=1.5)
  adv = jnp.asarray(np.linspace(-1.0, 1.5, R), jnp.float32)

  def total(old, sampler, adv):
    scored = s._replace(old=old, rollout=types.SimpleNamespace(logprobs=sampler))
    return jnp.sum(token_units(rl, scored, adv).adv)

  d_old, d_sampler, d_adv = jax.grad(total, argnums=(0, 1, 2))(s.old, s.rollout.logprobs, adv)
  assert np.all(np.asarray(d_old) == 0.0) and np.all(np.asarray(d_sampler) == 0.0)
  # Through the advantages the weight is a constant factor: d sum(A w) / dA_i = sum_t w_it.
  weight = np.minimum(np.exp(x.old - x.sampler), 1.5) * x.mask
  np.testing.assert_allclose(d_adv, weight.sum(-1), rtol=RTOL, atol=ATOL)


def test_token_units_without_is_cap_pass_the_advantages_through():
  s, _ = make_scored(np.zeros(R), seed=1)
  adv = jnp.asarray(np.linspace(-1.0, 1.5, R), jnp.float32)
  units = token_units(RLConfig(group_size=G, max_new_tokens=N), s, adv)
  assert units.adv.shape == (R,)
  np.testing.assert_array_equal(units.adv, adv)


# --- 2. Online DPO -------------------------------------------------------------------------------------------


def unigram_ctx(**rl):
  """Fake ctx whose `completion_logps` is a differentiable unigram model: lp(token) = log_softmax(w)[token] at
  the N completion positions, and the mask the real pass returns: the rows' own loss mask (`loss_targets`)."""
  ctx = fake_ctx(**rl)

  def completion_logps(w, rows, floor, *, entropy=False):
    assert floor is None  # online DPO fits the model's full distribution
    targets, mask = loss_targets(rows)
    targets, mask = targets[:, -N:], mask[:, -N:]
    logps = jnp.where(mask > 0, jax.nn.log_softmax(w)[jnp.maximum(targets, 0)], 0.0)
    return logps, mask, None

  ctx.completion_logps = completion_logps
  return ctx


def unigram_logps64(w, rows):
  """Per-row completion log-probs [R, N] of the unigram model (0 off the rows' completion tokens)."""
  w = np.asarray(w, np.float64)
  lsm = w - np.log(np.exp(w - w.max()).sum()) - w.max()
  tokens, valid = rows["input_ids"][:, -N:], rows["loss_mask"][:, -N:]
  return np.where(valid > 0, lsm[tokens], 0.0)


def test_online_dpo_pairs_best_and_worst_of_each_group():
  scores = [0.3, 0.9, 0.1,  # distinct: chosen row 1, rejected row 2
            0.5, 0.5, 0.5]  # all equal: row 3 paired with itself
  s, x = make_scored(scores, seed=3)
  units, metrics = OnlineDPO().units(fake_ctx(), None, None, s, None)
  best, worst = np.array([1, 3]), np.array([2, 3])
  for key in ("input_ids", "loss_mask", "segment_ids"):
    np.testing.assert_array_equal(units.chosen[key], x.rows[key][best])
    np.testing.assert_array_equal(units.rejected[key], x.rows[key][worst])
  ref_sums, counts = (x.ref * x.mask).sum(-1), x.mask.sum(-1)
  np.testing.assert_allclose(units.ref_chosen, ref_sums[best], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(units.ref_rejected, ref_sums[worst], rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(units.n_chosen, counts[best])
  np.testing.assert_array_equal(units.n_rejected, counts[worst])
  np.testing.assert_allclose(metrics["online_dpo/distinct_fraction"], 0.5)


def test_online_dpo_first_maximum_and_minimum_break_ties_and_distinct_fraction_counts_groups():
  scores = [0.9, 0.2, 0.9,  # best: the first maximum (row 0); worst row 1
            0.4, 0.1, 0.1]  # best row 3; worst: the first minimum (row 4)
  s, x = make_scored(scores, seed=4)
  units, metrics = OnlineDPO().units(fake_ctx(), None, None, s, None)
  np.testing.assert_array_equal(units.chosen["input_ids"], x.rows["input_ids"][[0, 3]])
  np.testing.assert_array_equal(units.rejected["input_ids"], x.rows["input_ids"][[1, 4]])
  np.testing.assert_allclose(metrics["online_dpo/distinct_fraction"], 1.0)
  s, _ = make_scored([0.2] * 6, seed=4)
  assert float(OnlineDPO().units(fake_ctx(), None, None, s, None)[1]["online_dpo/distinct_fraction"]) == 0.0


def test_online_dpo_tied_group_gives_margin_zero_and_exactly_zero_gradient():
  scores = [0.3, 0.9, 0.1, 0.5, 0.5, 0.5]
  s, x = make_scored(scores, seed=3)
  ctx, alg = unigram_ctx(), OnlineDPO()
  units, _ = alg.units(ctx, None, None, s, None)
  w = jnp.asarray(np.random.default_rng(5).normal(size=V), jnp.float32)

  def loss(w, unit):
    stats = alg.stats(ctx, w, None, unit)
    return alg.loss_fn(ctx, stats, alg.counts(ctx, stats, unit.n_chosen.shape[0]))[0]

  # Both pairs against the DPO formula (beta 0.1 by default): L = mean -log sigmoid(beta (l_w - l_l)).
  lp = unigram_logps64(w, x.rows).sum(-1)
  ref_sums = (x.ref * x.mask).sum(-1)
  h = (lp[[1, 3]] - ref_sums[[1, 3]]) - (lp[[2, 3]] - ref_sums[[2, 3]])
  assert h[1] == 0.0 and abs(h[0]) > 0.1
  np.testing.assert_allclose(loss(w, units), np.mean(np.log1p(np.exp(-0.1 * h))), rtol=RTOL, atol=ATOL)

  tie = jax.tree.map(lambda a: a[1:], units)
  stats = alg.stats(ctx, w, None, tie)
  np.testing.assert_array_equal(stats.policy_chosen, stats.policy_rejected)
  np.testing.assert_array_equal(stats.ref_chosen, stats.ref_rejected)
  np.testing.assert_allclose(loss(w, tie), np.log(2.0), rtol=RTOL)  # -log sigmoid(0)
  assert np.all(np.asarray(jax.grad(loss)(w, tie)) == 0.0)  # exactly: chosen and rejected cancel
  distinct = jax.tree.map(lambda a: a[:1], units)
  assert float(jnp.max(jnp.abs(jax.grad(loss)(w, distinct)))) > 1e-3  # the distinct pair does train


def test_online_dpo_policy_and_reference_sums_cover_the_same_tokens_when_truncated_completions_are_masked():
  """rl.mask_truncated_completions zeroes Scored.mask on rows without EOS. Online DPO sums the reference over
  Scored.mask but the policy over the row's own loss mask (what `completion_logps` returns), so a masked row
  gets a policy sum over all its tokens against a reference sum of 0. At the reference policy every DPO
  log-ratio l = S - S_ref must be 0."""
  scores = [0.3, 0.9, 0.1, 0.5, 0.5, 0.5]
  finished = np.array([1, 0, 1, 1, 1, 1], np.float32)  # row 1 (chosen of group 0) was truncated
  valid = (np.arange(N)[None] < np.asarray(LENGTHS)[:, None]).astype(np.float32)
  s, x = make_scored(scores, seed=3, mask=valid * finished[:, None])
  ctx, alg = unigram_ctx(mask_truncated_completions=True), OnlineDPO()
  w = jnp.asarray(np.random.default_rng(5).normal(size=V), jnp.float32)
  s = s._replace(ref=jnp.asarray(unigram_logps64(w, x.rows), jnp.float32))  # the reference = the policy
  units, _ = alg.units(ctx, None, None, s, None)
  stats = alg.stats(ctx, w, None, units)
  np.testing.assert_allclose(stats.policy_chosen - stats.ref_chosen, 0.0, atol=1e-5)
  np.testing.assert_allclose(stats.policy_rejected - stats.ref_rejected, 0.0, atol=1e-5)


# --- 3. RFT ---------------------------------------------------------------------------------------------------


def test_rft_keeps_each_groups_best_row_at_or_above_the_threshold():
  scores = [0.2, 0.5, 0.5,  # best row 1 (first maximum), reward == threshold: kept
            0.4, 0.49, 0.1]  # best row 4, below the threshold: its mask is all zero
  s, x = make_scored(scores, seed=6)
  units, metrics = RFT().units(fake_ctx(rft_threshold=0.5), None, None, s, None)
  for key in ("input_ids", "loss_mask", "segment_ids"):
    np.testing.assert_array_equal(units.rows[key], x.rows[key][[1, 4]])
  np.testing.assert_array_equal(units.mask, np.stack([x.mask[1], np.zeros(N)]))
  np.testing.assert_allclose(units.ref, x.ref[[1, 4]], rtol=RTOL)
  assert units.floor is None and units.adv is None
  np.testing.assert_allclose(metrics["rft/accept_rate"], 0.5)

  above = float(np.nextafter(np.float32(0.5), np.float32(1.0)))  # just above: the boundary row is rejected
  units, metrics = RFT().units(fake_ctx(rft_threshold=above), None, None, s, None)
  assert np.all(np.asarray(units.mask) == 0.0) and float(metrics["rft/accept_rate"]) == 0.0
  units, metrics = RFT().units(fake_ctx(rft_threshold=0.4), None, None, s, None)
  np.testing.assert_array_equal(units.mask, x.mask[[1, 4]])
  np.testing.assert_allclose(metrics["rft/accept_rate"], 1.0)


# --- 4. ReMax ------------------------------------------------------------------------------------------------


class GreedyRecorder:
  """Fake `greedy_scores`: records what it was given and returns known rewards, one per prompt."""

  def __init__(self, values):
    self.values, self.calls = values, []

  def __call__(self, state, frozen, prompts):
    self.calls.append((state, frozen, {k: np.asarray(v) for k, v in prompts.items()}))
    return jnp.asarray(self.values, jnp.float32)


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_remax_baseline_is_the_greedy_reward_of_each_prompt(kl_coef):
  scores = [1.0, 0.5, 0.0, 0.3, 0.8, 0.2]
  s, x = make_scored(scores, seed=7, distinct_prompts=True)
  greedy = np.array([0.6, -0.25])
  ctx = fake_ctx(kl_coef=kl_coef)
  ctx.greedy_scores = GreedyRecorder(greedy)
  state, frozen = object(), object()
  adv, metrics = ReMax().advantages(ctx, state, frozen, s, None)

  assert len(ctx.greedy_scores.calls) == 1
  got_state, got_frozen, prompts = ctx.greedy_scores.calls[0]
  assert got_state is state and got_frozen is frozen
  first = np.arange(0, R, G)  # one row per group: 0, G, 2G, ...
  np.testing.assert_array_equal(prompts["prompt_ids"], x.prompt_ids[first])
  np.testing.assert_array_equal(prompts["prompt_mask"], x.prompt_mask[first])
  np.testing.assert_array_equal(prompts["uid"], x.uid[first])

  rewards = x.scores - kl_coef * kl_k1_sum64(x.old, x.ref, x.mask)  # §7 KL-penalised reward (k1)
  np.testing.assert_allclose(adv, rewards - np.repeat(greedy, G), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(metrics["remax/greedy_reward"], greedy.mean(), rtol=RTOL)


def test_remax_worked_example_of_objectives_7_3():
  s, _ = make_scored([1.0, 0.5, 0.0, 0.3, 0.3, 0.3])
  s = s._replace(scores=s.scores[:4], old=s.old[:4], ref=s.ref[:4], mask=s.mask[:4],
                 rollout=types.SimpleNamespace(prompt_ids=s.rollout.prompt_ids[:4],
                                               prompt_mask=s.rollout.prompt_mask[:4]), uid=s.uid[:4])
  ctx = types.SimpleNamespace(rl=RLConfig(group_size=4, max_new_tokens=N), greedy_scores=GreedyRecorder([0.6]))
  adv, _ = ReMax().advantages(ctx, None, None, s, None)
  np.testing.assert_allclose(adv, [0.4, -0.1, -0.6, -0.3], rtol=RTOL, atol=ATOL)


# --- 5. The critic -------------------------------------------------------------------------------------------

TINY = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
        "num_kv_heads": 2, "max_position_embeddings": 32, "remat": "none"}


def test_critic_values_are_read_at_the_position_before_each_completion_token():
  model = ScalarModel(tiny("llama", **TINY), rngs=nnx.Rngs(3))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  ctx = OnlineFns(fns=None, algorithm=PPO(), rl=RLConfig(group_size=G, max_new_tokens=N), sampling=None,
                  reward=None, uses_reference=False, critic=graphdef)
  s, x = make_scored(np.zeros(R), lengths=(4,) * R, seed=8)
  rows = s.rows
  critic = jax.jit(ctx.values)
  values = critic(params, rows)
  assert values.shape == (R, N)
  model_fn = jax.jit(lambda p, r: nnx.merge(graphdef, p)(r["input_ids"], segment_ids=r["segment_ids"]))
  full = np.asarray(model_fn(params, rows))  # [R, T] V at every position
  np.testing.assert_allclose(values, full[:, P - 1:P + N - 1], rtol=RTOL, atol=ATOL)

  # V(s_t) is the state before completion token t: it cannot see token t itself. Changing the last completion
  # token changes none of the values; changing the first one keeps V(s_0) and changes V(s_1).
  def with_token(pos, delta):
    ids = x.rows["input_ids"].copy()
    ids[:, pos] = (ids[:, pos] - 3 + delta) % (V - 3) + 3
    return {**rows, "input_ids": jnp.asarray(ids)}

  np.testing.assert_array_equal(critic(params, with_token(T - 1, 5)), values)
  changed = np.asarray(critic(params, with_token(P, 5)))
  np.testing.assert_array_equal(changed[:, 0], np.asarray(values)[:, 0])
  assert np.all(np.abs(changed[:, 1] - np.asarray(values)[:, 1]) > 0)


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
  from jaxalign.config import TrainConfig, from_dict
  from jaxalign.trainer import build_run

  tmp = tmp_path_factory.mktemp("ppo")
  cfg = {
    "algorithm": "ppo", "model": TINY, "tokenizer": "builtin:digits", "steps": 2, "run_dir": str(tmp / "run"),
    "data": {"format": "prompt", "train": ["synthetic:max"], "synthetic_size": [64, 16], "max_length": 20,
             "max_prompt_length": 12, "batch_size": 8},
    "rl": {"group_size": 4, "max_new_tokens": 3, "rewards": {"max_digit": 1.0}, "rft_threshold": 1.0},
    "optim": {"lr": 3e-3}, "eval_batches": 1, "log": {"every": 1, "progress": False, "tensorboard": False},
    "checkpoint": {"export_hf": False}, "mesh": {"fsdp": 1},
  }
  return build_run(from_dict(TrainConfig, cfg))


def _buffers(x):
  return {shard.data.unsafe_buffer_pointer() for shard in x.addressable_shards}


def test_ppo_critic_starts_from_the_policy_backbone_with_a_zero_head(ppo_run):
  trainable = ppo_run.state.trainable
  assert set(trainable) == {"policy", "value"}
  value, policy = trainable["value"], trainable["policy"]
  assert set(value) == {"model", "score"}
  assert jax.tree.structure(value["model"]) == jax.tree.structure(policy["model"])
  for v, p in zip(jax.tree.leaves(value["model"]), jax.tree.leaves(policy["model"])):
    assert v is not p and v.shape == p.shape and v.dtype == p.dtype
    np.testing.assert_array_equal(np.asarray(v), np.asarray(p))
    assert not _buffers(v) & _buffers(p)  # a copy: the step donates the trainable, and the critic trains apart
  head = jax.tree.leaves(value["score"])
  assert head and all(np.all(np.asarray(h) == 0.0) for h in head)
  assert ppo_run.policy_params() is policy
  # The optimiser state covers both.
  assert any("value" in jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(
      ppo_run.state.opt_state))


# --- 6. Registry ---------------------------------------------------------------------------------------------


def test_every_algorithm_has_a_registered_loss():
  assert set(ALGORITHMS) == {"ppo", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "luspo", "sapo", "vespo", "rloo",
                             "remax", "reinforce", "reinforce_pp", "online_dpo", "rft", "rkl", "spin", "pmle",
                             "preference_distillation"}
  for name, alg in ALGORITHMS.items():
    assert callable(losses.get(alg.loss)), name
  assert {name: alg.loss for name, alg in ALGORITHMS.items()} == {
      "ppo": "ppo", "grpo": "grpo", "dr_grpo": "dr_grpo", "dapo": "dapo", "gspo": "gspo", "cispo": "cispo",
      "luspo": "luspo", "sapo": "sapo", "vespo": "vespo", "rloo": "rloo", "remax": "reinforce",
      "reinforce": "reinforce", "reinforce_pp": "reinforce_pp", "online_dpo": "dpo", "rft": "sft", "rkl": "rkl",
      "spin": "dpo", "pmle": "pmle", "preference_distillation": "preference_distillation"}
  # What each trains on: prompts alone, or a dataset's demonstrations / pairs beside samples of their prompts.
  assert {name: alg.data_format for name, alg in ALGORITHMS.items() if alg.data_format != "prompt"} == {
      "spin": "sft", "pmle": "preference", "preference_distillation": "preference"}


def uses_reference(name, loss_params=None, **rl):
  return ALGORITHMS[name].uses_reference(RLConfig(**rl), dict(loss_params or {}))


def test_uses_reference_is_explicit_for_each_algorithm():
  # GRPO's loss carries beta = 0.04 by default (DeepSeekMath): the reference runs.
  assert uses_reference("grpo")
  assert not uses_reference("grpo", {"beta": 0.0})
  # Dr. GRPO, DAPO, GSPO, CISPO: beta 0 by default.
  for name in ("dr_grpo", "dapo", "gspo", "cispo"):
    assert not uses_reference(name), name
    assert uses_reference(name, {"beta": 0.01}), name
    assert uses_reference(name, kl_loss_coef=0.1), name
    assert not uses_reference(name, kl_coef=0.1), name  # kl_coef shapes rewards; not theirs
  # KL in the reward: only with rl.kl_coef > 0 (or a KL loss term).
  for name in ("rloo", "remax", "reinforce", "reinforce_pp", "ppo"):
    assert not uses_reference(name), name
    assert uses_reference(name, kl_coef=0.05), name
    assert uses_reference(name, kl_loss_coef=0.05), name
  assert uses_reference("online_dpo")  # the DPO loss is relative to the reference
  assert not uses_reference("rft") and uses_reference("rft", kl_loss_coef=0.1)
  assert uses_reference("spin", reference_update_steps=10)  # SPIN's DPO loss, relative to the last iterate
  # Yun et al.'s objectives: the reference serves their on-policy KL term, beta x KL (pmle 1e-5, distillation 0.05).
  for name in ("pmle", "preference_distillation"):
    assert uses_reference(name) and not uses_reference(name, {"beta": 0.0}), name


def test_only_the_ppo_family_has_a_critic_and_only_policy_gradients_replay_the_sampling_mask():
  assert {name for name, alg in ALGORITHMS.items() if alg.critic} == {"ppo", "rkl"}  # RKL is PPO with an entropy term
  assert {name for name, alg in ALGORITHMS.items() if not alg.replays_sampling_mask} == {
      "online_dpo", "rft", "spin", "pmle", "preference_distillation"}
  tree = {"policy": {"a": 1}, "value": {"b": 2}}
  assert ALGORITHMS["ppo"].policy_params(tree) is tree["policy"]
  assert ALGORITHMS["grpo"].policy_params(tree) is tree


# --- 7. Advantage estimators ---------------------------------------------------------------------------------

GRPO_SCORES = [1.0, 0.0, 0.5,  # a group with spread
               0.2, 0.2, 0.2]  # a tied group: A = 0


def grpo_reference(scores, scale):
  r = np.asarray(scores, np.float64).reshape(-1, G)
  centered = r - r.mean(1, keepdims=True)
  if scale == "group":
    centered = centered / (r.std(1, ddof=1, keepdims=True) + 1e-4)  # TRL: ddof 1, eps 1e-4 (§6.1)
  return centered.reshape(-1)


@pytest.mark.parametrize("name,scale", [("grpo", "group"), ("dapo", "group"), ("dr_grpo", "none")])
def test_group_relative_advantages(name, scale):
  s, _ = make_scored(GRPO_SCORES)
  adv, metrics = ALGORITHMS[name].advantages(fake_ctx(), None, None, s, None)
  np.testing.assert_allclose(adv, grpo_reference(GRPO_SCORES, scale), rtol=RTOL, atol=ATOL)
  assert np.all(np.asarray(adv)[3:] == 0.0) and metrics == {}
  assert adv.shape == (R,)


def test_group_relative_advantages_worked_example_of_objectives_6_4():
  s, _ = make_scored([1, 0, 0, 1, 0.5, 0.5])
  s = s._replace(scores=s.scores[:4], group_ids=jnp.zeros(4, jnp.int32), num_groups=1)
  adv, _ = GroupRelative("grpo").advantages(fake_ctx(), None, None, s, None)
  np.testing.assert_allclose(adv, [0.865875, -0.865875, -0.865875, 0.865875], rtol=1e-5)
  adv, _ = GroupRelative("dr_grpo", scale="none").advantages(fake_ctx(), None, None, s, None)
  np.testing.assert_allclose(adv, [0.5, -0.5, -0.5, 0.5], rtol=1e-6)


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_rloo_leave_one_out_baseline(kl_coef):
  scores = [1.0, 0.5, 0.0, 0.3, 0.9, 0.6]
  s, x = make_scored(scores, seed=9)
  adv, _ = RLOO().advantages(fake_ctx(kl_coef=kl_coef), None, None, s, None)
  rewards = (x.scores - kl_coef * kl_k1_sum64(x.old, x.ref, x.mask)).reshape(-1, G)
  baseline = (rewards.sum(1, keepdims=True) - rewards) / (G - 1)  # mean of the other samples (§7.2)
  np.testing.assert_allclose(adv, (rewards - baseline).reshape(-1), rtol=RTOL, atol=ATOL)


def test_rloo_normalised_advantages_divide_by_std_plus_1e_4_as_trl():
  scores = [1.0, 0.5, 0.0, 0.3, 0.9, 0.6]
  s, _ = make_scored(scores, seed=9)
  plain, _ = RLOO().advantages(fake_ctx(), None, None, s, None)
  normalised, _ = RLOO().advantages(fake_ctx(normalize_advantages=True), None, None, s, None)
  a = np.asarray(plain, np.float64)  # TRL: (a - mean) / (std (Bessel) + 1e-4) over the rows
  np.testing.assert_allclose(normalised, (a - a.mean()) / (a.std(ddof=1) + 1e-4), rtol=RTOL, atol=ATOL)
  with pytest.raises(ValueError, match="rl.normalize_advantages applies to rloo"):
    ALGORITHMS["grpo"].check(RLConfig(normalize_advantages=True), {}, 4)
  RLOO().check(RLConfig(normalize_advantages=True), {}, 4)


def test_rloo_worked_example_of_objectives_7_2():
  s, _ = make_scored(np.zeros(R))
  s = s._replace(scores=jnp.asarray([1.0, 0.5, 0.0, 0.3]), group_ids=jnp.zeros(4, jnp.int32), num_groups=1)
  adv, _ = RLOO().advantages(fake_ctx(), None, None, s, None)
  np.testing.assert_allclose(adv, [0.733333, 0.066667, -0.6, -0.2], rtol=1e-5)


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_reinforce_advantage_is_the_kl_penalised_reward_without_a_baseline(kl_coef):
  """README's algorithm table: `reinforce` has no baseline, A_i = R_i = score_i - kl_coef * sum_t m (old - ref).
  (reinforce.py's docstring says "with a batch-mean baseline": it disagrees with the README and the code.)"""
  scores = [1.0, 0.5, 0.0, 0.3, 0.9, 0.6]
  s, x = make_scored(scores, seed=9)
  adv, _ = Reinforce().advantages(fake_ctx(kl_coef=kl_coef), None, None, s, None)
  np.testing.assert_allclose(adv, x.scores - kl_coef * kl_k1_sum64(x.old, x.ref, x.mask), rtol=RTOL, atol=ATOL)


def reinforce_pp_reference(scores, old, ref, mask, beta):
  """§7.4: r_t = -beta k1_t on valid tokens, score added at the last valid token, return-to-go G_t (gamma 1),
  whitened over all valid tokens of the batch (ddof 1)."""
  rewards = -beta * (old - ref) * mask
  last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
  rewards[np.arange(len(scores)), last] += scores
  returns = np.flip(np.cumsum(np.flip(rewards, 1), 1), 1)
  return whiten64(returns, mask)


@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_reinforce_pp_whitened_return_to_go(kl_coef):
  scores = [1.0, 0.5, 0.0, 0.3, 0.9, 0.6]
  s, x = make_scored(scores, seed=10)
  adv, metrics = ReinforcePlusPlus().advantages(fake_ctx(kl_coef=kl_coef), None, None, s, None)
  assert adv.shape == (R, N)
  np.testing.assert_allclose(adv, reinforce_pp_reference(x.scores, x.old, x.ref, x.mask, kl_coef),
                             rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(adv)[x.mask == 0] == 0.0)
  np.testing.assert_allclose(metrics["objective/kl"], kl_k1_sum64(x.old, x.ref, x.mask).mean(), rtol=RTOL)


def test_reinforce_pp_worked_example_of_objectives_7_4():
  s, _ = make_scored(np.zeros(R))
  old = jnp.asarray([[-1.0, -0.5, -2.0], [-0.3, -0.2, 0.0]])
  ref = jnp.asarray([[-1.1, -0.7, -1.5], [-0.2, -0.2, 0.0]])
  mask = jnp.asarray([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
  s = s._replace(scores=jnp.asarray([1.0, 0.2]), old=old, ref=ref, mask=mask)
  adv, _ = ReinforcePlusPlus().advantages(fake_ctx(kl_coef=0.01), None, None, s, None)
  np.testing.assert_allclose(adv, [[0.727262, 0.729536, 0.734084], [-1.094304, -1.096579, 0.0]], atol=2e-6)


# --- 8. regularised: entropy bonus and KL loss term ----------------------------------------------------------


def token_stats(seed=11):
  rng = np.random.default_rng(seed)
  mask = (np.arange(N)[None] < np.asarray(LENGTHS)[:, None]).astype(np.float64)
  logps = -rng.uniform(0.1, 3.0, (R, N))
  ref = logps + rng.normal(0.0, 0.5, (R, N))
  entropy = rng.uniform(0.5, 3.0, (R, N))
  stats = losses.TokenBatch(logps=jnp.asarray(logps, jnp.float32), mask=jnp.asarray(mask, jnp.float32),
                            ref_logps=jnp.asarray(ref, jnp.float32), entropy=jnp.asarray(entropy, jnp.float32))
  return stats, types.SimpleNamespace(logps=logps, ref=ref, entropy=entropy, mask=mask)


def rl_config(**kw):
  return RLConfig(group_size=G, max_new_tokens=N, **kw)


def test_regularised_is_the_identity_without_coefficients():
  stats, _ = token_stats()
  loss, metrics = regularised(rl_config(), stats, jnp.float32(0.7), {"a": 1.0})
  assert float(loss) == pytest.approx(0.7) and metrics == {"a": 1.0}


def test_entropy_bonus_subtracts_coef_times_token_mean_entropy_and_pushes_entropy_up():
  stats, x = token_stats()
  coef = 0.03
  token_mean = (x.entropy * x.mask).sum() / x.mask.sum()
  loss, metrics = regularised(rl_config(entropy_coef=coef), stats, jnp.float32(0.7), {})
  np.testing.assert_allclose(loss, 0.7 - coef * token_mean, rtol=RTOL)
  np.testing.assert_allclose(metrics["entropy"], token_mean, rtol=RTOL)
  grad = jax.grad(lambda h: regularised(rl_config(entropy_coef=coef), stats._replace(entropy=h), 0.0, {})[0])(
      stats.entropy)
  # dL/dH_t = -coef m_t / sum m: a descent step raises the entropy of every trained token, none other.
  np.testing.assert_allclose(grad, -coef * x.mask / x.mask.sum(), rtol=RTOL, atol=1e-9)


@pytest.mark.parametrize("estimator", ["k3", "k2", "k1"])
def test_kl_loss_term_adds_coef_times_the_sequence_kl_to_the_reference(estimator):
  stats, x = token_stats()
  coef = 0.2
  d = x.logps - x.ref  # §1.4: d = lp - lp_ref
  k = {"k1": d, "k2": 0.5 * d ** 2, "k3": np.exp(-d) - 1.0 + d}[estimator]
  dk = {"k1": np.ones_like(d), "k2": d, "k3": 1.0 - np.exp(-d)}[estimator]
  kl = (k * x.mask).sum(-1).mean()  # kl_penalty: mean over sequences of sum_t m k_t
  rl = rl_config(kl_loss_coef=coef, kl_loss_estimator=estimator)
  loss, metrics = regularised(rl, stats, jnp.float32(0.7), {})
  np.testing.assert_allclose(loss, 0.7 + coef * kl, rtol=RTOL)
  np.testing.assert_allclose(metrics["kl_loss"], kl, rtol=RTOL)
  grad = jax.grad(lambda lp: regularised(rl, stats._replace(logps=lp), 0.0, {})[0])(stats.logps)
  np.testing.assert_allclose(grad, coef * dk * x.mask / R, rtol=1e-4, atol=1e-7)


def test_token_algorithms_apply_the_regularisers_to_their_loss():
  stats, x = token_stats()
  stats = stats._replace(old_logps=stats.logps, advantages=jnp.asarray(np.linspace(-1, 1, R), jnp.float32))
  coef = 0.05
  token_mean = (x.entropy * x.mask).sum() / x.mask.sum()
  for name in ("grpo", "dr_grpo", "rloo", "reinforce_pp", "rft"):
    alg = ALGORITHMS[name]
    plain, with_bonus = fake_ctx(), fake_ctx(entropy_coef=coef)
    base = alg.loss_fn(plain, stats, alg.counts(plain, stats, R))[0]
    bonus = alg.loss_fn(with_bonus, stats, alg.counts(with_bonus, stats, R))[0]
    np.testing.assert_allclose(bonus - base, -coef * token_mean, rtol=1e-4, err_msg=name)


# --- 9. DAPO dynamic sampling --------------------------------------------------------------------------------


def test_select_groups_keeps_groups_with_signal_first_in_order():
  scores = np.array([0.5, 0.5, 0.5,  # group 0: tied
                     1.0, 0.0, 0.0,  # group 1: signal
                     0.0, 0.0, 0.0,  # group 2: tied
                     0.0, 0.2, 1.0], np.float32)  # group 3: signal
  groups = 4
  group_ids = jnp.repeat(jnp.arange(groups), G)
  tree = ({"ids": jnp.arange(groups * G) * 10}, jnp.arange(groups * G, dtype=jnp.float32)[:, None] * jnp.array([1.0, -1.0]))
  picked, kept_scores, signal = _select_groups(tree, jnp.asarray(scores), group_ids, groups, 2, G)
  rows = np.array([3, 4, 5, 9, 10, 11])  # groups 1 and 3
  np.testing.assert_array_equal(picked[0]["ids"], rows * 10)
  np.testing.assert_array_equal(picked[1], np.arange(groups * G)[rows][:, None] * [1.0, -1.0])
  np.testing.assert_array_equal(kept_scores, scores[rows])
  np.testing.assert_allclose(signal, 0.5)

  # One group with signal and two to keep: it comes first, then the first tied group, in order.
  scores = np.array([0.5] * 3 + [0.0] * 3 + [0.0, 1.0, 1.0] + [0.3] * 3, np.float32)
  picked, kept_scores, signal = _select_groups(tree, jnp.asarray(scores), group_ids, groups, 2, G)
  rows = np.array([6, 7, 8, 0, 1, 2])  # group 2, then group 0
  np.testing.assert_array_equal(picked[0]["ids"], rows * 10)
  np.testing.assert_array_equal(kept_scores, scores[rows])
  np.testing.assert_allclose(signal, 0.25)


def test_overlong_shaping_and_truncated_completion_mask():
  """DAPO's soft overlong penalty (OBJECTIVES.md §6.3 item 4) on completion lengths, and the mask that drops
  completions without EOS (rl.mask_truncated_completions)."""
  lengths = np.array([1, 2, 3, 4, 5, 6])
  mask = (np.arange(6)[None, :] < lengths[:, None]).astype(np.float32)  # [R, N=6]
  finished = lengths < 6
  rollout = types.SimpleNamespace(mask=jnp.asarray(mask), finished=jnp.asarray(finished))
  scores = jnp.arange(6, dtype=jnp.float32)
  same, metrics = shaped_scores(RLConfig(max_new_tokens=6), scores, rollout)
  assert metrics == {} and same is scores
  shaped, metrics = shaped_scores(RLConfig(max_new_tokens=6, overlong_buffer=4), scores, rollout)
  soft = 6 - 4  # penalty 0 up to L_max - L_cache, then linear to -1 at L_max
  expected = np.array([0.0 if n <= soft else (soft - n) / 4 for n in lengths])
  np.testing.assert_allclose(shaped, np.arange(6) + expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["reward/overlong_penalty"], expected.mean(), rtol=1e-6)
  np.testing.assert_array_equal(trained_mask(RLConfig(), jnp.asarray(mask), rollout), mask)
  dropped = trained_mask(RLConfig(mask_truncated_completions=True), jnp.asarray(mask), rollout)
  np.testing.assert_array_equal(dropped, mask * finished[:, None])
  assert np.asarray(dropped)[5].sum() == 0 and np.asarray(dropped)[4].sum() == 5


def test_pair_and_best_selection_skip_rows_that_do_not_train():
  """With rl.mask_truncated_completions a truncated row has no trained token: online DPO pairs and RFT's best
  come from the rows that train (a group with fewer than two such rows gives no pair)."""
  from jaxalign.algorithms.online.base import group_best

  scores = jnp.asarray([3.0, 1.0, 2.0, 5.0, 4.0, 0.0])  # two groups of 3
  trains = jnp.asarray([False, True, True, True, False, False])
  best, worst, distinct = group_best(scores, 3, trains)
  np.testing.assert_array_equal(best, [2, 3])  # 3.0 (row 0) is truncated; group 2 has one training row
  np.testing.assert_array_equal(worst, [1, 3])
  np.testing.assert_array_equal(distinct, [True, False])
  best, worst, distinct = group_best(scores, 3, jnp.ones(6, bool))
  np.testing.assert_array_equal(best, [0, 3])
  np.testing.assert_array_equal(worst, [1, 5])


def test_check_refuses_minibatches_that_do_not_divide_the_update_units():
  rl = RLConfig(group_size=4, minibatches=5)
  with pytest.raises(ValueError, match="rl.minibatches=5 does not divide the 24 update units"):
    ALGORITHMS["grpo"].check(rl, {}, 6)
  ALGORITHMS["grpo"].check(rl, {}, 5)  # 20 rows
  with pytest.raises(ValueError, match="does not divide the 4 update units"):  # one pair per prompt
    ALGORITHMS["online_dpo"].check(rl, {}, 4)
  with pytest.raises(ValueError, match="entropy bonus; set one"):
    ALGORITHMS["ppo"].check(RLConfig(entropy_coef=0.01), {"ent_coef": 0.01}, 4)
