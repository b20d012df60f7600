"""Online DPO (Guo et al. 2024; OBJECTIVES.md §8.2): each group's best and worst sample become (chosen,
rejected) for the DPO loss against the frozen reference. A group whose samples all score the same pairs a
sample with itself: its margin is 0 and it gives no gradient. Log-probs are the model's full distribution."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxalign import losses
from jaxalign.algorithms.online.base import Algorithm, group_best, take


class PairUnits(NamedTuple):
  chosen: dict  # rows [U, T]
  rejected: dict  # rows [U, T]
  chosen_mask: jax.Array  # [U, N] the completion tokens that count
  rejected_mask: jax.Array
  ref_chosen: jax.Array  # [U] summed reference log-probs
  ref_rejected: jax.Array
  n_chosen: jax.Array  # [U] completion tokens
  n_rejected: jax.Array


class OnlineDPO(Algorithm):
  loss = "dpo"

  def units_per_prompt(self, rl) -> int:
    return 1

  def needs_old_pass(self, rl) -> bool:
    return False  # the DPO loss compares the policy with the reference only

  def check(self, rl, loss_params: dict, prompts: int) -> None:
    super().check(rl, loss_params, prompts)
    if rl.entropy_coef or rl.kl_loss_coef:
      raise ValueError("rl.entropy_coef and rl.kl_loss_coef apply to token-level losses; online_dpo's KL is the "
                       "DPO loss's own (loss.params.beta)")

  def units(self, ctx, state, frozen_params, s, key):
    best, worst, distinct = group_best(s.scores, ctx.rl.group_size, jnp.any(s.mask > 0, -1))
    rejected = jnp.where(distinct, worst, best)
    ref_sums, counts = jnp.sum(s.ref * s.mask, -1), jnp.sum(s.mask, -1)  # [R]
    units = PairUnits(take(s.rows, best), take(s.rows, rejected), s.mask[best], s.mask[rejected], ref_sums[best],
                      ref_sums[rejected], counts[best], counts[rejected])
    return units, {"online_dpo/distinct_fraction": jnp.mean(distinct.astype(jnp.float32))}

  def stats(self, ctx, policy, trainable, unit: PairUnits):
    def summed(rows, mask):  # over the same tokens as the reference (rl.mask_truncated_completions drops some)
      return jnp.sum(ctx.completion_logps(policy, rows, None)[0] * mask, -1)

    return losses.PairStats(policy_chosen=summed(unit.chosen, unit.chosen_mask),
                            policy_rejected=summed(unit.rejected, unit.rejected_mask),
                            ref_chosen=unit.ref_chosen, ref_rejected=unit.ref_rejected,
                            n_chosen=jnp.maximum(unit.n_chosen, 1.0), n_rejected=jnp.maximum(unit.n_rejected, 1.0))

  def counts(self, ctx, stats, size: int) -> dict:
    return {"num_pairs": size}
