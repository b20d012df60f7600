"""Losses on each response's own log-ratio: NCA (pair), BCO (pair), NPO (OBJECTIVES.md §9.9-§9.16).

Unlike DPO these act on l(y) = S(y) - S_ref(y) itself, not on the chosen-minus-rejected margin.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from jaxalign.losses.stats import Array, PairStats, UnpairedStats, as_float, finish, mean_over
from jaxalign.losses.stats import pair_logratios, pair_metrics, require

logsig = jax.nn.log_sigmoid


def nca_loss(batch: PairStats, *, beta: float = 0.1,
             num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """Pairwise NCA, Chen et al. 2024 (arXiv:2402.05369), as TRL `nca_pair` (§9.9).

  L = mean_b [-logsig(beta l_w) - 0.5 logsig(-beta l_w) - 0.5 logsig(-beta l_l)].
  """
  l_w, l_l = pair_logratios(batch, "nca")
  r_w, r_l = beta * l_w, beta * l_l
  per_pair = -logsig(r_w) - 0.5 * logsig(-r_w) - 0.5 * logsig(-r_l)
  return finish(mean_over(per_pair, num_pairs), pair_metrics(batch, r_w, r_l))


def bco_loss(batch: PairStats, *, beta: float = 0.1, delta: Array = 0.0,
             num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """Pairwise BCO, Jung et al. 2024 (arXiv:2404.04656) (OBJECTIVES.md §9.10).

  L = mean_b [-logsig(beta l_w - delta) - logsig(-(beta l_l - delta))], delta detached. TRL's
  current `bco_pair` uses delta = 0; the paper keeps a running mean of beta * l over chosen and
  rejected. The trainers do (the registration's `running`): delta is the mean of the metric
  `bco/reward_mean` over the steps before this one, kept in the train state (TRL's older BCOTrainer
  also counted the current batch, which accumulation over micro-batches could not do exactly).
  """
  l_w, l_l = pair_logratios(batch, "bco")
  r_w, r_l = beta * l_w, beta * l_l
  delta = jax.lax.stop_gradient(as_float(delta))
  per_pair = -logsig(r_w - delta) - logsig(-(r_l - delta))
  metrics = pair_metrics(batch, r_w, r_l)
  metrics["bco/reward_mean"] = 0.5 * (jnp.mean(r_w) + jnp.mean(r_l))
  return finish(mean_over(per_pair, num_pairs), metrics)


def npo_loss(batch: UnpairedStats, *, beta: float = 0.1,
             num_examples: Optional[Array] = None) -> tuple[Array, dict]:
  """NPO, Zhang et al. 2024 (arXiv:2404.05868) (OBJECTIVES.md §9.16): negatives only.

  L = -(2/beta) mean_i logsig(-beta l_i) = (2/beta) mean_i softplus(beta l_i); gradient
  2 sigma(beta l_i) / N per S(y_i). NPO+RT adds c_retain * sft_loss on a retain set.

  Args:
    batch: UnpairedStats with `policy`, `ref` (forget-set samples), [B].
  Returns:
    (loss [], metrics: logratio/mean, logps/mean, rewards/mean = beta * l).
  """
  l = as_float(batch.policy) - require(batch.ref, "ref", "npo")
  per_example = -(2.0 / beta) * logsig(-beta * l)
  metrics = {"logratio/mean": jnp.mean(l), "logps/mean": jnp.mean(as_float(batch.policy)),
             "rewards/mean": jnp.mean(beta * l)}
  return finish(mean_over(per_example, num_examples), metrics)
