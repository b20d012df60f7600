"""Fused ops: token log-probs and entropies from hidden states and the LM head."""

from jaxalign.ops.token_logprobs import naive_token_logprobs, token_logprobs
from jaxalign.ops.vocab_parallel import vocab_parallel_token_logprobs

__all__ = ["naive_token_logprobs", "token_logprobs", "vocab_parallel_token_logprobs"]
