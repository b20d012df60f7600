"""Online algorithms that train on a dataset's responses with samples drawn inside the jitted step: SPIN (Chen et al.
2024) on demonstrations, PMLE and preference distillation (Yun et al., OBJECTIVES.md §10.2-§10.3) on preference
pairs with their on-policy KL term. Tiny models on the built-in tasks: "largest digit" demonstrations for SPIN,
digit-sorting pairs (with graded scores) for the others. One device (the boundary test: FSDP over 2)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign import sharding
from jaxalign.algorithms.forward import rows as row_view
from jaxalign.config import ConfigError, TrainConfig, from_dict, set_key
from jaxalign.data.pipeline import Batches
from jaxalign.models import ScalarModel, save_hf
from jaxalign.models.decoder import last_token_values
from jaxalign.train import RL_DEFAULT_RECIPE, check_stages, parse_stages
from jaxalign.trainer import build_run, check_combination, objective_of, train

TINY = {"vocab_size": 24, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
        "num_kv_heads": 2, "max_position_embeddings": 48, "remat": "none"}
ONE_DEVICE = {"mesh__data": 1, "mesh__fsdp": 1, "mesh__tensor": 1}
RECIPES = RL_DEFAULT_RECIPE.parent


def stage(tmp_path, algorithm, **changes):
  """SPIN on "largest digit" demonstrations; the pair algorithms on digit-sorting pairs."""
  spin = algorithm == "spin"
  cfg = {
    "algorithm": algorithm, "model": TINY, "tokenizer": "builtin:digits", "steps": 15, "run_dir": str(tmp_path / "run"),
    "data": {"format": "sft" if spin else "preference", "train": ["synthetic:max" if spin else "synthetic:sort"],
             "synthetic_size": [512, 64], "max_length": 32, "max_prompt_length": 16, "batch_size": 8},
    "rl": {"group_size": 2, "max_new_tokens": 4, "rewards": {}, "reference_update_steps": 5 if spin else 0},
    "loss": {"params": {"beta": 0.5} if spin else {"gamma": 0.5, "beta": 0.05}},
    "optim": {"lr": 3e-3}, "eval_batches": 4, "log": {"every": 1, "progress": False, "tensorboard": False},
    "checkpoint": {"export_hf": False},
  }
  for key, value in {**ONE_DEVICE, **changes}.items():
    set_key(cfg, key.replace("__", "."), value)
  return from_dict(TrainConfig, cfg)


def train_rows(run_dir) -> dict[int, dict]:
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in rows if "train/loss" in r}


def test_spin_raises_the_demonstrations_likelihood_and_restarts_each_iteration_at_its_reference(tmp_path):
  """Held-out demonstrations' NLL falls; at the first step of every iteration (steps 1, 6, 11 with 5 steps each) the
  policy is its reference, so every pair's DPO margin is 0; inside an iteration it is not."""
  result = train(stage(tmp_path, "spin", steps=11))
  assert result["eval_after"]["nll_per_token"] < result["eval_before"]["nll_per_token"] - 0.3, result
  rows = train_rows(tmp_path / "run")
  for step, row in rows.items():
    margin = abs(row["train/rewards/margins"])
    assert margin < 1e-6 if step in (1, 6, 11) else margin > 1e-4, (step, margin)
  # The demonstrations gain on the samples: log pi(demo) - log pi(sample) grows over the run.
  gap = [rows[s]["train/logps/chosen"] - rows[s]["train/logps/rejected"] for s in sorted(rows)]
  assert np.mean(gap[-4:]) > np.mean(gap[:4]) + 0.5, gap


def test_spin_reference_is_the_policy_of_the_last_boundary_in_its_sharding(tmp_path):
  """The reference weights live in the train state: after step s they are the policy after step K * floor(s / K)
  (the initial policy before the first boundary), bit for bit, laid out as the policy is (FSDP over 2 devices)."""
  cfg = stage(tmp_path, "spin", rl__reference_update_steps=2, mesh__fsdp=2)
  run = build_run(cfg)
  assert "reference" not in run.frozen  # moved into the state, not held twice
  policies = [jax.tree.map(np.asarray, run.state.trainable)]
  with sharding.use_mesh(run.mesh, cfg.mesh.rules):
    step = jax.jit(run.train_fn)
    state = run.state
    for s in range(1, 5):
      state, _ = step(state, run.next_batch(), run.frozen)
      policies.append(jax.tree.map(np.asarray, state.trainable))
      expected = policies[s - s % 2]
      reference = state.loss_state["reference"]
      jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, reference), expected)
      for r, p in zip(jax.tree.leaves(reference), jax.tree.leaves(state.trainable)):
        assert r.sharding.is_equivalent_to(p.sharding, r.ndim), (r.sharding, p.sharding)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(policies[1]), jax.tree.leaves(policies[2])))


