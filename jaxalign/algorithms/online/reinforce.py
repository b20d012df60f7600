"""REINFORCE without a baseline (A = the KL-penalised reward; OBJECTIVES.md §7.1) and REINFORCE++ (Hu 2025,
§7.4: token-level KL-shaped rewards, returns whitened over the batch)."""

from __future__ import annotations

from jaxalign import losses
from jaxalign.algorithms.online.base import PolicyGradient


class Reinforce(PolicyGradient):
  loss = "reinforce"
  kl_in_reward = True

  def advantages(self, ctx, state, frozen_params, s, key):
    return losses.reinforce_advantages(self.kl_scores(ctx.rl, s)), {}


class ReinforcePlusPlus(PolicyGradient):
  loss = "reinforce_pp"
  kl_in_reward = True

  def advantages(self, ctx, state, frozen_params, s, key):
    token_rewards, metrics = losses.kl_shaped_rewards(s.scores, s.old, s.ref, s.mask, beta=ctx.rl.kl_coef)
    return losses.reinforce_pp_advantages(token_rewards, s.mask), metrics
