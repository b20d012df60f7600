"""Reference-free preference losses: CPO, SimPO, ORPO (OBJECTIVES.md §9.12-§9.14).

Inputs are `PairStats`; the `ref_*` fields are ignored. `n_chosen` / `n_rejected` are needed for
average log-probs A = S / n (SimPO, ORPO) and for the token-mean NLL (CPO, ORPO). `num_pairs` /
`num_tokens` are step-level counts for exact gradient accumulation.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from jaxalign.losses.dpo import chosen_nll
from jaxalign.losses.stats import Array, PairStats, as_float, check, finish, mean_over
from jaxalign.losses.stats import pair_lengths, pair_metrics

logsig = jax.nn.log_sigmoid


def cpo_loss(batch: PairStats, *, beta: float = 0.1, alpha: float = 1.0,
             nll_reduction: str = "token_mean", num_pairs: Optional[Array] = None,
             num_tokens: Optional[Array] = None) -> tuple[Array, dict]:
  """CPO, Xu et al. 2024 (arXiv:2401.08417) (OBJECTIVES.md §9.12).

  L = mean_b -logsig(beta (S(y_w) - S(y_l))) + alpha * NLL(y_w). NLL is TRL's token mean
  -sum S_w / sum n_w by default; `nll_reduction="sequence_sum"` is the paper's mean_b -S(y_w).
  Rewards in the metrics are beta * S (TRL).
  """
  s_w, s_l = as_float(batch.policy_chosen), as_float(batch.policy_rejected)
  pref = mean_over(-logsig(beta * (s_w - s_l)), num_pairs)
  nll, num, den = chosen_nll(batch, nll_reduction, "cpo", num_pairs=num_pairs,
                             num_tokens=num_tokens)
  metrics = pair_metrics(batch, beta * s_w, beta * s_l)
  metrics.update({"pref_loss": pref, "nll_loss": nll, "nll/numerator": num, "nll/denominator": den})
  return finish(pref + alpha * nll, metrics)


def simpo_loss(batch: PairStats, *, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0,
               num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """SimPO, Meng et al. 2024 (arXiv:2405.14734) Eq. (6) (OBJECTIVES.md §9.13).

  L = mean_b -logsig(beta (A(y_w) - A(y_l)) - gamma), A = S / n. gamma is a reward margin
  (= beta * gamma_beta_ratio of the reference code; defaults beta 2.0, gamma 0.5). Optional
  cDPO-style label smoothing. Rewards in the metrics are beta * A.
  """
  check(lambda: 0 <= label_smoothing <= 0.5,
        f"simpo: label_smoothing must be in [0, 0.5], got {label_smoothing}")
  n_w, n_l = pair_lengths(batch, "simpo")
  a_w, a_l = as_float(batch.policy_chosen) / n_w, as_float(batch.policy_rejected) / n_l
  z = beta * (a_w - a_l) - gamma
  per_pair = -(1.0 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)
  return finish(mean_over(per_pair, num_pairs), pair_metrics(batch, beta * a_w, beta * a_l))


def log1mexp(x: Array) -> Array:
  """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
  return jnp.where(x < -jnp.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo_loss(batch: PairStats, *, lam: float = 0.1, max_avg_logp: float = -1e-6,
              num_pairs: Optional[Array] = None,
              num_tokens: Optional[Array] = None) -> tuple[Array, dict]:
  """ORPO, Hong et al. 2024 (arXiv:2403.07691) Eq. (6)-(7) (OBJECTIVES.md §9.14).

  log odds(y) = A(y) - log(1 - exp(A(y))), A = S / n;
  L = NLL(y_w) + lam * mean_b -logsig(log odds(y_w) - log odds(y_l)), NLL = token mean over chosen.
  A is clamped at `max_avg_logp` (< 0) so that log(1 - exp(A)) stays finite. TRL calls lam "beta".

  Returns:
    (loss [], metrics: nll_loss, or_loss, log_odds_ratio (mean logsig of the log-odds difference),
    log_odds_chosen (mean log-odds difference), rewards = lam * A, ...).
  """
  n_w, n_l = pair_lengths(batch, "orpo")
  a_w = jnp.minimum(as_float(batch.policy_chosen) / n_w, max_avg_logp)
  a_l = jnp.minimum(as_float(batch.policy_rejected) / n_l, max_avg_logp)
  log_odds = (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l))  # [B]
  or_loss = mean_over(-logsig(log_odds), num_pairs)
  nll, num, den = chosen_nll(batch, "token_mean", "orpo", num_tokens=num_tokens)
  metrics = pair_metrics(batch, lam * a_w, lam * a_l)
  metrics.update({"nll_loss": nll, "or_loss": or_loss, "log_odds_ratio": jnp.mean(logsig(log_odds)),
                  "log_odds_chosen": jnp.mean(log_odds), "nll/numerator": num,
                  "nll/denominator": den})
  return finish(nll + lam * or_loss, metrics)
