"""ReMax (Li et al. 2023; OBJECTIVES.md §7.3): the baseline of a prompt's samples is the reward of the
policy's greedy completion of it, decoded in the same step (once per distinct prompt)."""

from __future__ import annotations

import jax.numpy as jnp

from jaxalign import losses
from jaxalign.algorithms.online.base import PolicyGradient


class ReMax(PolicyGradient):
  loss = "reinforce"
  kl_in_reward = True

  def advantages(self, ctx, state, frozen_params, s, key):
    g = ctx.rl.group_size
    first = jnp.arange(0, s.scores.shape[0], g)  # one row per prompt: the greedy completion is the same for all
    prompts = {"prompt_ids": s.rollout.prompt_ids[first], "prompt_mask": s.rollout.prompt_mask[first],
               "uid": s.uid[first]}
    greedy = jnp.repeat(ctx.greedy_scores(state, frozen_params, prompts), g)
    return losses.remax_advantages(self.kl_scores(ctx.rl, s), greedy), {"remax/greedy_reward": jnp.mean(greedy)}
