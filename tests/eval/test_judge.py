"""LLM-as-judge: the verdict probabilities equal the judge's own next-token softmax over the choice tokens, and the
pairwise task cancels a judge's position bias (a first-position judge gives a tie, a fair one the true winner)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import PreTrainedTokenizerFast

from jaxalign.eval import judge as judging
from jaxalign.eval import policy as models
from jaxalign.eval import tasks
from jaxalign.eval.__main__ import parse
from jaxalign.models import CausalLM, save_hf, tiny


@pytest.fixture(scope="module")
def judge_dir(data_dir, tmp_path_factory):
  """A tiny random causal LM with GPT-2's tokenizer (letters and digits are single tokens there)."""
  tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(data_dir / "tokenizers/gpt2/tokenizer.json"),
                                      eos_token="<|endoftext|>", pad_token="<|endoftext|>")
  cfg = tiny("llama", vocab_size=50304, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
  return save_hf(CausalLM(cfg, rngs=nnx.Rngs(3)), cfg, tmp_path_factory.mktemp("judge") / "hf", tokenizer=tokenizer)


def test_choice_probabilities_are_the_judges_softmax_over_the_choice_tokens(judge_dir):
  judge = models.load(str(judge_dir))
  texts = ["Which is better? Verdict:", "A much longer question about the two answers shown here. Verdict:",
           "Rating:"]
  probs = judging.choice_probs(judge, texts, judging.VERDICTS, batch_size=2)
  ids = judging.choice_ids(judge.tokenizer, judging.VERDICTS)
  for text, row in zip(texts, probs):
    tokens = judge.tokenizer(text)["input_ids"]
    logits = np.asarray(judge.model(jnp.asarray([tokens])), np.float64)[0, -1, ids]  # float64 reference
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(row, expected, rtol=1e-5)
  ratings = judging.ratings(judge, ["q"], ["a"], batch_size=1)
  assert 1.0 <= ratings[0] <= 5.0


@pytest.mark.parametrize("bias,win_rate,consistency,first", [("first_position", 0.5, 0.0, 1.0),
                                                             ("fair", 1.0, 1.0, 0.5)])
def test_pairwise_judging_in_both_orders_cancels_position_bias(judge_dir, tmp_path, monkeypatch, bias, win_rate,
                                                               consistency, first):
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(4)))
  completions = iter([["GOOD"] * 4, ["BAD"] * 4])  # the policy's, then the baseline's
  monkeypatch.setattr(models, "complete", lambda loaded, prompts, cfg, **kw: next(completions))

  def scripted(judge, texts, choices, *, batch_size):
    """A judge that always picks the first response, or one that picks the GOOD one wherever it is shown."""
    def pick(text):
      a = text.split("[The Start of Assistant A's Answer]\n")[1].split("\n")[0]
      return 0 if bias == "first_position" or a == "GOOD" else 1
    return np.eye(3)[[pick(t) for t in texts]]

  monkeypatch.setattr(judging, "choice_probs", scripted)
  cfg = parse(None, [f"policy={judge_dir}", f"baseline={judge_dir}", f"judge_model={judge_dir}", "tasks=[judge]",
                     f"judge.data=[{path}]", "bootstrap_resamples=50"])
  loaded = models.load(str(judge_dir))
  result = tasks.judged(tasks.Context(cfg, loaded, None, loaded, None, loaded))
  assert result.metrics["win_rate"].estimate == win_rate
  assert result.metrics["consistency"] == consistency
  assert result.metrics["first_position_win_rate"] == first
  assert result.metrics["win_rate/policy_first"].estimate == 1.0  # the raw single-order rate: fooled by the bias
