"""Online RL end to end on the built-in "largest digit" task: every algorithm raises the held-out reward."""

import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign import sharding
from jaxalign.algorithms.online import ALGORITHMS
from jaxalign.config import TrainConfig, from_dict, set_key
from jaxalign.data.pipeline import Batches
from jaxalign.models import ScalarModel, save_hf
from jaxalign.train import main
from jaxalign.trainer import build_run, train

# remat "none": at this size rematerialisation only adds recompute (tests/models/test_layer_stack.py checks
# that every policy gives the same gradients).
TINY = {"vocab_size": 24, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
        "num_kv_heads": 2, "max_position_embeddings": 32, "remat": "none"}


def rl_stage(tmp_path, algorithm, **changes):
  cfg = {
    "algorithm": algorithm, "model": TINY, "tokenizer": "builtin:digits", "steps": 30, "run_dir": str(tmp_path / "run"),
    "data": {"format": "prompt", "train": ["synthetic:max"], "synthetic_size": [512, 64], "max_length": 20,
             "max_prompt_length": 12, "batch_size": 8},
    "rl": {"group_size": 4, "max_new_tokens": 3, "rewards": {"max_digit": 1.0}, "rft_threshold": 1.0},
    "optim": {"lr": 3e-3}, "eval_batches": 8, "log": {"every": 1, "progress": False, "tensorboard": False},
    "checkpoint": {"export_hf": False}, "mesh": {"fsdp": 1},  # one device unless a test asks for a mesh
  }
  for key, value in changes.items():
    set_key(cfg, key.replace("__", "."), value)
  return from_dict(TrainConfig, cfg)


# Algorithms that train on a dataset's responses (SPIN, PMLE, distillation): tests/rollout/test_offline_data_online.py
@pytest.mark.parametrize("algorithm", sorted(n for n, a in ALGORITHMS.items() if a.data_format == "prompt"))
def test_every_online_algorithm_raises_the_reward(tmp_path, algorithm):
  result = train(rl_stage(tmp_path, algorithm, eval_batches=4))  # 4 x 8 held-out prompts, before and after
  before, after = result["eval_before"]["reward"], result["eval_after"]["reward"]
  assert after > before + 0.1, (before, after)
  rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "train/reward" in r]
  assert all(np.isfinite(r["train/loss"]) for r in train_rows)
  if algorithm not in ("online_dpo", "rft"):  # their losses read no old-policy log-probs: no pass compares them
    assert train_rows[0]["train/rollout/logprob_mismatch_max"] < 1e-3  # sampler and trainer agree


def train_rows(run_dir):
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in rows if "train/loss" in r}


def test_one_and_eight_device_meshes_agree(tmp_path):
  one = rl_stage(tmp_path / "a", "grpo", steps=3, mesh__data=1, mesh__fsdp=1, mesh__tensor=1, eval_batches=1)
  eight = rl_stage(tmp_path / "b", "grpo", steps=3, mesh__data=2, mesh__fsdp=2, mesh__tensor=2, eval_batches=1)
  train(one), train(eight)
  a, b = train_rows(tmp_path / "a/run"), train_rows(tmp_path / "b/run")
  for step in (1, 2, 3):
    assert a[step]["train/reward"] == b[step]["train/reward"]  # the same samples
    np.testing.assert_allclose(b[step]["train/loss"], a[step]["train/loss"], rtol=1e-4, atol=1e-6)


def test_rl_resume_continues_exactly(tmp_path, monkeypatch):
  kw = dict(steps=6, checkpoint__every=2)
  train(rl_stage(tmp_path / "full", "rloo", **kw))
  calls = {"n": 0}
  original = Batches.__next__

  def crash(self):
    calls["n"] += self.shuffle
    if calls["n"] == 5 and self.shuffle:
      raise KeyboardInterrupt("simulated crash")
    return original(self)

  monkeypatch.setattr(Batches, "__next__", crash)
  with pytest.raises(KeyboardInterrupt):
    train(rl_stage(tmp_path / "resumed", "rloo", **kw))
  monkeypatch.setattr(Batches, "__next__", original)
  train(rl_stage(tmp_path / "resumed", "rloo", **kw))
  full, resumed = train_rows(tmp_path / "full/run"), train_rows(tmp_path / "resumed/run")
  for step in (5, 6):
    assert resumed[step]["train/reward"] == full[step]["train/reward"]
    np.testing.assert_allclose(resumed[step]["train/loss"], full[step]["train/loss"], rtol=1e-5, atol=1e-7)


def test_ppo_with_a_reward_model_scores_inside_the_step(tmp_path):
  cfg = rl_stage(tmp_path, "ppo")
  reward_model = ScalarModel(cfg.model.replace(vocab_size=24), rngs=nnx.Rngs(5))
  save_hf(reward_model, cfg.model, tmp_path / "rm")
  result = train(rl_stage(tmp_path, "ppo", rl__reward_model=str(tmp_path / "rm"), rl__rewards={},
                          rl__kl_coef=0.05, steps=30))
  assert result["eval_after"]["reward"] > result["eval_before"]["reward"]


