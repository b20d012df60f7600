"""A few steps of every trainer and every registered offline loss: finite, decreasing, parameters move."""

import json

import jax
import numpy as np
import pytest

from jaxalign import losses
from jaxalign.algorithms.step import make_eval_step, make_train_step
from jaxalign.trainer import build_run, evaluate, put_batch, stack_micro_batches

FORMAT = {losses.PairStats: "preference", losses.ListStats: "ranked", losses.UnpairedStats: "unpaired"}
# Pairwise losses train in tests/train/test_orientation.py (as the data says, and against swapped data).
DIRECT = sorted(n for n in losses.available() if losses.input_type(n) in FORMAT and losses.input_type(n) is not
                losses.PairStats)


def run_steps(cfg, steps=4):
  """Eval metrics on a fixed held-out batch before / after `steps` updates, and which leaves moved."""
  run = build_run(cfg)
  train_step = jax.jit(make_train_step(run.fns))
  eval_step = jax.jit(make_eval_step(run.fns))
  fixed = put_batch(run.eval_data.epoch_batches()[0], run.mesh, cfg.mesh.rules, 0)
  before = jax.device_get(eval_step(run.state, fixed, run.frozen))
  start = [np.asarray(x) for x in jax.tree.leaves(run.state.trainable)]
  state = run.state
  for _ in range(steps):
    micro = stack_micro_batches([next(run.train_data) for _ in range(cfg.optim.grad_accum)])
    state, metrics = train_step(state, put_batch(micro, run.mesh, cfg.mesh.rules, 1), run.frozen)
    assert np.isfinite(float(metrics["loss"]))
  after = jax.device_get(eval_step(state, fixed, run.frozen))
  moved = [not np.allclose(a, np.asarray(b)) for a, b in zip(start, jax.tree.leaves(state.trainable))]
  return before, after, moved


def assert_trains(before, after, moved):
  assert np.isfinite(after["loss"]) and after["loss"] < before["loss"], (before["loss"], after["loss"])
  assert all(moved), f"{moved.count(False)} parameter arrays did not change"


@pytest.mark.parametrize("loss_name", DIRECT)
def test_every_direct_loss_trains(stage, loss_name):
  fmt = FORMAT[losses.input_type(loss_name)]
  assert_trains(*run_steps(stage(algorithm="preference", loss__name=loss_name, data__format=fmt, optim__lr=1e-2)))


@pytest.mark.parametrize("loss_name", sorted(n for n in losses.available() if losses.spec(n).data_format == "sft"))
def test_sft_losses_train(stage, loss_name):
  # DFT's loss, -sum sg(p) lp, rises while p grows from ~1/V: held-out NLL is what both losses lower.
  before, after, moved = run_steps(stage(algorithm="sft", loss__name=loss_name))
  assert after["nll_per_token"] < before["nll_per_token"], (before, after)
  assert all(moved), f"{moved.count(False)} parameter arrays did not change"


def test_sft_with_packing_trains(stage):
  assert_trains(*run_steps(stage(algorithm="sft", loss__name="sft", data__packing=True, data__batch_size=2)))


@pytest.mark.parametrize("loss_name", sorted(n for n in losses.available() if losses.spec(n).reward_model))
def test_reward_model_trains(stage, loss_name):
  fmt = losses.spec(loss_name).data_format
  before, after, moved = run_steps(stage(algorithm="reward", loss__name=loss_name, data__format=fmt))
  assert_trains(before, after, moved)
  assert ("accuracy" if fmt == "preference" else "ranking/pairwise_accuracy") in after


def test_lora_trains_only_adapters_and_uses_base_as_reference(stage):
  cfg = stage(algorithm="preference", loss__name="dpo", data__format="preference", lora__rank=4, optim__lr=1e-2)
  run = build_run(cfg)
  assert set(run.frozen) == {"base"}  # no separate reference copy
  assert all(k.split("/")[-1].endswith("proj") for k in run.state.trainable)
  before, after, moved = run_steps(cfg)
  assert_trains(before, after, moved)
  assert before["rewards/margins"] == 0.0  # B = 0: policy starts equal to the base/reference


