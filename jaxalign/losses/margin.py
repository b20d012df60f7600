"""Margin (regression / hinge) preference losses: IPO, TRL hinge, SLiC-HF (OBJECTIVES.md §9.4-5).

Inputs are `PairStats`; `num_pairs` is the step-level pair count for exact gradient accumulation.
"""

from typing import Optional

import jax.numpy as jnp

from jaxalign.losses.fdpo import f_scores
from jaxalign.losses.stats import Array, PairStats, as_float, finish, mean_over
from jaxalign.losses.stats import pair_lengths, pair_logratios, pair_metrics


def ipo_loss(batch: PairStats, *, tau: float = 0.1, length_normalize: bool = False,
             divergence: str = "reverse_kl", alpha: float = 0.5,
             num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """IPO, Azar et al. 2023 (arXiv:2310.12036) Eq. (17) (OBJECTIVES.md §9.4).

  L = mean_b (h_b - 1/(2 tau))^2, minimal at h = 1/(2 tau). `length_normalize=False` (default) is
  the paper's / original DPO code's form on summed log-ratios; True gives TRL's
  h = l(y_w)/n(y_w) - l(y_l)/n(y_l) (`loss_type="ipo"`, where TRL calls tau "beta").
  `divergence` / `alpha`: TRL's f-divergence scores f'(exp(l)) in place of l (`fdpo.f_scores`, with
  TRL's additive constant when length-normalised); default reverse KL = l.
  Implicit rewards in the metrics are tau * l (summed or averaged, as the loss).
  """
  l_w, l_l = pair_logratios(batch, "ipo")
  s_w, s_l = f_scores(l_w, l_l, divergence, alpha, "ipo", trl_constant=length_normalize)
  if length_normalize:
    n_w, n_l = pair_lengths(batch, "ipo")
    l_w, l_l, s_w, s_l = l_w / n_w, l_l / n_l, s_w / n_w, s_l / n_l
  per_pair = (s_w - s_l - 1.0 / (2.0 * tau)) ** 2
  return finish(mean_over(per_pair, num_pairs), pair_metrics(batch, tau * l_w, tau * l_l))


def hinge_loss(batch: PairStats, *, beta: float = 0.1, divergence: str = "reverse_kl", alpha: float = 0.5,
               num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """Reference-normalised hinge (TRL `loss_type="hinge"`; OBJECTIVES.md §9.5).

  L = mean_b max(0, 1 - beta h): a margin of 1/beta in log-ratio units; zero gradient once met.
  `divergence` / `alpha`: h from TRL's f-divergence scores f'(exp(l)) (`fdpo.f_scores`); default l.
  """
  l_w, l_l = pair_logratios(batch, "hinge")
  s_w, s_l = f_scores(l_w, l_l, divergence, alpha, "hinge")
  per_pair = jnp.maximum(0.0, 1.0 - beta * (s_w - s_l))
  return finish(mean_over(per_pair, num_pairs), pair_metrics(batch, beta * l_w, beta * l_l))


def slic_loss(batch: PairStats, *, delta: float = 1.0, lambda_reg: float = 0.0,
              num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """SLiC-HF calibration loss, Zhao et al. 2023 (arXiv:2305.10425), reference-free (§9.5).

  L = mean_b max(0, delta - S(y_w) + S(y_l)) + lambda_reg * mean_b -S(y_target), with the chosen
  response as the regularisation target. Defaults (delta 1, lambda_reg 0) are the spec's worked
  example; the paper's values were not re-read (OBJECTIVES.md §14 item 8). Rewards = S.
  """
  s_w, s_l = as_float(batch.policy_chosen), as_float(batch.policy_rejected)
  per_pair = jnp.maximum(0.0, delta - s_w + s_l) + lambda_reg * (-s_w)
  return finish(mean_over(per_pair, num_pairs), pair_metrics(batch, s_w, s_l))