def test_a_reward_model_with_another_tokenizer_is_refused(tmp_path, data_dir):
  """A vocab-24 digits policy scored by a GPT-2 reward model would read every token id as another token."""
  from transformers import PreTrainedTokenizerFast

  from jaxalign.data.readers import DataError
  from jaxalign.trainer import ConfigError

  cfg = rl_stage(tmp_path, "ppo")
  gpt2 = PreTrainedTokenizerFast(tokenizer_file=str(data_dir / "tokenizers/gpt2/tokenizer.json"), eos_token="<|endoftext|>")
  save_hf(ScalarModel(cfg.model.replace(vocab_size=len(gpt2)), rngs=nnx.Rngs(5)), cfg.model.replace(vocab_size=len(gpt2)),
          tmp_path / "gpt2_rm", tokenizer=gpt2)
  with pytest.raises(DataError, match=r"^rl.reward_model=.*gpt2_rm: token '<pad>' is missing in its tokenizer, id 0 "):
    train(rl_stage(tmp_path, "ppo", rl__reward_model=str(tmp_path / "gpt2_rm"), rl__rewards={}))
  save_hf(ScalarModel(cfg.model.replace(vocab_size=40), rngs=nnx.Rngs(5)), cfg.model.replace(vocab_size=40), tmp_path / "rm40")
  with pytest.raises(ConfigError, match=r"rm40: its vocab_size is 40, the policy's is 24"):  # no tokenizer saved with it
    train(rl_stage(tmp_path, "grpo", rl__reward_model=str(tmp_path / "rm40"), rl__rewards={}))


