"""Rule rewards: GSM8K exact match on the real data, format reward, weights, and the host callback."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.data import digits_tokenizer
from jaxalign.rollout.rewards import RuleRewards, gsm8k_answer, gsm8k_exact, gsm8k_format


def test_gsm8k_gold_answers_parse_on_the_real_file(data_dir):
  lines = (data_dir / "gsm8k/train.jsonl").read_text().splitlines()
  answers = [json.loads(line)["answer"] for line in lines]
  parsed = [gsm8k_answer(a) for a in answers]
  assert len(parsed) == 7473 and all(p is not None for p in parsed)
  assert sum("," in a.rsplit("####", 1)[1] for a in answers) == 79  # data README: thousands separators
  assert all("," not in p and p.lstrip("-").isdigit() for p in parsed)
  assert sum(p.startswith("-") for p in parsed) == 3
  assert all(gsm8k_exact(a, a) == 1.0 for a in answers[:200])  # the gold solution scores itself


def test_gsm8k_exact_and_format():
  gold = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
  assert gsm8k_exact("so the total is\n#### 72", gold) == 1.0
  assert gsm8k_exact("#### 1,080", "#### 1080") == 1.0
  assert gsm8k_exact("the answer is 72", gold) == 0.0  # no final-answer marker
  assert gsm8k_exact("#### 27", gold) == 0.0
  assert gsm8k_format("#### 5", "") == 1.0 and gsm8k_format("five", "") == 0.0


def test_rule_rewards_decode_weight_and_run_inside_jit():
  tok = digits_tokenizer()
  reward = RuleRewards(tok, {0: "7", 1: "3"}, {"max_digit": 2.0})
  ids = lambda text: tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id, 0]
  tokens = jnp.asarray([ids("7")[:3], ids("3 3")[:3]])
  mask = jnp.asarray([[1, 1, 0], [1, 1, 1]])
  scores, metrics = jax.jit(reward)(jnp.asarray([0, 1]), tokens, mask)
  np.testing.assert_allclose(scores, [2.0, 1.0])  # exact answer; right first digit but more follows
  assert list(metrics) == ["reward/host_seconds"] and float(metrics["reward/host_seconds"]) >= 0.0  # no verifiers
