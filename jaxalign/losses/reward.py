"""Reward-model losses: Bradley-Terry and Thurstone (+ margin, + centering), all-pairs and Plackett-Luce rankings.

OBJECTIVES.md §3. Scores are the value head read at the last non-pad (EOS) token of each sequence.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from jaxalign.losses.listwise import plackett_luce_nll, ranked_pairs, ranking_metrics
from jaxalign.losses.stats import Array, RewardList, RewardPair, as_float, finish, mean_over
from jaxalign.losses.stats import safe_div


def bradley_terry_loss(batch: RewardPair, *, center_coef: float = 0.01,
                       num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """L = mean_b -logsig(r_w - r_l - margin) + c_center * mean_b (r_w + r_l)^2 (OBJECTIVES.md §3.1).

  Bradley-Terry reward loss of Stiennon et al. (arXiv:2009.01325) and InstructGPT
  (arXiv:2203.02155) Eq. (1); margin from Llama 2 (arXiv:2307.09288) §3.2.2; centering from
  arXiv:2312.09244 Eq. (2) as in TRL. center_coef = 0 and margin = None give plain BT.

  Args:
    batch: RewardPair with `chosen`, `rejected` and optional `margin`, [B] each.
    center_coef: c_center (OBJECTIVES.md default 0.01).
    num_pairs: step-level pair count for gradient accumulation; default B.
  Returns:
    (loss [], metrics: accuracy (strict), margin, rewards/chosen|rejected, reward min/mean/max).
  """
  return _pairwise_choice(batch, jax.nn.log_sigmoid, center_coef, num_pairs)


def thurstone_loss(batch: RewardPair, *, scale: float = 1.0, center_coef: float = 0.01,
                   num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """L = mean_b -log Phi((r_w - r_l - margin) / scale) + c_center * mean_b (r_w + r_l)^2.

  Thurstone's law of comparative judgment, Case V (Psychological Review 34(4), 1927): each response's
  utility is its reward plus independent normal noise, so the chosen one wins with probability
  Phi((r_w - r_l) / scale), `scale` the standard deviation of the utility difference (the probit model beside
  Bradley-Terry's logit; Zeng et al.'s survey frames both as discrete-choice models of the preference).
  Margin and centering as in `bradley_terry_loss`.

  Args:
    batch: RewardPair with `chosen`, `rejected` and optional `margin`, [B] each.
    scale: standard deviation of the utility difference (> 0).
    center_coef: c_center.
    num_pairs: step-level pair count for gradient accumulation; default B.
  Returns:
    (loss [], metrics as `bradley_terry_loss`).
  """
  return _pairwise_choice(batch, lambda z: jax.scipy.special.log_ndtr(z / scale), center_coef, num_pairs)


def _pairwise_choice(batch: RewardPair, log_prob_chosen, center_coef, num_pairs):
  """mean_b -log P(chosen wins | r_w - r_l - margin) + c_center * mean_b (r_w + r_l)^2, and the pair metrics."""
  r_w, r_l = as_float(batch.chosen), as_float(batch.rejected)
  gap = r_w - r_l
  if batch.margin is not None:
    gap = gap - as_float(batch.margin)
  loss = mean_over(-log_prob_chosen(gap), num_pairs)
  center = mean_over((r_w + r_l) ** 2, num_pairs)
  loss = loss + center_coef * center
  both = jnp.concatenate([r_w, r_l])
  metrics = {
      "accuracy": jnp.mean((r_w > r_l).astype(r_w.dtype)),
      "margin": jnp.mean(r_w - r_l),
      "rewards/chosen": jnp.mean(r_w),
      "rewards/rejected": jnp.mean(r_l),
      "reward/min": jnp.min(both),
      "reward/mean": jnp.mean(both),
      "reward/max": jnp.max(both),
      "center_term": center,
  }
  return finish(loss, metrics)


def all_pairs_ranking_loss(batch: RewardList, *,
                           num_lists: Optional[Array] = None) -> tuple[Array, dict]:
  """K-wise ranking as all ranked pairs in one batch element (InstructGPT Eq. (1); §3.2).

  L = mean_b (1/#pairs_b) sum_{psi_i > psi_j} -logsig(r_i - r_j); #pairs = C(K, 2) for a full
  ranking.

  Args:
    batch: RewardList with `rewards` and `labels`, [B, C].
  """
  r = as_float(batch.rewards)
  pairs = ranked_pairs(batch.labels).astype(r.dtype)  # [B, C, C]
  pair_loss = -jax.nn.log_sigmoid(r[:, :, None] - r[:, None, :])  # [B, C, C]
  per_list = safe_div(jnp.sum(pairs * pair_loss, axis=(1, 2)), jnp.sum(pairs, axis=(1, 2)))
  loss = mean_over(per_list, num_lists)
  return finish(loss, {"reward/mean": jnp.mean(r), **ranking_metrics(r, batch.labels)})


def plackett_luce_ranking_loss(batch: RewardList, *,
                               num_lists: Optional[Array] = None) -> tuple[Array, dict]:
  """Plackett-Luce MLE of a K-wise ranking (arXiv:2301.11270; OBJECTIVES.md §3.2).

  L = mean_b sum_k -(r_tau(k) - logsumexp_{j>=k} r_tau(j)).

  Args:
    batch: RewardList with `rewards` and `labels`, [B, C].
  """
  r = as_float(batch.rewards)
  loss = mean_over(plackett_luce_nll(r, batch.labels), num_lists)
  return finish(loss, {"reward/mean": jnp.mean(r), **ranking_metrics(r, batch.labels)})
