"""Verifier rewards in RL: RuleRewards runs them through one VerifierPool inside jit and reports its metrics; the
IFEval recipe parses, and one GRPO step on the shared IFEval prompts reports the verifier metrics."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from jaxalign import sharding
from jaxalign.config import RLConfig
from jaxalign.rollout.rewards import REWARDS, RuleRewards
from jaxalign.train import check_stages, parse_stages
from jaxalign.trainer import build_run
from jaxalign.verifiers import VerifierPool, ifeval, registry

RECIPE = "jaxalign/recipes/ifeval_grpo.yaml"


@pytest.fixture(scope="module")
def tokenizer(data_dir):
  return PreTrainedTokenizerFast(tokenizer_file=str(data_dir / "tokenizers/gpt2/tokenizer.json"),
                                 eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def pool():
  with VerifierPool(workers=2, timeout_s=10.0, preload=registry.PRELOAD) as p:
    yield p


def _rows(tokenizer, texts, width=24):
  """Completion rows [R, width] (EOS then padding) and their masks."""
  ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
  tokens = np.zeros((len(ids), width), np.int32)
  mask = np.zeros((len(ids), width), np.int32)
  for row, seq in enumerate(ids):
    tokens[row, :len(seq)], mask[row, :len(seq) - 1] = seq, 1
  return jnp.asarray(tokens), jnp.asarray(mask)


def test_math_and_format_rewards_run_in_the_pool_inside_jit(tokenizer, pool, data_dir):
  gold = json.loads((data_dir / "gsm8k/train.jsonl").read_text().splitlines()[0])["answer"]  # ... #### 72
  reward = RuleRewards(tokenizer, {0: gold}, {"math_verify": 1.0, "answer_format": 0.1, "gsm8k_exact": 0.5}, pool)
  tokens, mask = _rows(tokenizer, ["So she sold \\boxed{72} clips.", "#### 72", "#### 27", "about 72"])
  scores, metrics = jax.jit(reward)(jnp.zeros(4, jnp.int32), tokens, mask)
  # boxed: right + format; '####': right + format + exact match; wrong; right (last number) without a format
  np.testing.assert_allclose(scores, [1.1, 1.6, 0.1, 1.0], rtol=1e-6)
  assert sorted(metrics) == ["reward/host_seconds", "reward/verifier_errors", "reward/verifier_seconds",
                             "reward/verifier_timeouts"]
  assert float(metrics["reward/verifier_timeouts"]) == float(metrics["reward/verifier_errors"]) == 0.0
  assert 0.0 < float(metrics["reward/verifier_seconds"]) <= float(metrics["reward/host_seconds"])


def test_ifeval_rewards_are_prompt_level_strict_and_loose(tokenizer, pool):
  answer = ifeval.encode(["change_case:english_lowercase", "punctuation:no_comma"], [{}, {}])
  reward = RuleRewards(tokenizer, {7: answer}, {"ifeval_strict": 1.0, "ifeval_loose": 0.5}, pool)
  texts = ["all lowercase and no commas here", "Sure!\nall lowercase and no commas here", "lowercase, but a comma"]
  tokens, mask = _rows(tokenizer, texts)
  scores, _ = jax.jit(reward)(jnp.full(3, 7, jnp.int32), tokens, mask)
  np.testing.assert_allclose(scores, [1.5, 0.5, 0.0])  # both; loose only (first line cut); a comma: neither


def test_verifier_rewards_refuse_what_they_cannot_score(tokenizer, pool):
  assert set(registry.VERIFIERS) <= set(REWARDS)
  with pytest.raises(ValueError, match="run in a VerifierPool; none was given"):
    RuleRewards(tokenizer, {0: "#### 1"}, {"math_verify": 1.0})
  with pytest.raises(ValueError, match="read IFEval instructions, but example 0 has none"):
    RuleRewards(tokenizer, {0: "#### 1"}, {"ifeval_loose": 1.0}, pool)
  with pytest.raises(ValueError, match="rl.verifier_workers=0 must be >= 1"):
    RLConfig(verifier_workers=0)


def test_ifeval_recipe_parses_with_known_rewards():
  (cfg,) = parse_stages(RECIPE, [])
  check_stages([cfg])
  assert cfg.algorithm == "grpo" and cfg.data.format == "prompt" and cfg.init_from
  assert set(cfg.rl.rewards) <= set(REWARDS) and cfg.rl.rewards == {"ifeval_strict": 1.0}
  assert cfg.rl.verifier_workers >= 1 and cfg.rl.verifier_timeout_s > 0


def test_ifeval_recipe_runs_a_step_on_the_shared_prompts(tmp_path, data_dir):
  """The recipe with a tiny model from scratch (no HF model here), one jitted step (no eval): the IFEval reader
  carries each prompt's instructions to the reward, and the step reports the verifier metrics."""
  (cfg,) = parse_stages(RECIPE, [
    "init_from=null", f"run_dir={tmp_path / 'run'}", f"tokenizer={data_dir / 'tokenizers/gpt2/tokenizer.json'}",
    f"data.train=[{data_dir / 'ifeval/input_data.jsonl'}]", "data.limit=16", "data.batch_size=2",
    "data.max_length=144", "data.max_prompt_length=128", "rl.group_size=2", "rl.max_new_tokens=8",
    "rl.verifier_workers=1", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "model.family=llama",
    "model.vocab_size=50257", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1",
    "model.num_heads=2", "model.num_kv_heads=1", "model.max_position_embeddings=256", "model.remat=none"])
  run = build_run(cfg)
  try:
    assert all(ifeval.decode(e.answer) for e in run.train_data.examples)  # every prompt keeps its instructions
    with sharding.use_mesh(run.mesh, cfg.mesh.rules):
      _, metrics = jax.jit(run.train_fn)(run.state, run.next_batch(), run.frozen)
  finally:
    run.verifier_pool.close()
  assert float(metrics["reward/verifier_timeouts"]) == float(metrics["reward/verifier_errors"]) == 0.0
  assert float(metrics["reward/verifier_seconds"]) > 0.0 and np.isfinite(float(metrics["loss"]))
