"""A few steps of every trainer and every registered offline loss: finite, decreasing, parameters move."""

import jax
import numpy as np
import pytest

from jaxalign import losses
from jaxalign.algorithms.objectives import REWARD_LOSSES
from jaxalign.algorithms.step import make_eval_step, make_train_step
from jaxalign.trainer import build_run, put_batch, stack_micro_batches

FORMAT = {losses.PairStats: "preference", losses.ListStats: "ranked", losses.UnpairedStats: "unpaired"}
# preference_distillation fits external scores that the synthetic pairs do not carry.
DIRECT = sorted(n for n in losses.available() if losses.input_type(n) in FORMAT and n != "preference_distillation")


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


def test_sft_trains(stage):
  assert_trains(*run_steps(stage(algorithm="sft", loss__name="sft")))


def test_sft_with_packing_trains(stage):
  assert_trains(*run_steps(stage(algorithm="sft", loss__name="sft", data__packing=True, data__batch_size=2)))


@pytest.mark.parametrize("loss_name", sorted(REWARD_LOSSES))
def test_reward_model_trains(stage, loss_name):
  fmt = REWARD_LOSSES[loss_name][0]
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
