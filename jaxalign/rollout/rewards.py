"""Rewards for online RL: rule-based functions of (completion text, gold answer), combined with weights.

Rule rewards run in Python on the host, called from inside the jitted step through `jax.pure_callback`
(the one host round trip a step makes; each call times itself and the step reports the cost as
`reward/host_seconds`). The verifier rewards (`jaxalign.verifiers.VERIFIERS`: math_verify, ifeval_strict,
ifeval_loose, answer_format) run inside that callback in one `VerifierPool` of worker processes, each call
limited in wall-clock time (a hang or crash scores 0): the step also reports `reward/verifier_seconds`,
`reward/verifier_timeouts` and `reward/verifier_errors`. Reward models run inside the step (see
`jaxalign.algorithms.online`).
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
from jaxalign.verifiers import ifeval, registry
from jaxalign.verifiers.pool import VerifierPool

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


# Rewards computed in the calling process (cheap string checks on trusted formats).
INLINE: dict[str, Callable[[str, str], float]] = {
  "gsm8k_exact": gsm8k_exact,
  "gsm8k_format": gsm8k_format,
  "sort_exact": synthetic.sort_reward,
  "max_digit": synthetic.max_reward,
}
REWARDS: dict[str, Callable[[str, str], float]] = {**INLINE, **registry.VERIFIERS}
VERIFIER_METRICS = ("reward/verifier_seconds", "reward/verifier_timeouts", "reward/verifier_errors")


def uses_verifiers(weights: dict[str, float]) -> bool:
  """Whether rewards named in `weights` (rl.rewards) run in a `VerifierPool`."""
  return any(name in registry.VERIFIERS for name in weights)


class RuleRewards:
  """Weighted sum of rule rewards over decoded completions; `answers[uid]` is each prompt's gold answer.

  Verifier rewards run in `pool` (required when `weights` names one): one `pool.score` per call, one item per
  (row, verifier), so a verifier that hangs on a row zeroes that reward of that row only.
  """

  def __init__(self, tokenizer, answers: dict[int, str | None], weights: dict[str, float],
               pool: VerifierPool | None = None):
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
      raise ValueError(f"rl.rewards names unknown reward {unknown[0]!r}; available: {sorted(REWARDS)}")
    self.tokenizer, self.answers, self.weights, self.pool = tokenizer, answers, dict(weights), pool
    self.verified = [name for name in self.weights if name in registry.VERIFIERS]
    if self.verified and pool is None:
      raise ValueError(f"rl.rewards {self.verified} run in a VerifierPool; none was given")
    if registry.NEEDS_INSTRUCTIONS & set(self.verified):
      for uid, answer in answers.items():
        try:
          ifeval.decode(answer)
        except ValueError:
          raise ValueError(f"rl.rewards {sorted(registry.NEEDS_INSTRUCTIONS & set(self.verified))} read IFEval "
                           f"instructions, but example {uid} has none (data.train must hold IFEval prompts: "
                           "prompt, instruction_id_list, kwargs)") from None

  def score_texts(self, completions: list[str], answers: list[str | None]) -> tuple[np.ndarray, dict]:
    """Rewards [R] and the verifier metrics (empty when no verifier reward is used)."""
    answers = [answer or "" for answer in answers]
    rewards = np.asarray([sum(w * INLINE[name](text, answer) for name, w in self.weights.items() if name in INLINE)
                          for text, answer in zip(completions, answers)], np.float32)
    if not self.verified:
      return rewards, {}
    items = [(name, text, answer) for text, answer in zip(completions, answers) for name in self.verified]
    scores = self.pool.score(registry.call, items)
    weights = np.asarray([self.weights[name] for name in self.verified], np.float32)
    rewards = rewards + scores.values.reshape(len(completions), len(self.verified)) @ weights
    stats = (scores.seconds, scores.timeouts, scores.errors)
    return rewards, {key: np.asarray(value, np.float32) for key, value in zip(VERIFIER_METRICS, stats)}

  def host(self, uid: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, dict]:
    start = time.perf_counter()
    uid, tokens, mask = np.asarray(uid), np.asarray(tokens), np.asarray(mask)  # no JAX work inside a callback
    texts = [self.tokenizer.decode(row[m > 0], skip_special_tokens=True) for row, m in zip(tokens, mask)]
    rewards, metrics = self.score_texts(texts, [self.answers[int(i)] for i in uid])
    return rewards, {"reward/host_seconds": np.asarray(time.perf_counter() - start, np.float32), **metrics}

  def __call__(self, uid: jax.Array, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict]:
    """Traceable: rewards [R] float32 and metrics: the host seconds the call took (and, with verifier rewards,
    the pool's seconds, timeouts and errors)."""
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    keys = ("reward/host_seconds", *(VERIFIER_METRICS if self.verified else ()))
    shapes = (jax.ShapeDtypeStruct(uid.shape, jnp.float32), {key: scalar for key in keys})
    # Gather the operands explicitly (replicated) so the callback sees whole arrays on every mesh shape.
    uid, tokens, mask = (sharding.constrain(x, (None,) * x.ndim) for x in (uid, tokens, mask))
    return jax.pure_callback(self.host, shapes, uid, tokens, mask)
