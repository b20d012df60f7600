"""Reference-free preference losses: CPO, SimPO (CPO-SimPO, AlphaPO), ORPO (OBJECTIVES.md §9.12-§9.14).

Inputs are `PairStats`; the `ref_*` fields are ignored. `n_chosen` / `n_rejected` are needed for
average log-probs A = S / n (SimPO, ORPO) and for the token-mean NLL (CPO, ORPO). `num_pairs` /
`num_tokens` are step-level counts for exact gradient accumulation.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from jaxalign.losses.dpo import chosen_nll
from jaxalign.losses.kl import EXP_CLAMP
from jaxalign.losses.stats import Array, PairStats, as_float, check, finish, mean_over
from jaxalign.losses.stats import pair_lengths, pair_metrics, require

logsig = jax.nn.log_sigmoid


def alphapo_reward(x: Array, reward_alpha: float) -> Array:
  """AlphaPO reward shape (Gupta et al. 2025, arXiv:2501.03884): r = (1 - exp(-alpha x)) / alpha.

  x is a (summed or average) log-prob, so exp(-alpha x) = p^(-alpha) as in TRL's CPO `alpha`; alpha = 0
  is the limit r = x. Computed as -expm1(-alpha x) / alpha with the exponent clamped at EXP_CLAMP;
  `reward_alpha` may be traced (a where, not a Python branch).
  """
  a = jnp.asarray(reward_alpha, x.dtype)
  safe_a = jnp.where(a == 0, 1.0, a)
  return jnp.where(a == 0, x, -jnp.expm1(jnp.minimum(-safe_a * x, EXP_CLAMP)) / safe_a)


def _smoothed(z: Array, label_smoothing: float, loss: str) -> Array:
  """-(1-eps) logsig(z) - eps logsig(-z) (cDPO-style label smoothing, TRL CPO `label_smoothing`)."""
  check(lambda: 0 <= label_smoothing <= 0.5,
        f"{loss}: label_smoothing must be in [0, 0.5], got {label_smoothing}")
  return -(1.0 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)


def cpo_loss(batch: PairStats, *, beta: float = 0.1, alpha: float = 1.0,
             nll_reduction: str = "token_mean", label_smoothing: float = 0.0, reward_alpha: float = 0.0,
             num_pairs: Optional[Array] = None,
             num_tokens: Optional[Array] = None) -> tuple[Array, dict]:
  """CPO, Xu et al. 2024 (arXiv:2401.08417) Eq. (3) + NLL (OBJECTIVES.md §9.12), TRL CPO `sigmoid`.

  L = mean_b [-(1-eps) logsig(beta (r(y_w) - r(y_l))) - eps logsig(-beta (...))] + alpha * NLL(y_w),
  r = S (summed log-prob). NLL is TRL's token mean -sum S_w / sum n_w by default;
  `nll_reduction="sequence_sum"` is the paper's mean_b -S(y_w). eps = `label_smoothing` (TRL CPOConfig
  `label_smoothing`, conservative CPO; 0 = the paper). `reward_alpha` != 0 applies TRL's AlphaPO reward
  r = (1 - exp(-reward_alpha S)) / reward_alpha (`alphapo_reward`; TRL CPOConfig `alpha`) on the summed
  log-probs. Rewards in the metrics are beta * r (TRL).
  """
  s_w, s_l = as_float(batch.policy_chosen), as_float(batch.policy_rejected)
  r_w, r_l = alphapo_reward(s_w, reward_alpha), alphapo_reward(s_l, reward_alpha)
  pref = mean_over(_smoothed(beta * (r_w - r_l), label_smoothing, "cpo"), num_pairs)
  nll, num, den = chosen_nll(batch, nll_reduction, "cpo", num_pairs=num_pairs,
                             num_tokens=num_tokens)
  metrics = pair_metrics(batch, beta * r_w, beta * r_l)
  metrics.update({"pref_loss": pref, "nll_loss": nll, "nll/numerator": num, "nll/denominator": den})
  return finish(pref + alpha * nll, metrics)


def simpo_loss(batch: PairStats, *, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0, alpha: float = 0.0, reward_alpha: float = 0.0,
               nll_reduction: str = "token_mean", num_pairs: Optional[Array] = None,
               num_tokens: Optional[Array] = None) -> tuple[Array, dict]:
  """SimPO, Meng et al. 2024 (arXiv:2405.14734) Eq. (6) (OBJECTIVES.md §9.13), TRL CPO `simpo`.

  L = mean_b -logsig(beta (r(y_w) - r(y_l)) - gamma), r = A = S / n. gamma is a reward margin
  (= beta * gamma_beta_ratio of the reference code; = TRL `simpo_gamma`; defaults beta 2.0, gamma 0.5).
  Optional cDPO-style label smoothing. Rewards in the metrics are beta * r.

  * `alpha` > 0 adds alpha * NLL(y_w) (token mean by default, see `cpo_loss`): CPO-SimPO, TRL
    CPOTrainer `loss_type="simpo"` with `cpo_alpha` = alpha (TRL's default cpo_alpha is 1.0; 0 = SimPO).
  * `reward_alpha` != 0: AlphaPO (Gupta et al. 2025, arXiv:2501.03884), r = (1 - exp(-reward_alpha A))
    / reward_alpha on the average log-probs (`alphapo_reward`; TRL CPOConfig `alpha`); 0 = SimPO.
  """
  n_w, n_l = pair_lengths(batch, "simpo")
  a_w, a_l = as_float(batch.policy_chosen) / n_w, as_float(batch.policy_rejected) / n_l
  r_w, r_l = alphapo_reward(a_w, reward_alpha), alphapo_reward(a_l, reward_alpha)
  pref = mean_over(_smoothed(beta * (r_w - r_l) - gamma, label_smoothing, "simpo"), num_pairs)
  nll, num, den = chosen_nll(batch, nll_reduction, "simpo", num_pairs=num_pairs, num_tokens=num_tokens)
  metrics = pair_metrics(batch, beta * r_w, beta * r_l)
  metrics.update({"pref_loss": pref, "nll_loss": nll, "nll/numerator": num, "nll/denominator": den})
  return finish(pref + alpha * nll, metrics)


def alphapo_loss(batch: PairStats, *, beta: float = 2.5, gamma: float = 0.1, reward_alpha: float = 0.25,
                 label_smoothing: float = 0.0, num_pairs: Optional[Array] = None,
                 num_tokens: Optional[Array] = None) -> tuple[Array, dict]:
  """AlphaPO, Gupta et al. 2025 (arXiv:2501.03884), TRL CPOTrainer `loss_type="alphapo"`.

  SimPO with the reward shape r = (1 - exp(-alpha A)) / alpha on average log-probs A = S / n
  (alpha = `reward_alpha`; alpha -> 0 gives SimPO's r = A) and no NLL term (TRL sets cpo_alpha = 0):
    L = mean_b -logsig(beta (r(y_w) - r(y_l)) - gamma).
  Defaults are the paper's Mistral-Instruct setting as quoted in TRL's paper index (Table 3: alpha 0.25,
  beta 2.5, gamma 0.1); tune per model. Rewards in the metrics are beta * r.
  """
  return simpo_loss(batch, beta=beta, gamma=gamma, label_smoothing=label_smoothing,
                    reward_alpha=reward_alpha, num_pairs=num_pairs, num_tokens=num_tokens)


def log1mexp(x: Array) -> Array:
  """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
  return jnp.where(x < -jnp.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo_loss(batch: PairStats, *, lam: float = 0.1, max_avg_logp: float = -1e-6,
              nll_tokens: str = "completion", num_pairs: Optional[Array] = None,
              num_tokens: Optional[Array] = None,
              num_prompt_tokens: Optional[Array] = None) -> tuple[Array, dict]:
  """ORPO, Hong et al. 2024 (arXiv:2403.07691) Eq. (6)-(7) (OBJECTIVES.md §9.14).

  log odds(y) = A(y) - log(1 - exp(A(y))), A = S / n;
  L = NLL(y_w) + lam * mean_b -logsig(log odds(y_w) - log odds(y_l)), NLL = token mean over chosen.
  A is clamped at `max_avg_logp` (< 0) so that log(1 - exp(A)) stays finite. TRL calls lam "beta".
  nll_tokens: "completion" (the paper's Eq. (6): the chosen response's tokens) or "prompt_and_completion"
  (TRL's ORPOTrainer and the authors' code: prompt tokens too, -(S_w + S_prompt) / (n_w + n_prompt) over the
  step; needs `prompt_chosen` / `n_prompt`, and `num_prompt_tokens` with `num_tokens` to accumulate exactly).

  Returns:
    (loss [], metrics: nll_loss, or_loss, log_odds_ratio (mean logsig of the log-odds difference),
    log_odds_chosen (mean log-odds difference), rewards = lam * A, ...).
  """
  n_w, n_l = pair_lengths(batch, "orpo")
  a_w = jnp.minimum(as_float(batch.policy_chosen) / n_w, max_avg_logp)
  a_l = jnp.minimum(as_float(batch.policy_rejected) / n_l, max_avg_logp)
  log_odds = (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l))  # [B]
  or_loss = mean_over(-logsig(log_odds), num_pairs)
  check(nll_tokens in ("completion", "prompt_and_completion"),
        f"orpo: nll_tokens={nll_tokens!r}; choose completion or prompt_and_completion")
  if nll_tokens == "completion":
    nll, num, den = chosen_nll(batch, "token_mean", "orpo", num_tokens=num_tokens)
  else:
    num = -jnp.sum(as_float(batch.policy_chosen) + require(batch.prompt_chosen, "prompt_chosen", "orpo"))
    den = (jnp.sum(require(batch.n_chosen, "n_chosen", "orpo") + require(batch.n_prompt, "n_prompt", "orpo"))
           if num_tokens is None else num_tokens + num_prompt_tokens)
    nll = num / as_float(den)
  metrics = pair_metrics(batch, lam * a_w, lam * a_l)
  metrics.update({"nll_loss": nll, "or_loss": or_loss, "log_odds_ratio": jnp.mean(logsig(log_odds)),
                  "log_odds_chosen": jnp.mean(log_odds), "nll/numerator": num,
                  "nll/denominator": den})
  return finish(nll + lam * or_loss, metrics)
