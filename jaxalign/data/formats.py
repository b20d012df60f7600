"""Record -> example parsing for each data format, with skip counts for unusable examples.

A prompt is either raw text (used as is) or a list of chat messages (rendered with the tokenizer's
chat template). Accepted record layouts:

- sft:        {prompt, completion} | {messages: [..., {role: assistant, content}]} | {text}
- preference: {prompt, chosen, rejected} (strings or assistant message lists) | HH-RLHF {chosen, rejected}
              full dialogues, split at the last "\\n\\nAssistant:" of their longest common prefix; optional
              score_chosen / score_rejected (a reward model's scores: preference distillation's soft labels,
              as in UltraFeedback) and margin (a reward model's preference-strength margin, Llama 2)
- unpaired:   {prompt, completion, label: bool} (KTO)
- ranked:     {prompt, responses: [...], scores: [...]} (higher score = better)
- prompt:     {prompt} or {question} (+ optional answer, for rule-based rewards), or HH-RLHF pairs (their
              shared dialogue history up to the last "Assistant:"), or IFEval {prompt, instruction_id_list,
              kwargs} (the instructions, as `verifiers.ifeval.encode`'s JSON, are the answer the ifeval rewards read)
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any

from jaxalign.data.readers import DataError

Prompt = str | list[dict]
FORMATS = ("sft", "preference", "unpaired", "ranked", "prompt")
HH_ASSISTANT = "\n\nAssistant:"


@dataclasses.dataclass(frozen=True)
class Example:
  """One parsed example; `responses` has 1 (sft/unpaired), 2 (chosen, rejected) or K entries."""

  prompt: Prompt
  responses: tuple[str, ...] = ()
  # ranked: per-response score; unpaired: (1.0,) desirable / (0.0,) not; preference: (chosen, rejected) scores
  scores: tuple[float, ...] = ()
  margin: float | None = None  # preference: the reward model's margin for this pair
  answer: str | None = None  # prompt format: gold answer for rule rewards (IFEval: the prompt's instructions)


def split_hh_dialogues(chosen: str, rejected: str) -> tuple[str, str, str]:
  """(prompt, chosen response, rejected response) from two HH-RLHF dialogues sharing a history."""
  common = os.path.commonprefix([chosen, rejected])
  cut = common.rfind(HH_ASSISTANT)
  if cut < 0:
    raise ValueError("the two dialogues share no 'Assistant:' turn")
  cut += len(HH_ASSISTANT)
  return chosen[:cut], chosen[cut:], rejected[cut:]


def _field(record: dict, key: str, where: str) -> Any:
  if key not in record:
    raise DataError(f"{where}: missing field '{key}' (fields present: {sorted(record)})")
  return record[key]


def _response_text(value: Any, key: str, where: str) -> str:
  """A response given as text or as a list of (assistant) messages."""
  if isinstance(value, str):
    return value
  if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
    return value[-1]["content"]
  raise DataError(f"{where}: field '{key}' must be a string or a list of messages")


def _prompt(value: Any, where: str) -> Prompt:
  if isinstance(value, str):
    return value
  if isinstance(value, list) and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value):
    return value
  raise DataError(f"{where}: field 'prompt' must be a string or a list of {{role, content}} messages")


def parse_sft(record: dict, where: str) -> Example:
  if "messages" in record:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
      raise DataError(f"{where}: field 'messages' must end with an assistant message")
    return Example(_prompt(messages[:-1], where), (messages[-1]["content"],))
  if "text" in record and "completion" not in record:
    return Example("", (_response_text(record["text"], "text", where),))
  return Example(_prompt(_field(record, "prompt", where), where),
                 (_response_text(_field(record, "completion", where), "completion", where),))


def _number(record: dict, key: str, where: str) -> float:
  value = record[key]
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise DataError(f"{where}: field '{key}' must be a number, got {value!r}")
  return float(value)


def parse_preference(record: dict, where: str) -> Example:
  chosen = _response_text(_field(record, "chosen", where), "chosen", where)
  rejected = _response_text(_field(record, "rejected", where), "rejected", where)
  scored = [k in record for k in ("score_chosen", "score_rejected")]
  if any(scored) and not all(scored):
    raise DataError(f"{where}: 'score_chosen' and 'score_rejected' come together; this record has one")
  scores = tuple(_number(record, k, where) for k in ("score_chosen", "score_rejected")) if all(scored) else ()
  margin = _number(record, "margin", where) if "margin" in record else None
  if "prompt" not in record:
    try:
      prompt, chosen, rejected = split_hh_dialogues(chosen, rejected)
    except ValueError as e:
      raise DataError(f"{where}: no field 'prompt', and not HH-RLHF dialogues: {e}") from None
    return Example(prompt, (chosen, rejected), scores, margin=margin)
  return Example(_prompt(record["prompt"], where), (chosen, rejected), scores, margin=margin)


def parse_unpaired(record: dict, where: str) -> Example:
  label = _field(record, "label", where)
  if not isinstance(label, bool):
    raise DataError(f"{where}: field 'label' must be true (desirable) or false, got {label!r}")
  completion = _response_text(_field(record, "completion", where), "completion", where)
  return Example(_prompt(_field(record, "prompt", where), where), (completion,), (float(label),))


def parse_ranked(record: dict, where: str) -> Example:
  responses = _field(record, "responses", where)
  scores = _field(record, "scores", where)
  if not isinstance(responses, list) or not isinstance(scores, list) or len(responses) != len(scores):
    raise DataError(f"{where}: 'responses' and 'scores' must be lists of equal length")
  if len(responses) < 2:
    raise DataError(f"{where}: a ranked example needs at least 2 responses")
  texts = tuple(_response_text(r, f"responses[{i}]", where) for i, r in enumerate(responses))
  return Example(_prompt(_field(record, "prompt", where), where), texts, tuple(float(s) for s in scores))


def parse_prompt(record: dict, where: str) -> Example:
  if "prompt" not in record and "question" not in record and {"chosen", "rejected"} <= set(record):
    return Example(parse_preference(record, where).prompt)  # HH-RLHF pairs: their shared history
  key = "prompt" if "prompt" in record else "question"
  prompt = _prompt(_field(record, key, where), where)
  if "instruction_id_list" in record:
    return Example(prompt, answer=_ifeval_answer(record, where))
  return Example(prompt, answer=record.get("answer"))


def _ifeval_answer(record: dict, where: str) -> str:
  """An IFEval prompt's instructions (ids and kwargs) as one string, checked against the known instruction types."""
  from jaxalign.verifiers import ifeval  # here, not at the top: the verifiers import Math-Verify (sympy)

  try:
    return ifeval.encode(record["instruction_id_list"], _field(record, "kwargs", where))
  except ValueError as error:
    raise DataError(f"{where}: IFEval record: {error}") from None


PARSERS = {"sft": parse_sft, "preference": parse_preference, "unpaired": parse_unpaired,
           "ranked": parse_ranked, "prompt": parse_prompt}


def skip_reason(example: Example, fmt: str) -> str | None:
  """Why an example cannot train (counted and reported), or None."""
  if fmt != "prompt" and any(not r.strip() for r in example.responses):
    return "empty response"
  if fmt in ("preference", "ranked") and len(set(example.responses)) < len(example.responses):
    return "identical responses"
  return None


def parse_records(records, fmt: str) -> tuple[list[Example], collections.Counter]:
  """Parse (record, where) pairs; returns the usable examples and the counts of skipped ones."""
  if fmt not in PARSERS:
    raise DataError(f"unknown data format {fmt!r}; choose one of {FORMATS}")
  parse, examples, skipped = PARSERS[fmt], [], collections.Counter()
  for record, where in records:
    example = parse(record, where)
    reason = skip_reason(example, fmt)
    if reason:
      skipped[reason] += 1
    else:
      examples.append(example)
  return examples, skipped