def test_precomputed_reference_matches_reference_model(stage):
  results = []
  for mode in ("model", "precomputed"):
    cfg = stage(algorithm="preference", loss__name="dpo", data__format="preference", reference__mode=mode)
    results.append(run_steps(cfg, steps=2)[1])
  np.testing.assert_allclose(results[1]["loss"], results[0]["loss"], rtol=1e-5)
  np.testing.assert_allclose(results[1]["rewards/margins"], results[0]["rewards/margins"], rtol=1e-4, atol=1e-6)


def test_lora_export_folds_adapters_into_the_weights(stage, tmp_path):
  from flax import nnx

  from jaxalign.algorithms import lora
  from jaxalign.models import load_hf
  from jaxalign.trainer import export

  cfg = stage(algorithm="sft", loss__name="sft", lora__rank=2, lora__targets=["q_proj", "down_proj"])
  run = build_run(cfg)
  step = jax.jit(make_train_step(run.fns))
  micro = stack_micro_batches([next(run.train_data)])
  run.state, _ = step(run.state, put_batch(micro, run.mesh, cfg.mesh.rules, 1), run.frozen)
  loaded, _ = load_hf(export(run, tmp_path / "hf"))
  merged = nnx.merge(run.fns.graphdef, lora.merge(run.frozen["base"], run.state.trainable, cfg.lora))
  base = nnx.merge(run.fns.graphdef, run.frozen["base"])
  ids = micro["input_ids"][0]
  np.testing.assert_allclose(loaded(ids), merged(ids), rtol=1e-5, atol=1e-5)
  assert not np.allclose(loaded(ids), base(ids), atol=1e-4)  # the adapters changed the exported model


def test_bf16_compute_with_float32_master_weights_trains(stage):
  cfg = stage(algorithm="sft", loss__name="sft", model__param_dtype="float32", model__dtype="bfloat16")
  before, after, moved = run_steps(cfg)
  assert_trains(before, after, moved)
  run = build_run(cfg)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(run.state.trainable))


def test_bco_delta_is_the_running_mean_of_its_rewards_kept_in_the_state(stage):
  run = build_run(stage(algorithm="preference", loss__name="bco", data__format="preference", optim__lr=1e-2))
  train_step, eval_step = jax.jit(make_train_step(run.fns)), jax.jit(make_eval_step(run.fns))
  state, seen = run.state, []
  assert float(state.loss_state["delta"]["mean"]) == 0.0
  for _ in range(3):
    state, metrics = train_step(state, put_batch(stack_micro_batches([next(run.train_data)]), run.mesh,
                                                 run.cfg.mesh.rules, 1), run.frozen)
    seen.append(float(metrics["bco/reward_mean"]))
  assert int(state.loss_state["delta"]["count"]) == 3 and len(set(seen)) == 3
  np.testing.assert_allclose(float(state.loss_state["delta"]["mean"]), np.mean(seen), rtol=1e-5)
  # The loss reads the stored delta: the eval loss is BCO's with delta = that running mean.
  fixed = put_batch(run.eval_data.epoch_batches()[0], run.mesh, run.cfg.mesh.rules, 0)
  stats = jax.jit(run.fns.stats)(state.trainable, run.frozen, fixed)
  expected = float(losses.bco_loss(stats, delta=np.mean(seen))[0])
  assert abs(expected - float(losses.bco_loss(stats)[0])) > 1e-4
  np.testing.assert_allclose(float(eval_step(state, fixed, run.frozen)["loss"]), expected, rtol=1e-5)


def test_reward_model_margins_come_from_the_data(stage, tmp_path):
  from jaxalign.data.synthetic import sort_records

  path = tmp_path / "margins.jsonl"
  records = [{**r, "margin": float(i % 3)} for i, r in enumerate(sort_records(32, seed=3))]
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  run = build_run(stage(algorithm="reward", loss__name="bradley_terry", data__format="preference",
                        data__train=[str(path)], data__eval=[str(path)]))
  fixed = put_batch(run.eval_data.epoch_batches()[0], run.mesh, run.cfg.mesh.rules, 0)
  stats = jax.jit(run.fns.stats)(run.state.trainable, run.frozen, fixed)
  np.testing.assert_array_equal(np.asarray(stats.margin), np.asarray(fixed["margin"]))
  assert set(np.asarray(stats.margin).tolist()) == {0.0, 1.0, 2.0}
  with_margin = float(jax.jit(make_eval_step(run.fns))(run.state, fixed, run.frozen)["loss"])
  np.testing.assert_allclose(with_margin, float(losses.bradley_terry_loss(stats)[0]), rtol=1e-6)
  assert with_margin > float(losses.bradley_terry_loss(stats._replace(margin=None))[0]) + 0.1


