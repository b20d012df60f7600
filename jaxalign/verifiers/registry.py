"""Verifier rewards by name, and the one module-level function a `VerifierPool` worker calls for them.

Each reward is `fn(completion, answer) -> float` in [0, 1], where `answer` is the example's gold as the data
pipeline keeps it (GSM8K's solution text, a bare or boxed answer, or an IFEval prompt's instructions as the
JSON of `ifeval.encode`). The online step runs them through one `VerifierPool` (`rollout.rewards.RuleRewards`).
"""

from __future__ import annotations

from collections.abc import Callable

from jaxalign.verifiers import format as answer_formats
from jaxalign.verifiers import ifeval, math

VERIFIERS: dict[str, Callable[[str, str], float]] = {
  "math_verify": math.math_reward,  # Math-Verify: the completion's final answer equals the gold answer
  "ifeval_strict": ifeval.strict_reward,  # all of the prompt's IFEval instructions followed (strict)
  "ifeval_loose": ifeval.loose_reward,  # all followed, loose (first / last line or '*' removed)
  "answer_format": answer_formats.answer_format,  # a '#### <number>' or final \boxed{...} answer is present
}
# What each verifier reads from the example's answer: a gold answer, or IFEval instructions.
NEEDS_INSTRUCTIONS = frozenset({"ifeval_strict", "ifeval_loose"})
# Modules a worker imports before it takes calls (so no call's time limit pays for them).
PRELOAD = ("jaxalign.verifiers.registry",)


def call(item: tuple[str, str, str]) -> float:
  """`VERIFIERS[name](completion, answer)` for an item (name, completion, answer): what pool workers run."""
  name, completion, answer = item
  return VERIFIERS[name](completion, answer)