def test_default_grpo_command_improves_reward(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  assert main(["algorithm=grpo", "steps=60", "log.progress=false", "mesh.fsdp=1"]) == 0
  out = capsys.readouterr().out
  line = next(l for l in out.splitlines() if l.startswith("| rl | reward |"))
  before, after = (float(x) for x in line.strip("| ").split("|")[2:4])
  assert after > before + 0.1


def test_gsm8k_recipe_runs_on_the_real_data(tmp_path, data_dir, capsys):
  code = main(["--config", "configs/gsm8k_grpo.yaml", "steps=1", "eval_batches=1", "log.progress=false",
               f"run_dir={tmp_path / 'g'}", f"tokenizer={data_dir / 'tokenizers/gpt2/tokenizer.json'}",
               f"data.train=[{data_dir / 'gsm8k/train.jsonl'}]", "data.limit=32", "data.batch_size=2",
               "data.max_length=160", "data.max_prompt_length=128", "rl.group_size=2", "rl.max_new_tokens=8",
               "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "model.num_heads=2",
               "model.num_kv_heads=1", "checkpoint.export_hf=false", "mesh.fsdp=1"])
  assert code == 0, capsys.readouterr().err
  assert "| grpo-gsm8k | reward |" in capsys.readouterr().out


def test_dapo_dynamic_sampling_keeps_groups_with_signal_first(tmp_path):
  train(rl_stage(tmp_path, "dapo", steps=6, rl__oversample=2))
  for row in train_rows(tmp_path / "run").values():
    signal = row["train/dynamic_sampling/signal_fraction"]  # over all 2B sampled groups
    expected_zero_std = max(0.0, 1.0 - 2 * signal)  # B kept, those with signal first
    np.testing.assert_allclose(row["train/frac_reward_zero_std"], expected_zero_std, atol=1e-6)


def test_ppo_kl_in_the_loss_pulls_towards_the_reference(tmp_path):
  result = train(rl_stage(tmp_path, "ppo", steps=5, rl__kl_loss_coef=0.5))
  rows = train_rows(tmp_path / "run")
  assert all("train/kl_loss" in r and r["train/kl_loss"] >= 0.0 for r in rows.values())  # k3 >= 0
  assert np.isfinite(result["eval_after"]["reward"])


def test_hh_pairs_read_as_prompts(data_dir):
  from jaxalign.data import parse_records, read_records
  examples, _ = parse_records(read_records(str(data_dir / "hh_rlhf/helpful-base/test.jsonl.gz")), "prompt")
  assert len(examples) == 2354 and all(e.prompt.endswith("\n\nAssistant:") and not e.responses for e in examples)


@pytest.mark.parametrize("algorithm, pack_ratio", [("grpo", 0.0), ("grpo", 0.7), ("ppo", 0.7)])
def test_truncated_sampling_is_replayed_on_the_training_path(tmp_path, algorithm, pack_ratio):
  """top-k / top-p: the old-policy log-probs equal the sampler's and the first update's ratio is 1 (either
  fails when a pass ignores the sampler's logit floor: full-distribution log-probs are lower), with padded and
  with packed training passes (PPO: its critic's values packed too). One device, so that packing has 32 rows
  to fill 12 rows of twice their length. The sampler's own renormalize=False path is tested in
  tests/rollout/test_sampler.py."""
  cfg = rl_stage(tmp_path, algorithm, steps=1, rl__top_k=5, rl__top_p=0.8, rl__temperature=1.5,
                 rl__pack_ratio=pack_ratio, rl__pack_length=30, mesh__data=1, mesh__fsdp=1, mesh__tensor=1)
  row = one_step(cfg)
  if pack_ratio:
    assert row["packing/scoring_packed_fraction"] == row["packing/update_packed_fraction"] == 1.0
  assert row["rollout/logprob_mismatch_max"] < 1e-5
  # the first update's pi / pi_old: 1 up to float32 rounding (the old and the update pass fuse differently)
  assert row["ratio_deviation_max"] <= 2.0**-22


def one_step(cfg) -> dict[str, float]:
  """The metrics of one RL step of a freshly built run (no eval, no checkpoint)."""
  run = build_run(cfg)
  with sharding.use_mesh(run.mesh, cfg.mesh.rules):
    _, metrics = jax.jit(run.train_fn)(run.state, run.next_batch(), run.frozen)
  return {k: float(v) for k, v in metrics.items()}


def test_one_update_per_rollout_skips_the_old_pass_and_trains_alike(tmp_path, monkeypatch):
  """GRPO with one optimiser step per rollout takes pi_old from the update's own log-probs, detached: the
  compiled step has one policy forward fewer (its matmuls), and the update equals the one after an old pass."""
  cfg = rl_stage(tmp_path, "grpo", steps=1, loss__params={"beta": 0.04}, mesh__data=1, mesh__fsdp=1)

  def step(run):
    with sharding.use_mesh(run.mesh, cfg.mesh.rules):
      step = jax.jit(run.train_fn).lower(run.state, batch, run.frozen).compile()
      state, metrics = step(run.state, batch, run.frozen)
    return step.as_text().count(" dot("), state.trainable, {k: float(v) for k, v in metrics.items()}

  run = build_run(cfg)
  batch = run.next_batch()
  skipped = step(run)
  monkeypatch.setattr(type(ALGORITHMS["grpo"]), "needs_old_pass", lambda self, rl: True)
  with_pass = step(build_run(cfg))
  forward_dots = 7 * TINY["num_layers"]  # q, k, v, o, gate, up, down per layer (the head: token_logprobs)
  assert with_pass[0] - skipped[0] >= forward_dots
  for a, b in zip(jax.tree.leaves(skipped[1]), jax.tree.leaves(with_pass[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for key in ("loss", "reward", "kl", "rollout/logprob_mismatch_max"):
    np.testing.assert_allclose(skipped[2][key], with_pass[2][key], rtol=1e-4, atol=1e-6)
  assert "rollout/kl_k1" in with_pass[2] and "rollout/kl_k1" not in skipped[2]


def test_the_readme_algorithm_is_one_class_and_one_registry_line(tmp_path, monkeypatch):
  """The README's example of adding an online algorithm runs as written: its module's code plus one
  ALGORITHMS entry, and nothing else, gives an algorithm the trainer, config and CLI accept."""
  readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
  block = readme.split("# jaxalign/algorithms/online/mean_baseline.py\n", 1)[1].split("```", 1)[0]
  module, registry = block.split("# jaxalign/algorithms/online/__init__.py, in ALGORITHMS\n")
  namespace = {}
  exec(module, namespace)
  name, value = (part.strip().rstrip(",") for part in registry.split(":", 1))
  monkeypatch.setitem(ALGORITHMS, name.strip('"'), eval(value, namespace))
  result = train(rl_stage(tmp_path, "mean_baseline", steps=2, rl__kl_coef=0.05, eval_batches=1))
  rows = train_rows(tmp_path / "run")
  assert result["eval_after"] is not None and all(np.isfinite(r["train/loss"]) for r in rows.values())
  assert set(rows) == {1, 2} and "train/rollout/logprob_mismatch_max" in rows[2]


def test_grpo_trains_a_tiny_mixture_of_experts(tmp_path):
  """GRPO on a tiny Qwen3-MoE (4 experts, top-2, the balancing loss on) raises the held-out reward, reports the
  router's statistics, and with two epochs per rollout (an old-policy pass) its replayed routing gives the
  sampler's log-probs; the pass without replay is reported beside it. (Seeds 0-4 rose by 0.16-0.61; a dense
  Qwen3 of this size by 0.36-0.63.)"""
  import dataclasses

  from jaxalign.models import tiny

  model = dataclasses.asdict(tiny("qwen3_moe", **TINY, head_dim=8))
  result = train(rl_stage(tmp_path, "grpo", model=model, steps=40, optim__lr=1e-2, rl__group_size=8, rl__epochs=2,
                          loss__router_aux_coef=0.01))
  before, after = result["eval_before"]["reward"], result["eval_after"]["reward"]
  assert after > before + 0.1, (before, after)
  rows = train_rows(tmp_path / "run").values()
  assert all(np.isfinite(r["train/loss"]) and np.isfinite(r["train/router/balance"]) for r in rows)
  assert all(r["train/router/max_load"] >= 1.0 for r in rows)  # the busiest expert: at least its even share
  assert max(r["train/rollout/logprob_mismatch_max"] for r in rows) < 1e-5  # routing replay: "all", the default
  assert all(np.isfinite(r["train/rollout/logprob_mismatch_max_no_replay"]) for r in rows)
