"""The sampler settings of an online run, from `rl.*` (`config.RLConfig`) and the tokenizer."""

from __future__ import annotations

from jaxalign.config import RLConfig
from jaxalign.rollout.sampler import SamplingConfig


def sampling_config(rl: RLConfig, tokenizer) -> SamplingConfig:
  """The rollout sampler's settings: rl.* with the tokenizer's EOS and padding ids."""
  return SamplingConfig(max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_k=rl.top_k,
                        top_p=rl.top_p, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or 0,
                        renormalize=rl.renormalize_sampling)
