"""Fused ops: token log-probs and entropies from hidden states and the LM head; memory-efficient attention
(`jaxalign.ops.attention.attention`, imported from its module: the name is the module's)."""

from jaxalign.ops.token_logprobs import naive_token_logprobs, token_logprobs
from jaxalign.ops.vocab_parallel import vocab_parallel_token_logprobs

__all__ = ["naive_token_logprobs", "token_logprobs", "vocab_parallel_token_logprobs"]
