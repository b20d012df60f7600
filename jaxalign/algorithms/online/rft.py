"""Rejection-sampling fine-tuning (RFT / RAFT / best-of-n; OBJECTIVES.md §8.1): each group's best sample is
trained with the SFT loss when its reward reaches rl.rft_threshold. Log-probs are the model's full
distribution (no importance ratio is involved)."""

from __future__ import annotations

import jax.numpy as jnp

from jaxalign.algorithms.online.base import TokenAlgorithm, TokenUnits, group_best, take


class RFT(TokenAlgorithm):
  loss = "sft"

  def units(self, ctx, state, frozen_params, s, key):
    trains = jnp.any(s.mask > 0, -1)
    best, _, _ = group_best(s.scores, ctx.rl.group_size, trains)
    keep = ((s.scores[best] >= ctx.rl.rft_threshold) & trains[best]).astype(jnp.float32)
    units = TokenUnits(rows=take(s.rows, best), floor=None, mask=s.mask[best] * keep[:, None], ref=take(s.ref, best))
    return units, {"rft/accept_rate": jnp.mean(keep)}

  def needs_old_pass(self, rl) -> bool:
    return False  # the SFT loss on the kept samples

  def units_per_prompt(self, rl) -> int:
    return 1

  def stats(self, ctx, policy, trainable, unit: TokenUnits):
    return self.token_batch(ctx, policy, unit)
