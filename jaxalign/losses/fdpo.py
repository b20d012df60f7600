"""f-DPO: DPO under f-divergence regularisation (arXiv:2309.16240; OBJECTIVES.md §9.8).

Wang et al. 2023, "Beyond Reverse KL": with u = pi_theta / pi_ref = exp(l(y)),
  L = mean_b -logsig(beta * (f'(u_w) - f'(u_l))).
Each f' is written in log-space of l and exponents are clamped (EXP_CLAMP), as TRL does:
  reverse_kl  f'(u) = log u + 1                 (= DPO)
  forward_kl  f'(u) = -1/u = -exp(-l)            (TRL: 1 - 1/u; same difference)
  js          f'(u) = log(2u / (1+u)) = log 2 + logsig(l)
  alpha       f'(u) = (1 - u^(-alpha)) / alpha, 0 < alpha < 1 (paper's alpha; TRL's
              f_alpha_divergence_coef a = 1 - alpha, identical at the default 0.5)
The additive constants cancel in f'(u_w) - f'(u_l), so they are dropped (more precise differences)
unless each score is divided by its own length (TRL's `sigmoid_norm` and `ipo`): there
`trl_constant=True` gives TRL's exact scores l, 1 - exp(-l), log 2 + logsig(l), (1 - exp(-alpha l))/alpha.
TRL (`DPOTrainer.f_divergence_type`) allows a non-default divergence with the losses whose logit is
built from the chosen and rejected scores: sigmoid (f_dpo here), hinge, ipo, robust (margin.py, dpo.py),
exo_pair, discopop, sigmoid_norm (dpo_variants.py); `f_scores` is the one helper they all use.
"""

import math
from typing import Optional

import jax
import jax.numpy as jnp

from jaxalign.losses.kl import EXP_CLAMP
from jaxalign.losses.stats import Array, PairStats, check, finish, mean_over
from jaxalign.losses.stats import pair_logratios, pair_metrics

DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
TRL_CONSTANTS = {"reverse_kl": 0.0, "forward_kl": 1.0, "js": math.log(2.0), "alpha": 0.0}


def f_prime(logratio: Array, divergence: str, alpha: float = 0.5, loss: str = "f_dpo") -> Array:
  """f'(u) at u = exp(logratio), up to an additive constant that cancels in the difference."""
  check(divergence in DIVERGENCES, f"{loss}: unknown divergence '{divergence}'; "
        f"choose one of {DIVERGENCES}")
  if divergence == "reverse_kl":
    return logratio
  if divergence == "forward_kl":
    return -jnp.exp(jnp.minimum(-logratio, EXP_CLAMP))
  if divergence == "js":
    return jax.nn.log_sigmoid(logratio)
  check(lambda: 0 < alpha < 1, f"{loss}: alpha must be in (0, 1), got {alpha}")
  return (1.0 - jnp.exp(jnp.minimum(-alpha * logratio, EXP_CLAMP))) / alpha


def f_scores(l_w: Array, l_l: Array, divergence: str = "reverse_kl", alpha: float = 0.5,
             loss: str = "f_dpo", trl_constant: bool = False) -> tuple[Array, Array]:
  """f'(u_w), f'(u_l) [B] from the log-ratios l_w, l_l: the scores that replace l in TRL's losses.

  `trl_constant=True` adds TRL's additive constant (needed when the scores are length-normalised).
  """
  s_w, s_l = f_prime(l_w, divergence, alpha, loss), f_prime(l_l, divergence, alpha, loss)
  if trl_constant and TRL_CONSTANTS[divergence]:
    s_w, s_l = s_w + TRL_CONSTANTS[divergence], s_l + TRL_CONSTANTS[divergence]
  return s_w, s_l


def f_dpo_loss(batch: PairStats, *, beta: float = 0.1, divergence: str = "reverse_kl",
               alpha: float = 0.5, num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """f-DPO loss (arXiv:2309.16240; OBJECTIVES.md §9.8).

  Args:
    batch: PairStats (policy_*, ref_*).
    divergence: "reverse_kl" (TRL default, = DPO) | "forward_kl" | "js" | "alpha".
    alpha: the paper's alpha for the alpha-divergence.
  Returns:
    (loss [], pairwise metrics with implicit rewards beta * l).
  """
  l_w, l_l = pair_logratios(batch, "f_dpo")
  s_w, s_l = f_scores(l_w, l_l, divergence, alpha)
  z = beta * (s_w - s_l)
  return finish(mean_over(-jax.nn.log_sigmoid(z), num_pairs),
                pair_metrics(batch, beta * l_w, beta * l_l))
