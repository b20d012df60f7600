"""Rewards for online RL: rule-based functions of (completion text, gold answer), combined with weights.

Rule rewards run in Python on the host, called from inside the jitted step through `jax.pure_callback`
(the one host round trip a step makes; each call times itself and the step reports the cost as
`reward/host_seconds`). Reward models run inside the step (see `jaxalign.algorithms.online`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import sharding
from jaxalign.data import synthetic

_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def gsm8k_answer(text: str) -> str | None:
  """The number after the last '####' (commas removed), as GSM8K writes its gold answers; None if absent."""
  if "####" not in text:
    return None
  match = _NUMBER.search(text.rsplit("####", 1)[1])
  return match.group(0).replace(",", "") if match else None


def gsm8k_exact(completion: str, answer: str) -> float:
  """1 when the completion's '#### <number>' equals the gold answer's (GSM8K final-answer exact match)."""
  predicted = gsm8k_answer(completion)
  gold = gsm8k_answer(answer) or answer.strip().replace(",", "")
  return float(predicted is not None and predicted == gold)


def gsm8k_format(completion: str, answer: str) -> float:
  """1 when the completion ends its reasoning with a '#### <number>' line (format reward)."""
  del answer
  return float(gsm8k_answer(completion) is not None)


REWARDS: dict[str, Callable[[str, str], float]] = {
  "gsm8k_exact": gsm8k_exact,
  "gsm8k_format": gsm8k_format,
  "sort_exact": synthetic.sort_reward,
  "max_digit": synthetic.max_reward,
}


class RuleRewards:
  """Weighted sum of rule rewards over decoded completions; `answers[uid]` is each prompt's gold answer."""

  def __init__(self, tokenizer, answers: list[str | None], weights: dict[str, float]):
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
      raise ValueError(f"rl.rewards names unknown reward {unknown[0]!r}; available: {sorted(REWARDS)}")
    self.tokenizer, self.answers, self.weights = tokenizer, answers, dict(weights)

  def score_texts(self, completions: list[str], answers: list[str | None]) -> np.ndarray:
    return np.asarray([sum(w * REWARDS[name](text, answer or "") for name, w in self.weights.items())
                       for text, answer in zip(completions, answers)], np.float32)

  def host(self, uid: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    start = time.perf_counter()
    uid, tokens, mask = np.asarray(uid), np.asarray(tokens), np.asarray(mask)  # no JAX work inside a callback
    texts = [self.tokenizer.decode(row[m > 0], skip_special_tokens=True) for row, m in zip(tokens, mask)]
    rewards = self.score_texts(texts, [self.answers[int(i)] for i in uid])
    return rewards, np.asarray(time.perf_counter() - start, np.float32)

  def __call__(self, uid: jax.Array, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Traceable: rewards [R] float32 and the host seconds the call took."""
    shapes = (jax.ShapeDtypeStruct(uid.shape, jnp.float32), jax.ShapeDtypeStruct((), jnp.float32))
    # Gather the operands explicitly (replicated) so the callback sees whole arrays on every mesh shape.
    uid, tokens, mask = (sharding.constrain(x, (None,) * x.ndim) for x in (uid, tokens, mask))
    return jax.pure_callback(self.host, shapes, uid, tokens, mask)
