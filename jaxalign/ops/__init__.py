"""Fused ops: token log-probs and entropies from hidden states and the LM head; memory-efficient attention."""

from jaxalign.ops.attention import attention
from jaxalign.ops.token_logprobs import naive_token_logprobs, token_logprobs
from jaxalign.ops.vocab_parallel import vocab_parallel_token_logprobs

__all__ = ["attention", "naive_token_logprobs", "token_logprobs", "vocab_parallel_token_logprobs"]