def test_spin_resume_inside_an_iteration_continues_exactly(tmp_path, monkeypatch):
  """Iterations of 3 steps, checkpoints every 2: the crash before step 5 resumes from step 4, inside the second
  iteration, whose reference (the policy after step 3) comes back from the checkpoint."""
  kw = dict(steps=6, rl__reference_update_steps=3, checkpoint__every=2, eval_batches=1)
  train(stage(tmp_path / "full", "spin", **kw))
  calls = {"n": 0}
  original = Batches.__next__

  def crash(self):
    calls["n"] += self.shuffle
    if calls["n"] == 5 and self.shuffle:
      raise KeyboardInterrupt("simulated crash")
    return original(self)

  monkeypatch.setattr(Batches, "__next__", crash)
  with pytest.raises(KeyboardInterrupt):
    train(stage(tmp_path / "resumed", "spin", **kw))
  monkeypatch.setattr(Batches, "__next__", original)
  train(stage(tmp_path / "resumed", "spin", **kw))
  full, resumed = train_rows(tmp_path / "full/run"), train_rows(tmp_path / "resumed/run")
  for step in (5, 6):
    for key in ("train/loss", "train/rewards/margins", "train/logps/rejected"):
      np.testing.assert_allclose(resumed[step][key], full[step][key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("algorithm", ["pmle", "preference_distillation"])
def test_pair_algorithms_learn_the_preferences_with_an_on_policy_kl(tmp_path, algorithm):
  """The held-out pairs' chosen response gains on the rejected one; the KL term comes from samples drawn in the
  step: 0 at step 1 (policy = reference), positive once the policy moved."""
  result = train(stage(tmp_path, algorithm, steps=12))
  before, after = result["eval_before"], result["eval_after"]
  assert after["policy_prefers_chosen"] > before["policy_prefers_chosen"] + 0.15, (before, after)
  assert after["logps/margin"] > before["logps/margin"], (before, after)
  rows = train_rows(tmp_path / "run")
  assert abs(rows[1]["train/kl"]) < 1e-6
  assert all(rows[s]["train/kl"] > 1e-3 for s in range(5, 13)), [rows[s]["train/kl"] for s in rows]
  if algorithm == "preference_distillation":  # R_hat from the data's scores (graded: chosen above rejected)
    assert all(r["train/distill/score_margin"] > 0 for r in rows.values())


def test_distillation_scores_the_pairs_with_the_reward_model_inside_the_step(tmp_path):
  """With rl.reward_model, R_hat is that model's score of each pair's rows, read in the step (the data's scores
  are ignored)."""
  cfg = stage(tmp_path, "preference_distillation")
  reward_model = ScalarModel(cfg.model, rngs=nnx.Rngs(5))
  save_hf(reward_model, cfg.model, tmp_path / "rm")
  cfg = stage(tmp_path, "preference_distillation", rl__reward_model=str(tmp_path / "rm"), steps=1)
  run = build_run(cfg)
  batch = run.next_batch()
  data = {k.removeprefix("data_"): v for k, v in batch.items() if k.startswith("data_")}
  flat = jax.tree.map(np.asarray, row_view(data))
  scores = np.asarray(last_token_values(reward_model(flat["input_ids"], segment_ids=flat["segment_ids"]),
                                        flat["segment_ids"] != 0)).reshape(-1, 2)
  with sharding.use_mesh(run.mesh, cfg.mesh.rules):
    _, metrics = jax.jit(run.train_fn)(run.state, batch, run.frozen)
  expected = np.mean(scores[:, 0] - scores[:, 1])
  np.testing.assert_allclose(float(metrics["distill/score_margin"]), expected, rtol=1e-4, atol=1e-5)
  assert not np.isclose(expected, np.mean(np.asarray(data["scores"])[:, 0] - np.asarray(data["scores"])[:, 1]))


def test_configurations_they_cannot_honour_are_one_line_errors(tmp_path):
  unscored = tmp_path / "pairs.jsonl"
  unscored.write_text("".join(json.dumps({"prompt": "sort : 3 1", "chosen": "1 3", "rejected": "3 1"}) + "\n"
                              for _ in range(16)))
  with pytest.raises(ConfigError) as error:
    train(stage(tmp_path, "preference_distillation", data__train=[str(unscored)], data__eval=[str(unscored)]))
  assert str(error.value) == ("algorithm=preference_distillation: preference_distillation needs R_hat: set "
                              "rl.reward_model (scored in the step) or give every pair score_chosen / "
                              "score_rejected in data.train")
  for algorithm, changes, message in [
      ("spin", {"data__format": "prompt"}, r"^loss '.*' \(spin\) trains on data.format=sft, but data.format=prompt$"),
      ("spin", {"rl__reference_update_steps": 0}, r"^algorithm=spin: spin's reference is the previous iteration"),
      ("pmle", {"loss__params": {"beta": 0.0}, "rl__reference_update_steps": 4},
       r"^algorithm=pmle: rl.reference_update_steps=4 updates a reference this run does not use"),
      ("pmle", {"data__packing": True}, r"^algorithm=pmle: data.packing applies to offline algorithms"),
      ("pmle", {"rl__oversample": 2}, r"^algorithm=pmle: rl.oversample, rl.kl_coef")]:
    cfg = stage(tmp_path, algorithm, **changes)
    with pytest.raises(ConfigError, match=message) as error:
      check_combination(cfg, objective_of(cfg))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("recipe", ["spin", "pmle", "distillation", "rkl"])
def test_recipes_are_valid_runs(recipe):
  """Each recipe's stages pass the checks a run makes before building anything (`--plan` compiles them:
  `python -m jaxalign.train --config jaxalign/recipes/<recipe>.yaml --plan --devices 1`)."""
  stages = parse_stages(str(RECIPES / f"{recipe}.yaml"), [])
  check_stages(stages)
  online = stages[-1]
  assert online.algorithm == {"spin": "spin", "pmle": "pmle", "distillation": "preference_distillation",
                              "rkl": "rkl"}[recipe]
  if recipe == "rkl":  # from scratch on the rule reward, as the RL default; the paper's beta and gamma
    assert online.rl.kl_coef == 0.05 and online.loss.params["gamma"] == 0.01
  else:
    assert online.init_from == "@previous" and stages[0].algorithm == "sft"
