"""PPO with a critic (OBJECTIVES.md §5): token rewards shaped by the k1 KL to the reference (rl.kl_coef) with
the score at EOS, GAE (rl.gamma, rl.lam) on the rollout critic's values, whitened advantages; the loss trains
the policy's clipped surrogate and the critic's clipped value loss together."""

from __future__ import annotations

from typing import NamedTuple

import jax

from jaxalign import losses
from jaxalign.algorithms.forward import frozen as no_grad
from jaxalign.algorithms.online.base import PolicyGradient, TokenUnits, token_units


class PPOUnits(NamedTuple):
  tokens: TokenUnits
  old_values: jax.Array  # [U, N] the rollout critic's V(s_t)
  returns: jax.Array  # [U, N] GAE value targets


class PPO(PolicyGradient):
  loss = "ppo"
  kl_in_reward = True
  critic = True

  def check(self, rl, loss_params: dict, prompts: int) -> None:
    super().check(rl, loss_params, prompts)
    if rl.entropy_coef and loss_params.get("ent_coef"):
      raise ValueError("rl.entropy_coef and loss.params.ent_coef are both the entropy bonus; set one")

  def needs_entropy(self, ctx) -> bool:
    return super().needs_entropy(ctx) or bool(ctx.fns.loss_params.get("ent_coef"))

  def units(self, ctx, state, frozen_params, s, key):
    old_values = no_grad(ctx.values, state.trainable["value"], s.rows)
    token_rewards, metrics = losses.kl_shaped_rewards(s.scores, s.old, s.ref, s.mask, beta=ctx.rl.kl_coef)
    advantages, returns = losses.gae(token_rewards, old_values, s.mask, gamma=ctx.rl.gamma, lam=ctx.rl.lam)
    return PPOUnits(token_units(ctx.rl, s, losses.whiten(advantages, s.mask)), old_values, returns), metrics

  def stats(self, ctx, policy, trainable, unit: PPOUnits):
    return self.token_batch(ctx, policy, unit.tokens, values=ctx.values(trainable["value"], unit.tokens.rows),
                            old_values=unit.old_values, returns=unit.returns)
