"""Sequence-level REINFORCE losses for RLOO / ReMax / REINFORCE with a baseline (OBJECTIVES.md §7).

The estimator decides the method: `advantages.rloo_advantages` (RLOO, arXiv:2402.14740),
`advantages.remax_advantages` (ReMax, arXiv:2310.10505) or `advantages.reinforce_advantages`.
Rewards are usually KL-penalised at sequence level first (`shaping.kl_penalised_scores`).
"""

from typing import Optional

import jax
import jax.numpy as jnp

from jaxalign.losses.kl import EXP_CLAMP
from jaxalign.losses.ppo import clipped_surrogate
from jaxalign.losses.reductions import masked_sum
from jaxalign.losses.stats import Array, TokenBatch, as_float, check, finish, mean_over, require
from jaxalign.losses.stats import zero_masked

sg = jax.lax.stop_gradient


EMPTY_COMPLETIONS = ("no_loss", "constant")


def reinforce_loss(batch: TokenBatch, *, clip_eps: Optional[float] = None, empty_completions: str = "no_loss",
                   num_sequences: Optional[Array] = None) -> tuple[Array, dict]:
  """L = -(1/N) sum_i A_i S_theta(y_i)  (REINFORCE with a detached baseline; §7.1-§7.3).

  With `clip_eps`, TRL's RLOO form: rho_i = exp(S_theta - S_old), L = mean_i max(-A_i rho_i,
  -A_i clip(rho_i, 1-eps, 1+eps)) (sequence-level PPO clip).

  Args:
    batch: TokenBatch with `logps`, `mask`, per-sequence `advantages` [B]; `old_logps` when
      clip_eps is set.
    empty_completions: a row without loss tokens (an empty or fully masked completion) adds nothing
      ("no_loss"), or, with clip_eps, its constant -A_i (ratio exp(0 - 0) = 1) as TRL's RLOOTrainer
      does ("constant"): the same gradient (none from that row), another loss value. Either way it
      counts in the mean's N and in the sequence-level clip metrics' denominators, as in TRL.
    num_sequences: step-level sequence count for gradient accumulation; default B.
  Returns:
    (loss [], metrics: advantages/mean, logps/mean, clipfrac, ratio/mean).
  """
  check(empty_completions in EMPTY_COMPLETIONS,
        f"reinforce: empty_completions={empty_completions!r}; choose one of {EMPTY_COMPLETIONS}")
  batch = zero_masked(batch)
  adv = sg(require(batch.advantages, "advantages", "reinforce"))
  check(adv.ndim == 1, "reinforce needs per-sequence advantages [B]")
  seq_logps = masked_sum(batch.logps, batch.mask, axis=-1)  # [B]
  nonempty = jnp.sum(as_float(batch.mask), axis=-1) > 0  # [B]
  metrics = {"advantages/mean": jnp.mean(adv), "logps/mean": jnp.mean(seq_logps)}
  if clip_eps is None:
    per_seq = -adv * seq_logps
  else:
    old = masked_sum(require(batch.old_logps, "old_logps", "rloo (clip_eps)"), batch.mask, axis=-1)
    ratio = jnp.exp(jnp.minimum(seq_logps - sg(old), EXP_CLAMP))
    per_seq, clipped = clipped_surrogate(ratio, adv, eps_low=clip_eps, eps_high=clip_eps)
    metrics["clipfrac"] = jnp.mean(clipped.astype(ratio.dtype))
    metrics["ratio/mean"] = jnp.mean(ratio)
  kept = nonempty if empty_completions == "no_loss" else jnp.ones_like(nonempty)
  return finish(mean_over(jnp.where(kept, per_seq, 0.0), num_sequences), metrics)


def rloo_loss(batch: TokenBatch, *, clip_eps: Optional[float] = 0.2, empty_completions: str = "no_loss",
              num_sequences: Optional[Array] = None) -> tuple[Array, dict]:
  """RLOO as in TRL: sequence-level PPO clip (eps 0.2) on leave-one-out advantages (§7.2).

  `clip_eps=None` gives the paper's plain REINFORCE form (same as `reinforce_loss`);
  `empty_completions="constant"` TRL's loss value on empty completions (see `reinforce_loss`).
  """
  return reinforce_loss(batch, clip_eps=clip_eps, empty_completions=empty_completions,
                        num_sequences=num_sequences)
