"""LLM-as-judge with any local causal LM (Zheng et al. 2023, "Judging LLM-as-a-Judge", MT-Bench prompts).

The judge's verdict is read from its next-token distribution after the prompt, restricted to the verdict tokens
and renormalised (the first token of " A" / " B" / " C", or of each rating " 1" .. " 5"): no sampling, no parsing
of free text, and a rating is the expected value under that distribution.

- pairwise: the policy's and the baseline's responses, judged in both orders; a verdict counts only when both
  orders agree (position bias measured: consistency and the first position's win rate, then cancelled);
- single-answer grading: a 1-5 rating of the policy's response, optionally reference-guided (the example's
  answer shown to the judge as the reference).
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp
from flax import nnx

from jaxalign.config import ConfigError
from jaxalign.data.tokenize import pad_id, prompt_ids
from jaxalign.eval.policy import Loaded, over_batches

PAIRWISE = (
  "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
  "the user question displayed below. Avoid any position biases and do not let the length of the responses "
  "influence your evaluation. Output your final verdict: \"A\" if assistant A is better, \"B\" if assistant B is "
  "better, and \"C\" for a tie.\n\n[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{a}\n"
  "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{b}\n"
  "[The End of Assistant B's Answer]\n\nVerdict:")
SINGLE = (
  "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the "
  "user question displayed below.{guide} Rate the response on a scale of 1 to 5.\n\n[Question]\n{question}\n\n"
  "{reference}[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]\n\nRating:")
REFERENCE = "[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n"
VERDICTS = (" A", " B", " C")  # +1 (A better), -1 (B better), 0 (tie)
RATINGS = tuple(f" {r}" for r in range(1, 6))


def question_text(prompt) -> str:
  """A prompt as the judge sees it: raw text, or the chat messages' contents."""
  return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def choice_ids(tokenizer, choices: tuple[str, ...]) -> list[int]:
  """The first token of each choice; a ConfigError when two choices share it."""
  ids = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in choices]
  if len(set(ids)) != len(ids):
    raise ConfigError(f"judge tokenizer: the verdict choices {choices} do not start with distinct tokens")
  return ids


@nnx.jit
def _last_logits(model, ids, mask):
  return model.logits(model.hidden_states(ids, mask)[:, -1])  # [B, V] at each row's last (real) token


def choice_probs(judge: Loaded, texts: list[str], choices: tuple[str, ...], *, batch_size: int,
                 max_length: int = 4096) -> np.ndarray:
  """The judge's next-token probabilities [N, C] after each text, over the choices' first tokens, renormalised.
  The texts are user messages under a chat template when the judge's tokenizer has one; rows longer than
  `max_length` keep their last tokens."""
  tok = judge.tokenizer
  ids = choice_ids(tok, choices)
  as_prompt = (lambda t: [{"role": "user", "content": t}]) if getattr(tok, "chat_template", None) else (lambda t: t)
  rows = [prompt_ids(tok, as_prompt(t))[-max_length:] for t in texts]
  logits = over_batches(lambda x, mask: _last_logits(judge.model, x, mask)[:, jnp.asarray(ids)], rows, pad_id(tok),
                        batch_size, "judging")
  probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return probs / probs.sum(axis=-1, keepdims=True)


def verdicts(probs: np.ndarray) -> np.ndarray:
  """+1 / -1 / 0 (first response better / second / tie) from probabilities [N, 3] over `VERDICTS`."""
  return np.asarray([1.0, -1.0, 0.0])[np.argmax(probs, axis=-1)]


def pairwise(judge: Loaded, questions: list[str], ours: list[str], theirs: list[str], *,
             batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Verdicts about (ours, theirs) [N] with ours shown first, and with theirs shown first (restated about ours:
  +1 ours better)."""
  first = [PAIRWISE.format(question=q, a=a, b=b) for q, a, b in zip(questions, ours, theirs)]
  second = [PAIRWISE.format(question=q, a=b, b=a) for q, a, b in zip(questions, ours, theirs)]
  a_first = verdicts(choice_probs(judge, first, VERDICTS, batch_size=batch_size))
  b_first = -verdicts(choice_probs(judge, second, VERDICTS, batch_size=batch_size))
  return a_first, b_first


def ratings(judge: Loaded, questions: list[str], answers: list[str], references: list[str] | None = None, *,
            batch_size: int) -> np.ndarray:
  """Expected 1-5 ratings [N] of the answers (reference-guided when `references` are given)."""
  texts = []
  for i, (q, a) in enumerate(zip(questions, answers)):
    reference = "" if references is None else REFERENCE.format(reference=references[i])
    guide = "" if references is None else " Compare the assistant's answer with the reference answer."
    texts.append(SINGLE.format(question=q, answer=a, reference=reference, guide=guide))
  probs = choice_probs(judge, texts, RATINGS, batch_size=batch_size)
  return probs @ np.arange(1.0, len(RATINGS) + 1)
