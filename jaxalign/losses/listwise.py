"""Listwise preference losses: Plackett-Luce DPO and LiPO-lambda (OBJECTIVES.md §9.17, §9.18).

Inputs are `ListStats` with [B, C] fields (C responses per prompt) and graded labels psi (higher is
better). The ranking tau is the labels sorted in descending order (stable: ties keep list order).
The ranking helpers are shared with the K-wise reward-model losses (reward.py).
"""

from typing import Optional

import jax
import jax.numpy as jnp

from jaxalign.losses.stats import Array, ListStats, as_float, check, finish, mean_over, require
from jaxalign.losses.stats import safe_div


def sort_by_labels(x: Array, labels: Array) -> Array:
  """Reorders x [B, C] along C so that labels are descending (tau(1) = best first)."""
  order = jnp.argsort(-as_float(labels), axis=-1, stable=True)  # [B, C]
  return jnp.take_along_axis(x, order, axis=-1)


def plackett_luce_nll(scores: Array, labels: Array) -> Array:
  """-log P_PL(tau | scores) = sum_k [logsumexp_{j>=k} s_tau(j) - s_tau(k)], [B].

  The permutation is applied before the suffix logsumexp (reverse cumulative logsumexp).
  """
  s = sort_by_labels(as_float(scores), labels)  # [B, C] best first
  return jnp.sum(jax.lax.cumlogsumexp(s, axis=1, reverse=True) - s, axis=-1)


def ranked_pairs(labels: Array) -> Array:
  """[B, C, C] bool: pair (i, j) with psi_i > psi_j (i ranked above j)."""
  labels = as_float(labels)
  return labels[:, :, None] > labels[:, None, :]


def descending_ranks(scores: Array) -> Array:
  """1-based rank of each score among its row, descending; ties broken by position. [B, C]."""
  order = jnp.argsort(-as_float(scores), axis=-1, stable=True)
  return jnp.argsort(order, axis=-1) + 1


def ranking_metrics(scores: Array, labels: Array) -> dict[str, Array]:
  """Pairwise ranking accuracy over ranked pairs, and top-1 accuracy (argmax of scores is best)."""
  scores = as_float(scores)
  pairs = ranked_pairs(labels)
  right = pairs & (scores[:, :, None] > scores[:, None, :])
  top1 = jnp.argmax(scores, axis=-1) == jnp.argmax(as_float(labels), axis=-1)
  return {
      "ranking/pairwise_accuracy": safe_div(jnp.sum(right), jnp.sum(pairs)),
      "ranking/top1_accuracy": jnp.mean(top1.astype(scores.dtype)),
  }


def dpo_pl_loss(batch: ListStats, *, beta: float = 0.1,
                num_lists: Optional[Array] = None) -> tuple[Array, dict]:
  """Listwise DPO under Plackett-Luce, DPO paper (arXiv:2305.18290) App. A.3 (OBJECTIVES.md §9.17).

  s_k = beta * l(y_k);  L = mean_b sum_k -(s_tau(k) - logsumexp_{j>=k} s_tau(j)).  K = 2 is DPO.

  Args:
    batch: ListStats with `policy`, `ref`, `labels`, [B, C] each.
    num_lists: step-level number of lists (gradient accumulation); default B.
  Returns:
    (loss [], metrics: rewards/mean, ranking accuracies, logps/mean).
  """
  ref = require(batch.ref, "ref", "dpo_pl")
  s = beta * (as_float(batch.policy) - ref)  # [B, C]
  loss = mean_over(plackett_luce_nll(s, batch.labels), num_lists)
  metrics = {"rewards/mean": jnp.mean(s), "logps/mean": jnp.mean(as_float(batch.policy)),
             **ranking_metrics(s, batch.labels)}
  return finish(loss, metrics)


def lipo_lambda_loss(batch: ListStats, *, beta: float = 0.1, log_base: float = 2.0,
                     num_lists: Optional[Array] = None) -> tuple[Array, dict]:
  """LiPO-lambda (arXiv:2402.01878; OBJECTIVES.md §9.18).

  s_i = beta * l(y_i); tau(i) = rank of s_i (descending, 1-based, no gradient);
  G_i = 2^psi_i - 1; D(tau) = log_base(1 + tau);
  Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)| (detached);
  L = mean_b sum_{psi_i > psi_j} Delta_ij * softplus(-(s_i - s_j)).
  `log_base` only rescales the loss (2 = DCG convention; e for the paper's log; §14 item 3).

  Args:
    batch: ListStats with `policy`, `ref`, `labels` (graded psi), [B, C] each.
  Returns:
    (loss [], metrics: rewards/mean, ranking accuracies, ndcg).
  """
  check(lambda: log_base > 1, f"lipo_lambda: log_base must be > 1, got {log_base}")
  ref = require(batch.ref, "ref", "lipo_lambda")
  psi = as_float(batch.labels)
  s = beta * (as_float(batch.policy) - ref)  # [B, C]
  rank = descending_ranks(jax.lax.stop_gradient(s)).astype(s.dtype)  # [B, C] 1-based tau
  gain = 2.0 ** psi - 1.0
  inv_d = jnp.log(log_base) / jnp.log1p(rank)  # 1 / log_base(1 + tau)
  delta = (jnp.abs(gain[:, :, None] - gain[:, None, :])
           * jnp.abs(inv_d[:, :, None] - inv_d[:, None, :]))  # [B, C, C]
  pairs = ranked_pairs(psi).astype(s.dtype)  # [B, C, C]
  pair_loss = jax.nn.softplus(-(s[:, :, None] - s[:, None, :]))  # [B, C, C]
  per_list = jnp.sum(pairs * jax.lax.stop_gradient(delta) * pair_loss, axis=(1, 2))  # [B]
  loss = mean_over(per_list, num_lists)
  ideal_rank = descending_ranks(psi).astype(s.dtype)
  ideal = jnp.sum(gain * jnp.log(log_base) / jnp.log1p(ideal_rank), -1)  # [B]
  ndcg = safe_div(jnp.sum(gain * inv_d, -1), ideal)
  metrics = {"rewards/mean": jnp.mean(s), "ndcg": jnp.mean(ndcg), **ranking_metrics(s, psi)}
  return finish(loss, metrics)
