"""RLOO (Ahmadian et al. 2024; OBJECTIVES.md §7.2): each sample's baseline is the mean reward of the other
samples of its prompt; the KL to the reference (rl.kl_coef, k1) is subtracted from the reward."""

from __future__ import annotations

from jaxalign import losses
from jaxalign.algorithms.online.base import PolicyGradient


class RLOO(PolicyGradient):
  loss = "rloo"
  kl_in_reward = True

  def advantages(self, ctx, state, frozen_params, s, key):
    return losses.rloo_advantages(self.kl_scores(ctx.rl, s), s.group_ids, s.num_groups), {}
