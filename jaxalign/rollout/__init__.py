"""Rollouts: jitted KV-cache sampling from a causal LM (prefill, then a decode loop)."""

from jaxalign.rollout.sampler import (Rollout, SamplingConfig, generate, generate_text, left_pad, sample_token,
                                      top_k_filter, top_p_filter)

__all__ = [
  "Rollout", "SamplingConfig", "generate", "generate_text", "left_pad", "sample_token", "top_k_filter",
  "top_p_filter",
]
