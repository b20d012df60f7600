"""Verifiers shared by evaluation and RL rewards: math answers (Math-Verify), IFEval instruction following,
answer format, and a process pool that bounds each call's wall-clock time."""

from jaxalign.verifiers.format import answer_format, gsm8k_final, has_final_answer, last_boxed
from jaxalign.verifiers.ifeval import INSTRUCTIONS, follows, follows_instruction, loose_variants
from jaxalign.verifiers.math import canonical_answer, is_correct, math_reward
from jaxalign.verifiers.pool import Scores, VerifierPool
from jaxalign.verifiers.registry import VERIFIERS

# The submodules `format` and `math` are reachable as attributes but left out of `*` (they would shadow the builtin
# and the standard module).
__all__ = ["INSTRUCTIONS", "Scores", "VERIFIERS", "VerifierPool", "answer_format", "canonical_answer", "follows",
           "follows_instruction", "gsm8k_final", "has_final_answer", "ifeval", "is_correct", "last_boxed",
           "loose_variants", "math_reward", "registry"]
