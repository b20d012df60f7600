"""Math answers (Math-Verify) on real GSM8K solutions, other answer forms, the maj@k canonical string, and the
final-answer format check."""

import json
import re
import threading

import pytest

from jaxalign.verifiers import format as answer_formats
from jaxalign.verifiers import math


@pytest.fixture(scope="module")
def gsm8k(data_dir):
  lines = (data_dir / "gsm8k/train.jsonl").read_text().splitlines()
  return [json.loads(line)["answer"] for line in lines]


def _with_final(solution: str, final: str) -> str:
  return solution.rsplit("####", 1)[0] + "#### " + final


def test_gsm8k_solutions_are_right_and_changed_finals_are_wrong(gsm8k):
  solutions = gsm8k[:40] + [a for a in gsm8k if "," in a.rsplit("####", 1)[1]][:5]  # + thousands separators
  for solution in solutions:
    gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
    assert math.math_reward(solution, solution) == 1.0
    assert math.math_reward(_with_final(solution, str(int(gold) + 1)), solution) == 0.0
    # The reasoning states the right number before the wrong final one: only the final answer counts.
    assert math.math_reward(f"{solution.rsplit('####', 1)[0]}So {gold}? No.\n#### {int(gold) - 1}", solution) == 0.0


def test_answers_in_other_forms_agree_with_a_gsm8k_gold(gsm8k):
  gold = gsm8k[0]  # Natalia: ... #### 72
  assert gold.endswith("#### 72")
  for right in ("#### 72", "#### 72.0", "So she sold \\boxed{72} clips.", "The answer is 72.", "$72$", "72"):
    assert math.math_reward(right, gold) == 1.0, right
  for wrong in ("#### 27", "\\boxed{71}", "The answer is 24.", "72 clips, or 48/2 = 24 in May", "I do not know.", ""):
    assert math.math_reward(wrong, gold) == 0.0, wrong
  negative = next(a for a in gsm8k if re.search(r"#### -\d", a))
  assert math.math_reward(negative, negative) == 1.0
  assert math.math_reward(_with_final(negative, negative.rsplit("#### -", 1)[1]), negative) == 0.0  # sign dropped


def test_latex_golds_compare_by_value():
  assert math.is_correct("so $x = \\boxed{\\frac{1}{2}}$", "\\frac{1}{2}")
  assert math.is_correct("The answer is 0.5", "\\boxed{\\frac12}")
  assert math.is_correct("#### 1,080", "1080")
  assert not math.is_correct("\\boxed{\\frac{1}{3}}", "0.5")
  assert math.is_correct("\\boxed{x^2 + 1}", "1 + x^2")


def test_canonical_answer_groups_equal_answers_for_majority_voting():
  votes = ["#### 72", "So \\boxed{72}.", "The answer is 72.0", "#### 1,080", "\\boxed{\\frac{1}{2}}", "0.5", "nothing"]
  assert [math.canonical_answer(v) for v in votes] == ["72", "72", "72", "1080", "0.5", "0.5", None]
  assert math.canonical_answer("\\boxed{1+x^2}") == math.canonical_answer("\\boxed{x^2+1}")


def test_math_checks_run_off_the_main_thread():
  """Math-Verify's alarm works only on the main thread; elsewhere the checks run without it."""
  results = []
  thread = threading.Thread(target=lambda: results.append((math.math_reward("#### 72", "#### 72"),
                                                           math.canonical_answer("\\boxed{3}"))))
  thread.start()
  thread.join()
  assert results == [(1.0, "3")]


def test_format_checks_find_a_final_answer():
  assert answer_formats.gsm8k_final("a 1,000 b\n#### 1,080") == "1080"
  assert answer_formats.gsm8k_final("#### $ -5") == "-5" and answer_formats.gsm8k_final("no marker") is None
  assert answer_formats.last_boxed("\\boxed{1} then \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
  assert answer_formats.last_boxed("\\boxed{\\frac{1}{2}") is None  # unclosed
  for good in ("so\n#### 42", "the answer is $\\boxed{42}$", "\\fbox{x}"):
    assert answer_formats.answer_format(good, "") == 1.0, good
  for bad in ("the answer is 42", "#### ", "\\boxed{ }", "\\boxed{42"):
    assert answer_formats.answer_format(bad, "") == 0.0, bad
