"""A built-in task with a known ground truth, for the default run and tests: sort a list of digits.

The prompt asks to sort 3-7 digits; the correct completion is the sorted list. Preference pairs set
the correct answer against a near miss (two neighbours swapped, a digit changed, or one dropped), so
whether a model prefers the right answer is exactly measurable. The tokenizer is a word-level HF
tokenizer built in memory, with a chat template, so the task runs through the same data pipeline
as real datasets and needs no files.
"""

from __future__ import annotations

import functools

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<assistant>"]
WORDS = [str(d) for d in range(10)] + ["sort", ":", "max"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def digits_tokenizer() -> PreTrainedTokenizerFast:
  """Word-level tokenizer over digits and a few markers (vocab 18), with a chat template."""
  vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
  core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                      pad_token="<pad>", unk_token="<unk>")
  tokenizer.chat_template = CHAT_TEMPLATE
  return tokenizer


def _near_miss(answer: list[int], rng: np.random.Generator) -> list[int]:
  wrong = list(answer)
  kind = rng.integers(3)
  if kind == 0 and len(set(wrong)) > 1:  # swap two neighbours that differ
    i = rng.choice([i for i in range(len(wrong) - 1) if wrong[i] != wrong[i + 1]])
    wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
  elif kind == 1:  # change one digit
    i = rng.integers(len(wrong))
    wrong[i] = (wrong[i] + rng.integers(1, 10)) % 10
  else:  # drop one digit
    del wrong[rng.integers(len(wrong))]
  return wrong if wrong != answer else answer[:-1]


def _text(digits: list[int]) -> str:
  return " ".join(map(str, digits))


def sort_records(num: int, seed: int, kind: str = "preference", min_len: int = 3, max_len: int = 7,
                 ambiguous: bool = False) -> list[dict]:
  """`num` records of the digit-sorting task.

  kind: "sft" (messages + completion), "preference" (prompt/chosen/rejected, with graded scores), "unpaired" (KTO:
  completion + label), "ranked" (the answer and two near misses, scores 2/1/0), "prompt" (prompt
  only, with the gold answer for rule rewards).
  ambiguous ("sort_updown"): the demonstrations sort up or down, half each, so SFT leaves the direction to chance;
  the preference pairs prefer up over down, and the answer (the true reward's) is up.
  """
  rng = np.random.default_rng(seed)
  records = []
  for _ in range(num):
    digits = rng.integers(0, 10, size=rng.integers(min_len, max_len + 1)).tolist()
    prompt = [{"role": "user", "content": f"sort : {_text(digits)}"}]
    answer = sorted(digits)
    down = answer[::-1]
    if kind == "sft":
      records.append({"prompt": prompt, "completion": _text(down if ambiguous and rng.integers(2) else answer)})
    elif kind == "preference":
      rejected = down if ambiguous and down != answer else _near_miss(answer, rng)
      records.append({"prompt": prompt, "chosen": _text(answer), "rejected": _text(rejected),
                      "score_chosen": sort_score(answer, answer), "score_rejected": sort_score(rejected, answer)})
    elif kind == "unpaired":
      good = bool(rng.integers(2))
      completion = answer if good else _near_miss(answer, rng)
      records.append({"prompt": prompt, "completion": _text(completion), "label": good})
    elif kind == "ranked":
      misses = [_near_miss(answer, rng) for _ in range(2)]
      if misses[0] == misses[1]:
        misses[1] = misses[1][:-1] if len(misses[1]) > 1 else misses[1] + [9]
      records.append({"prompt": prompt, "responses": [_text(answer)] + [_text(m) for m in misses],
                      "scores": [2.0, 1.0, 0.0]})
    elif kind == "prompt":
      records.append({"prompt": prompt, "answer": _text(answer)})
    else:
      raise ValueError(f"unknown synthetic record kind {kind!r}")
  return records


def sort_score(digits: list[int], answer: list[int]) -> float:
  """A graded reward-model-like score of a sorting attempt: 4 x the fraction of the answer's positions it gets
  right (a soft label for preference distillation: sigma(4 - 4 x 2/3) = 0.79 for one digit wrong of three)."""
  return 4.0 * sum(a == b for a, b in zip(digits, answer)) / len(answer)


def sort_reward(completion: str, answer: str) -> float:
  """Ground-truth reward: 1 for the exactly sorted list, else 0."""
  return float(completion.split() == answer.split())


def max_records(num: int, seed: int, kind: str = "prompt", min_len: int = 3, max_len: int = 6) -> list[dict]:
  """The "largest digit" task: a verifiable task that RL can learn from scratch (the answer is one token).

  kind: "prompt" (prompt + gold answer, for rule rewards) or "sft" (prompt + completion).
  """
  if kind not in ("prompt", "sft"):
    raise ValueError(f"synthetic:max has no {kind!r} records; use data.format=prompt or sft")
  rng = np.random.default_rng(seed)
  records = []
  for _ in range(num):
    digits = rng.integers(0, 10, size=rng.integers(min_len, max_len + 1)).tolist()
    prompt = [{"role": "user", "content": f"max : {_text(digits)}"}]
    answer = str(max(digits))
    records.append({"prompt": prompt, "answer": answer} if kind == "prompt" else
                   {"prompt": prompt, "completion": answer})
  return records


def max_reward(completion: str, answer: str) -> float:
  """1 for exactly the largest digit, 0.5 when it comes first but more follows, else 0."""
  words = completion.split()
  return 1.0 if words == [answer] else 0.5 if words[:1] == [answer] else 0.0


TASKS = {"sort": sort_records, "sort_updown": functools.partial(sort_records, ambiguous=True), "max": max_records}
