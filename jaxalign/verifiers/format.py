"""Final-answer format checks: does a completion end with an answer a checker can read?

Two conventions count: GSM8K's `#### <number>` line (Cobbe et al. 2021, arXiv:2110.14168) and a LaTeX
`\\boxed{...}` answer (the MATH convention, Hendrycks et al. 2021, arXiv:2103.03874). Used as a small shaping
reward beside a correctness reward, and by `jaxalign.verifiers.math` to find the answer to check.
"""

from __future__ import annotations

import re

_GSM8K = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def gsm8k_final(text: str) -> str | None:
  """The number of the last `#### <number>` marker (thousands commas removed), or None."""
  matches = _GSM8K.findall(text)
  return matches[-1].replace(",", "") if matches else None


def last_boxed(text: str) -> str | None:
  """The contents of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced, or None (none, or unclosed)."""
  starts = [m.end() for m in _BOXED.finditer(text)]
  if not starts:
    return None
  depth, start = 1, starts[-1]
  for i in range(start, len(text)):
    depth += {"{": 1, "}": -1}.get(text[i], 0)
    if depth == 0:
      return text[start:i]
  return None


def has_final_answer(text: str) -> bool:
  """Whether `text` gives a final answer: a `#### <number>` marker, or a non-empty last `\\boxed{...}`."""
  boxed = last_boxed(text)
  return gsm8k_final(text) is not None or bool(boxed and boxed.strip())


def answer_format(completion: str, answer: str = "") -> float:
  """Reward: 1.0 when the completion states a final answer in a checkable format (`has_final_answer`), else 0.0.

  `answer` (the example's gold) is ignored: the reward has the rule-reward signature (completion, answer).
  """
  del answer
  return float(has_final_answer(completion))
