"""Reward shaping before advantage estimation (OBJECTIVES.md §4.2, §6.3, §7).

* `kl_shaped_rewards`: per-token reward -beta * k_t with the sequence score added at the last valid
  (EOS) token - the PPO / REINFORCE++ reward (Ziegler et al. 2019, arXiv:1909.08593; Stiennon et al.
  2020, arXiv:2009.01325; reward R = r - beta * log(pi / pi_ref) of their RL sections).
* `kl_penalised_scores`: the sequence-level version used by RLOO / REINFORCE (§7):
  R_i = score_i - beta * sum_t m (lp_old - lp_ref).
* `normalize_scores`: reward-model score normalisation and clipping (§3.3).
* `overlong_penalty`: DAPO's soft overlong punishment (arXiv:2503.14476, §3.4; OBJECTIVES.md §6.3).
"""

from typing import Optional

import jax
import jax.numpy as jnp

from jaxalign.losses.kl import kl_estimate
from jaxalign.losses.reductions import last_token_onehot, masked_sum
from jaxalign.losses.stats import Array, as_float


def kl_shaped_rewards(score: Array, old_logps: Array, ref_logps: Array, mask: Array, *,
                      beta: float = 0.05, estimator: str = "k1",
                      has_eos: Optional[Array] = None,
                      missing_eos_penalty: Optional[float] = None) -> tuple[Array, dict]:
  """Per-token KL-shaped rewards with the score at EOS (OBJECTIVES.md §4.2, TRL PPO defaults).

  r_t = -beta * k_t on valid tokens; r_{last} += score; score -= missing_eos_penalty when the
  completion has no EOS (optional).

  Args:
    score: [B] reward-model / rule score per sequence. old_logps, ref_logps, mask: [B, T] (the
      rollout policy's log-probs; no gradient is intended).
    beta: KL coefficient (TRL `kl_coef` 0.05). estimator: "k1" (default) or "k3".
    has_eos: [B] bool, optional; missing_eos_penalty: subtracted from scores without EOS.
  Returns:
    (rewards [B, T] zero on masked positions, metrics with objective/kl, objective/non_score_reward,
    objective/scores, objective/rlhf_reward - means over sequences).
  """
  score = as_float(score)
  if missing_eos_penalty is not None and has_eos is not None:
    score = score - missing_eos_penalty * (1.0 - as_float(has_eos))
  mask = as_float(mask)
  kl = jnp.where(mask > 0, kl_estimate(old_logps, ref_logps, estimator), 0.0)  # [B, T]
  non_score = -beta * kl
  rewards = non_score + score[:, None] * last_token_onehot(mask).astype(kl.dtype)
  non_score_sum = jnp.sum(non_score, axis=-1)
  metrics = {
      "objective/kl": jnp.mean(jnp.sum(kl, axis=-1)),
      "objective/non_score_reward": jnp.mean(non_score_sum),
      "objective/scores": jnp.mean(score),
      "objective/rlhf_reward": jnp.mean(score + non_score_sum),
  }
  return rewards, jax.lax.stop_gradient(metrics)


def kl_penalised_scores(score: Array, old_logps: Array, ref_logps: Array, mask: Array, *,
                        beta: float = 0.05) -> Array:
  """Sequence reward R_i = score_i - beta * sum_t m (lp_old - lp_ref) (k1, detached; §7), [B]."""
  kl = masked_sum(as_float(old_logps) - as_float(ref_logps), mask, axis=-1)
  return jax.lax.stop_gradient(as_float(score) - beta * kl)


def normalize_scores(score: Array, *, mean: Array = 0.0, std: Array = 1.0,
                     clip: Optional[float] = None) -> Array:
  """Reward normalisation before RL (OBJECTIVES.md §3.3): (score - mean) / std, then clip.

  `mean` / `std` come from a reference distribution (e.g. SFT samples, Stiennon et al.) or from
  running moments kept by the trainer (OpenRLHF `--normalize_reward`); `clip` bounds to [-c, c].
  Record which one is used: it changes the effective KL coefficient.
  """
  out = (as_float(score) - mean) / std
  return out if clip is None else jnp.clip(out, -clip, clip)


def overlong_penalty(lengths: Array, *, max_len: int, cache_len: int) -> Array:
  """DAPO soft overlong punishment R_len(|y|) (OBJECTIVES.md §6.3 item 4), [B].

  0 if |y| <= L_max - L_cache; ((L_max - L_cache) - |y|) / L_cache inside the cache window;
  -1 beyond L_max. Added to the task reward.
  """
  lengths = as_float(lengths)
  soft = max_len - cache_len
  inside = (soft - lengths) / cache_len
  return jnp.where(lengths <= soft, 0.0, jnp.where(lengths <= max_len, inside, -1.0))