def _union(batches):
  """One batch of all `batches`' examples, each padded to the longest length (padding trains nothing)."""
  length = max(b["input_ids"].shape[-1] for b in batches)
  pad = lambda x: np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, length - x.shape[-1])]) if x.ndim >= 2 else x
  return {k: np.concatenate([pad(b[k]) if k in ("input_ids", "loss_mask", "segment_ids") else b[k]
                             for b in batches]) for k in batches[0]}


@pytest.mark.parametrize("overrides, keys", [
    (dict(algorithm="sft", loss__name="sft"), ("loss", "nll_per_token")),
    (dict(algorithm="preference", loss__name="cpo", data__format="preference", data__share_prompt=False),
     ("loss", "nll_loss", "pref_loss", "rewards/accuracies")),
])
def test_eval_over_several_batches_is_the_eval_of_their_union(stage, overrides, keys):
  run = build_run(stage(eval_batches=3, data__synthetic_size=[64, 24], **overrides))
  eval_fn = jax.jit(run.eval_fn)
  batches = run.eval_data.epoch_batches()[:3]
  tokens = [int(np.sum(b["loss_mask"])) for b in batches]
  assert len(set(tokens)) > 1  # unequal token counts: a mean of per-batch token means would be off
  whole = jax.device_get(eval_fn(run.state, put_batch(_union(batches), run.mesh, run.cfg.mesh.rules, 0),
                                 run.frozen))
  result = evaluate(run, eval_fn)
  for key in keys:
    np.testing.assert_allclose(result[key], float(whole[key]), rtol=2e-6, err_msg=key)
  per_batch = [float(eval_fn(run.state, put_batch(b, run.mesh, run.cfg.mesh.rules, 0), run.frozen)[keys[0]])
               for b in batches]
  assert abs(np.mean(per_batch) - float(whole[keys[0]])) > 1e-5  # the old mean of means is not the same


def test_orpo_nll_on_prompt_and_completion_reads_the_prompt_tokens(stage):
  """TRL's ORPO NLL: the chosen prompts' log-probs come with the pair statistics, equal to a float64 sum over
  the model's logits at the prompt tokens (each predicted from the one before; the first is not)."""
  from flax import nnx

  run = build_run(stage(algorithm="preference", loss__name="orpo", data__format="preference",
                        loss__params={"nll_tokens": "prompt_and_completion"}))
  batch = run.eval_data.epoch_batches()[0]
  stats = jax.jit(run.fns.stats)(run.state.trainable, run.frozen, put_batch(batch, run.mesh, run.cfg.mesh.rules, 0))
  policy = nnx.merge(run.fns.graphdef, run.state.trainable)
  ids, seg, loss_mask = (batch[k][:, 0] for k in ("input_ids", "segment_ids", "loss_mask"))  # the chosen rows
  logits = np.asarray(policy(ids, segment_ids=seg), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
      -1, keepdims=True)
  want, count = np.zeros(len(ids)), np.zeros(len(ids))
  for b in range(len(ids)):
    for t in range(1, ids.shape[1]):
      if seg[b, t] != 0 and seg[b, t - 1] == seg[b, t] and loss_mask[b, t] == 0:
        want[b] += logp[b, t - 1, ids[b, t]]
        count[b] += 1
  assert count.min() >= 3
  np.testing.assert_allclose(np.asarray(stats.n_prompt), count)
  np.testing.assert_allclose(np.asarray(stats.prompt_chosen), want, rtol=1e-5)
  default = build_run(stage(algorithm="preference", loss__name="orpo", data__format="preference"))
  assert default.fns.objective.stats is not run.fns.objective.stats  # computed only when the loss reads them


