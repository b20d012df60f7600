"""RLOO (Ahmadian et al. 2024; OBJECTIVES.md §7.2): each sample's baseline is the mean reward of the other
samples of its prompt; the KL to the reference (rl.kl_coef, k1) is subtracted from the reward."""

from __future__ import annotations

import jax.numpy as jnp

from jaxalign import losses
from jaxalign.algorithms.online.base import PolicyGradient


class RLOO(PolicyGradient):
  loss = "rloo"
  kl_in_reward = True
  normalizes_advantages = True

  def advantages(self, ctx, state, frozen_params, s, key):
    advantages = losses.rloo_advantages(self.kl_scores(ctx.rl, s), s.group_ids, s.num_groups)
    if ctx.rl.normalize_advantages:  # TRL's RLOOTrainer normalize_advantages: over the step's rows, std + 1e-4
      advantages = losses.whiten(advantages, jnp.ones_like(advantages), eps=1e-4, eps_on="std")
    return advantages, {}
