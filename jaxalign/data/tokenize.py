"""Tokenisation of examples: prompt through the chat template, responses + EOS, explicit truncation.

Prompt and responses are tokenised separately and concatenated, so the prompt tokens are identical
for every response of an example and the loss mask is exact (no token merges across the boundary).
Truncation policy: a prompt longer than `max_prompt_length` keeps its last tokens (the generation
prompt stays); a response keeps its first tokens up to `max_length` in total (it then has no EOS).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from jaxalign.data.formats import Example, Prompt
from jaxalign.data.readers import DataError


@dataclasses.dataclass(frozen=True)
class Encoded:
  """Token ids of one example: the prompt, and each response (EOS appended)."""

  prompt: np.ndarray  # [P] int32
  responses: tuple[np.ndarray, ...]  # each [R_i] int32
  scores: tuple[float, ...] = ()
  answer: str | None = None
  margin: float | None = None  # preference pairs: the reward model's margin from the data
  ref_logps: tuple[float, ...] = ()  # cached reference log-probs of each response (reference.mode=precomputed)
  uid: int = -1  # position in its split (prompt batches carry it so host-side rewards find the answer)

  @property
  def length(self) -> int:
    return len(self.prompt) + max((len(r) for r in self.responses), default=0)


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
  """Chat-template rendering for message lists; raw text (with BOS when distinct from EOS) otherwise."""
  if isinstance(prompt, list):
    if not getattr(tokenizer, "chat_template", None):
      raise DataError("the data has chat messages but the tokenizer has no chat template")
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
  ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
  bos = tokenizer.bos_token_id
  if bos is not None and bos != tokenizer.eos_token_id and (not ids or ids[0] != bos):
    ids = [bos] + ids
  return ids


def encode_example(tokenizer, example: Example, max_length: int, max_prompt_length: int,
                   counts: collections.Counter) -> Encoded:
  """Tokenise and truncate one example (truncations are tallied in `counts`)."""
  prompt = prompt_ids(tokenizer, example.prompt)
  if len(prompt) > max_prompt_length:
    prompt = prompt[-max_prompt_length:]
    counts["prompt truncated"] += 1
  budget = max_length - len(prompt)
  responses = []
  for text in example.responses:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(ids) > budget:
      ids = ids[:budget]
      counts["response truncated"] += 1
    responses.append(np.asarray(ids, np.int32))
  return Encoded(np.asarray(prompt, np.int32), tuple(responses), example.scores, example.answer, example.margin)


def check_vocab(tokenizer, vocab_size: int, where: str = "tokenizer") -> None:
  """A tokenizer whose ids do not fit the model's embedding is a configuration error."""
  if len(tokenizer) > vocab_size:
    raise DataError(f"{where} has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}; "
                    "use the model's own tokenizer or resize the model")


def check_same_tokenizer(reference, other, where: str) -> None:
  """`other` (e.g. a reward model's tokenizer) must map text to the same ids as `reference` (the policy's).

  Every token of the policy's must have the same id in `other`, and EOS must agree; tokens only `other` has
  (say an added pad token, which the policy never emits) and the pad id do not matter (padding is masked by
  segment ids). A difference is a `DataError` naming `where` and the first thing that differs. (Not `ConfigError`:
  jaxalign.config imports the data pipeline, which imports this module.)
  """
  difference = _tokenizer_difference(reference, other)
  if difference is not None:
    raise DataError(f"{where}: {difference}: the same ids would mean other tokens; use a model trained with the "
                    "policy's tokenizer")


def _tokenizer_difference(reference, other) -> str | None:
  """The first difference between two tokenizers, worded as 'its ..., the policy's ...' (None: the same)."""
  if len(other) < len(reference):
    return f"its tokenizer has {len(other)} tokens, the policy's has {len(reference)}"
  ours, theirs = reference.get_vocab(), other.get_vocab()
  for token, i in sorted(ours.items(), key=lambda kv: kv[1]):
    if theirs.get(token) != i:
      found = "is missing" if token not in theirs else f"has id {theirs[token]}"
      return f"token {token!r} {found} in its tokenizer, id {i} in the policy's"
  for name in ("eos_token_id", "bos_token_id"):
    if _special_id(other, name) != _special_id(reference, name):
      return f"its {name} is {_special_id(other, name)}, the policy's is {_special_id(reference, name)}"
  return None


def _special_id(tokenizer, name: str) -> int | None:
  """A special-token id; a missing pad token counts as EOS (what padding uses)."""
  return pad_id(tokenizer) if name == "pad_token_id" else getattr(tokenizer, name)


def pad_id(tokenizer) -> int | None:
  """The id rows are padded with: the tokenizer's pad token, or its EOS when it has none."""
  return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