def test_a_loss_mixture_trains_by_its_formula_with_its_running_delta(stage):
  """MPO's mixture (0.8 DPO + 0.2 BCO + chosen NLL) named by its formula: it trains, and BCO's running delta is
  kept in the state under the mixture's metric name."""
  cfg = stage(algorithm="preference", loss__name="0.8*dpo + 0.2*bco + chosen_nll", data__format="preference",
              optim__lr=1e-2, loss__params={"beta": 0.2})
  assert_trains(*run_steps(cfg))
  run = build_run(cfg)
  assert run.fns.loss_params == {"beta": 0.2} and set(run.state.loss_state) == {"delta"}
  state, metrics = jax.jit(make_train_step(run.fns))(run.state, put_batch(stack_micro_batches(
      [next(run.train_data)]), run.mesh, run.cfg.mesh.rules, 1), run.frozen)
  np.testing.assert_allclose(float(state.loss_state["delta"]["mean"]), float(metrics["bco/bco/reward_mean"]),
                             rtol=1e-6)
  np.testing.assert_allclose(float(metrics["loss"]), 0.8 * float(metrics["dpo/loss"]) + 0.2 * float(
      metrics["bco/loss"]) + float(metrics["chosen_nll/loss"]), rtol=1e-5)


@pytest.mark.parametrize("packing", [False, True])
def test_ld_dpo_sums_weight_the_tokens_past_the_shorter_response(stage, packing):
  """LD-DPO (loss.ld_alpha): each response's log-probs past the pair's shorter length count ld_alpha times, for
  the policy and the reference, padded or packed; against a float64 sum over the model's logits."""
  from flax import nnx

  alpha = 0.3
  cfg = stage(algorithm="preference", loss__name="dpo", data__format="preference", loss__ld_alpha=alpha,
              data__packing=packing, data__share_prompt=False)
  run, batch, stats = stats_of_a_moved_policy(cfg)
  assert ("pack_row" in batch) == packing
  unequal = 0
  for params, got in ((run.state.trainable, (stats.policy_chosen, stats.policy_rejected)),
                      (run.frozen["reference"], (stats.ref_chosen, stats.ref_rejected))):
    for b, pair in enumerate(response_tokens(nnx.merge(run.fns.graphdef, params), batch)):
      pair = [[lp for lp, _ in response] for response in pair]
      shared = min(len(p) for p in pair)
      unequal += len(pair[0]) != len(pair[1])
      want = [sum(p[:shared]) + alpha * sum(p[shared:]) for p in pair]
      np.testing.assert_allclose([float(got[0][b]), float(got[1][b])], want, rtol=2e-5)
  assert unequal > 0  # pairs of unequal lengths: LD-DPO's sums differ from the plain ones there
  if packing:  # the layouts' statistics agree above: one of them trains
    assert_trains(*run_steps(cfg))


def stats_of_a_moved_policy(cfg):
  """(run, its first held-out batch, the jitted PairStats of that batch) with the policy moved off the reference."""
  run = build_run(cfg)
  batch = run.eval_data.epoch_batches()[0]
  run.state = run.state._replace(trainable=jax.tree.map(lambda x: x * 1.05, run.state.trainable))  # policy != ref
  stats = jax.jit(run.fns.stats)(run.state.trainable, run.frozen, put_batch(batch, run.mesh, run.cfg.mesh.rules, 0))
  return run, batch, stats


