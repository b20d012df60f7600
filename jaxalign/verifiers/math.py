"""Math answer checking with Hugging Face's Math-Verify (`math_verify.parse` / `math_verify.verify`).

A completion is checked against a gold answer written as GSM8K writes it (a solution ending in `#### 42`), as a
LaTeX `\\boxed{...}` answer (MATH), or as a bare number or expression. When a text has GSM8K's `####` marker,
the number after the last one is the answer (Math-Verify knows no `####` anchor); otherwise Math-Verify extracts
it (a boxed answer first, then "the answer is ...", then the last expression). Equal values in other forms
agree (`72` = `72.0`, `\\frac{1}{2}` = `0.5`, `1,080` = `1080`).

Math-Verify bounds its own parsing and comparison with `signal.alarm`, which works only on a process's main
thread; elsewhere (say a host callback's thread) it runs without that bound, so run these through
`jaxalign.verifiers.pool.VerifierPool` (main thread of a worker process, with a wall-clock limit per call).
"""

from __future__ import annotations

import threading

import math_verify
import sympy

from jaxalign.verifiers.format import gsm8k_final

_ALARM_SECONDS = 5  # Math-Verify's default limit for one parse and one verify, where it can set an alarm


def _alarm() -> int | None:
  return _ALARM_SECONDS if threading.current_thread() is threading.main_thread() else None


def answer_text(text: str) -> str:
  """The part of `text` that states its answer: the number after the last `####` if any, else all of it."""
  final = gsm8k_final(text)
  return text if final is None else final


def parse_gold(answer: str) -> list:
  """Math-Verify's parse of a gold answer (a bare answer is read as if boxed); [] when it has none."""
  text = answer_text(answer).strip()
  if "\\boxed" not in text and "$" not in text:
    text = f"\\boxed{{{text}}}"
  return math_verify.parse(text, parsing_timeout=_alarm())


def parse_completion(completion: str) -> list:
  """Math-Verify's parse of a completion's final answer: [sympy value, its text] ([] when none is found)."""
  return math_verify.parse(answer_text(completion), parsing_timeout=_alarm())


def is_correct(completion: str, answer: str) -> bool:
  """Whether the completion's final answer equals the gold `answer` (Math-Verify's `verify(gold, prediction)`)."""
  gold, predicted = parse_gold(answer), parse_completion(completion)
  return bool(gold and predicted and math_verify.verify(gold, predicted, timeout_seconds=_alarm()))


def math_reward(completion: str, answer: str) -> float:
  """Reward: 1.0 when the completion's final answer is mathematically equal to the gold answer, else 0.0."""
  return float(is_correct(completion, answer))


def canonical_answer(completion: str) -> str | None:
  """A canonical string of the completion's parsed final answer, so majority voting (maj@k) can group equal
  answers; None when no answer is found.

  Real numbers print as an integer when integral, else rounded to 6 decimals (Math-Verify's `float_rounding`):
  `72`, `72.0` and `\\boxed{72}` give "72"; `\\frac{1}{2}` and `0.5` give "0.5". Other expressions print as sympy
  prints them (terms in sympy's order, so `1+x^2` and `x^2+1` agree; `2(x+1)` and `2x+2` do not).
  """
  parsed = parse_completion(completion)
  if not parsed:
    return None
  value = parsed[0]
  if isinstance(value, str):
    return value.strip()
  if isinstance(value, sympy.Integer):
    return str(value)
  if isinstance(value, sympy.Basic) and value.is_number and value.is_real:
    number = float(value)
    return str(int(number)) if number.is_integer() else repr(round(number, 6))
  return str(value)