def response_tokens(model, batch):
  """Float64 from the model's full logits: for each pair of a padded, shared-prompt or packed batch, its chosen
  and rejected responses' tokens in order as (log p(y_t), log sum_v p_v^2)."""
  ids, seg, loss_mask = (batch[k].reshape(-1, batch[k].shape[-1]) for k in ("input_ids", "segment_ids", "loss_mask"))
  logits = np.asarray(model(ids, segment_ids=seg), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  log_sum_sq = np.log(np.exp(2 * logp).sum(-1))
  tokens = {}  # (row, segment) -> the response's tokens in order
  for r in range(len(ids)):
    for t in range(1, ids.shape[1]):
      if seg[r, t] != 0 and seg[r, t] == seg[r, t - 1] and loss_mask[r, t]:
        tokens.setdefault((r, seg[r, t]), []).append((logp[r, t - 1, ids[r, t]], log_sum_sq[r, t - 1]))
  packed = "pack_row" in batch
  where = (lambda b, c: (batch["pack_row"][b, c], batch["pack_segment"][b, c])) if packed else (
      lambda b, c: (2 * b + c, 1))
  pairs = batch["pack_row" if packed else "input_ids"].shape[0]
  return [[tokens[tuple(int(v) for v in where(b, c))] for c in (0, 1)] for b in range(pairs)]


@pytest.mark.parametrize("packing", [False, True])
def test_wpo_weights_each_pair_by_its_responses_sharpness(stage, packing):
  """WPO (loss.wpo): pair b's weight is exp(sum over its two responses of the mean over response tokens of
  log p(y_t) - log sum_v p_v^2) under the policy, against float64 from the model's logits (padded and packed
  rows; shared-prompt ones in tests/data/test_packing.py), and its loss term is weighted by it:
  sum_b w_b -logsig(beta h_b) / B, h from the statistics."""
  from flax import nnx

  cfg = stage(algorithm="preference", loss__name="dpo", data__format="preference", loss__wpo=True,
              data__packing=packing)
  run, batch, stats = stats_of_a_moved_policy(cfg)
  assert ("pack_row" in batch) == packing
  want = [np.exp(sum(np.mean([lp - lsq for lp, lsq in response]) for response in pair))
          for pair in response_tokens(nnx.merge(run.fns.graphdef, run.state.trainable), batch)]
  np.testing.assert_allclose(np.asarray(stats.weight), want, rtol=2e-5)
  assert np.ptp(want) > 1e-3 * np.max(want)  # pairs weigh differently
  h = np.float64(stats.policy_chosen - stats.ref_chosen) - np.float64(stats.policy_rejected - stats.ref_rejected)
  beta = run.fns.loss_params.get("beta", 0.1)
  loss, metrics = run.fns.objective.loss(stats, {"num_pairs": len(want)}, run.fns.loss_params)
  np.testing.assert_allclose(float(loss), np.sum(np.array(want) * np.logaddexp(0, -beta * h)) / len(want), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["wpo/weight"]), np.mean(want), rtol=2e-5)
  if not packing:  # the weights move with the policy, so the weighted loss need not fall: the margin does
    before, after, moved = run_steps(cfg)
    assert after["rewards/margins"] > before["rewards/margins"] and all(moved), (before, after)


def pair_stats_for_every_field(seed: int, pairs: int = 6) -> losses.PairStats:
  """Random PairStats [B] with every field a pairwise loss may read (log-probs, lengths, scores, prompt NLL)."""
  rng = np.random.default_rng(seed)
  logps = lambda: -rng.uniform(2.0, 12.0, pairs)
  n = lambda: rng.integers(2, 9, pairs).astype(np.float64)
  return losses.PairStats(policy_chosen=logps(), policy_rejected=logps(), ref_chosen=logps(), ref_rejected=logps(),
                          n_chosen=n(), n_rejected=n(), score_chosen=rng.normal(size=pairs),
                          score_rejected=rng.normal(size=pairs), prompt_chosen=logps(), n_prompt=n())


EXACT_PAIRWISE = sorted(n for n in losses.available() if losses.input_type(n) is losses.PairStats
                        and not losses.spec(n).reward_model and losses.spec(n).exact_accumulation)


@pytest.mark.parametrize("loss_name", EXACT_PAIRWISE + ["0.8*dpo + 0.2*bco + chosen_nll"])
def test_weighted_pair_loss_with_unit_weights_is_the_loss(loss_name):
  """`weighted_pair_loss` takes a loss's per-pair terms as its value on one pair with the step's counts; with
  every weight 1 that must give the loss itself and its metrics, for every pairwise loss that sums over pairs
  (a loss reading the whole batch would not). Halving one pair's weight lowers the loss by half its term."""
  from jaxalign.algorithms.objectives import call_loss, weighted_pair_loss

  stats = jax.tree.map(np.float32, pair_stats_for_every_field(len(loss_name)))
  counts = {"num_pairs": 6.0, "num_tokens": float(np.sum(stats.n_chosen)), "num_prompt_tokens": 21.0}
  params = {"tau": 0.2} if loss_name == "discopop" else {}
  want, want_metrics = call_loss(loss_name, stats, params, counts)
  got, metrics = weighted_pair_loss(loss_name, stats._replace(weight=np.ones(6, np.float32)), params, counts)
  np.testing.assert_allclose(float(got), float(want), rtol=2e-6, atol=1e-7)
  assert set(metrics) == set(want_metrics) | {"wpo/weight"}
  for key, value in want_metrics.items():
    np.testing.assert_allclose(float(metrics[key]), float(value), rtol=2e-5, atol=1e-6, err_msg=key)
  alone, _ = call_loss(loss_name, jax.tree.map(lambda x: x[2:3], stats), params, counts)
  halved, _ = weighted_pair_loss(loss_name, stats._replace(weight=np.where(np.arange(6) == 2, 0.5, 1.0)), params,
                                 counts)
  np.testing.assert_allclose(float(halved), float(want) - 0.5 * float(alone), rtol=2e-5, atol=1e-6)


def test_wpo_is_refused_where_pairs_cannot_be_weighted(stage):
  from jaxalign.config import ConfigError

  for loss_name, why in (("aot", "sorts the batch"), ("kto", "is not one")):
    fmt = "unpaired" if loss_name == "kto" else "preference"
    with pytest.raises(ConfigError, match=why):
      build_run(stage(algorithm="preference", loss__name=loss_name, data__format=fmt, loss__wpo=True))


@pytest.mark.parametrize("family", ["gemma2", "qwen2_moe"])  # Gemma 3: its RoPEs tested in tests/models
def test_dpo_trains_a_tiny_model_of_the_newer_families(stage, family):
  """DPO through the whole step on Gemma 2 (soft-capped attention and final logits in the log-prob op), Gemma 3
  (local and global RoPEs) and a mixture of experts (grouped matmuls, a shared expert), tiny."""
  import dataclasses

  from jaxalign.models import tiny
  from tests.train.conftest import TINY_MODEL

  model = dataclasses.asdict(tiny(family, **TINY_MODEL, head_dim=8))
  before, after, moved = run_steps(stage(algorithm="preference", loss__name="dpo", data__format="preference",
                                         optim__lr=1e-2, model=model, loss__router_aux_coef=0.01))
  assert_trains(before, after, moved)
  assert ("router/balance" in after) == (family == "qwen2_moe")


def _moe_stage(stage, **changes):
  import dataclasses

  from jaxalign.models import tiny
  from tests.train.conftest import TINY_MODEL

  return stage(model=dataclasses.asdict(tiny("qwen2_moe", **TINY_MODEL, head_dim=8)), **changes)


def test_router_losses_join_the_objective(stage):
  """A mixture of experts adds aux x balance + z x z-loss to the objective's loss (whichever: the step adds them
  to `Objective.loss`), as the mean over the step's micro-batches, and reports the router's statistics; the same
  step without coefficients differs by exactly that. (The losses' values against transformers and their
  gradients against float64 finite differences: tests/models/test_routing.py; DPO on a mixture of experts:
  test_dpo_trains_a_tiny_model_of_the_newer_families.)"""
  steps = {}
  for coefs in ((0.0, 0.0), (0.5, 0.1)):
    cfg = _moe_stage(stage, algorithm="sft", loss__name="sft", optim__grad_accum=2,
                     loss__router_aux_coef=coefs[0], loss__router_z_coef=coefs[1])
    run = build_run(cfg)
    micro = stack_micro_batches([next(run.train_data) for _ in range(2)])
    steps[coefs] = jax.device_get(jax.jit(make_train_step(run.fns))(
      run.state, put_batch(micro, run.mesh, cfg.mesh.rules, 1), run.frozen)[1])
  plain, with_aux = steps[(0.0, 0.0)], steps[(0.5, 0.1)]
  assert 1.5 < plain["router/balance"] < 3.0 and plain["router/z"] > 0  # k = 2 when balanced
  assert plain["router/max_load"] >= 1.0 >= plain["router/min_load"]
  np.testing.assert_allclose(with_aux["loss"] - plain["loss"],
                             0.5 * plain["router/balance"] + 0.1 * plain["router/z"], rtol=1e-4)
  assert with_aux["grad_norm"] != plain["grad_norm"]


def test_a_dense_model_reports_no_router_statistics(stage):
  before, _, _ = run_steps(stage(algorithm="sft", loss__name="sft", loss__router_aux_coef=0.5), steps=0)
  assert not any(k.startswith("router/") for k in before)
