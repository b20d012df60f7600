"""Alignment as distribution learning: Yun et al. (arXiv:2506.01523, v2 equation numbers; §10).

The preference model is the LM itself, P(a > b | x) = sigma(gamma ln(pi(a|x) / pi(b|x))):
* PMLE (v2 Eq. (4)-(5)): maximum likelihood of the preferences, no reference inside the sigmoid.
* Preference distillation (v2 Eq. (9), (11), (12)): Bernoulli KL / soft-label cross-entropy to a
  reward model's expected preference p_hat = sigma(R_hat(a1) - R_hat(a2)).
* RKL (v2 Eq. (14)-(15)): KL(pi || pi_tilde) with pi_tilde ∝ exp(R_hat / gamma), i.e. RLHF plus an
  entropy bonus of weight gamma; optimised with PPO (`rkl_token_rewards` + `ppo.ppo_loss`, or
  `rkl_loss` = PPO with an exact-entropy bonus).
Open points (OBJECTIVES.md §14 item 1): the formulas come from a translated copy of v2; the exact
estimator of the explicit KL term and which RKL form the authors ran are not stated.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from jaxalign.losses.kl import kl_penalty
from jaxalign.losses.ppo import ppo_loss
from jaxalign.losses.shaping import kl_shaped_rewards
from jaxalign.losses.stats import Array, PairStats, TokenBatch, as_float, finish, mean_over
from jaxalign.losses.stats import pair_metrics, require

logsig = jax.nn.log_sigmoid


def _with_kl(loss: Array, metrics: dict, kl_batch: Optional[TokenBatch], beta: float,
             kl_estimator: str) -> tuple[Array, dict]:
  """Adds beta * KL(pi || pi_0) estimated on on-policy samples, when they are given."""
  if kl_batch is None:
    return finish(loss, metrics)
  kl = kl_penalty(kl_batch, estimator=kl_estimator)
  metrics = {**metrics, "kl": kl}
  return finish(loss + beta * kl, metrics)


def pmle_loss(batch: PairStats, *, gamma: float = 0.01, beta: float = 1e-5,
              kl_batch: Optional[TokenBatch] = None, kl_estimator: str = "k2",
              num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """Preference MLE (Yun et al. v2 Eq. (4)-(5); OBJECTIVES.md §10.2).

  L = mean_b -logsig(gamma (S(a+) - S(a-))) [+ beta * KL(pi || pi_0)]. The KL term is added only
  when `kl_batch` (on-policy samples with `logps`, `ref_logps`, `mask`) is given, estimated with the
  per-token k2 loss (a k1 value has zero expected gradient; §10.2 note). Defaults: TL;DR values
  (gamma 1e-2, beta 1e-5); UltraFeedback used gamma 5e-3 and no KL. Rewards = gamma * S.
  """
  s_w, s_l = as_float(batch.policy_chosen), as_float(batch.policy_rejected)
  loss = mean_over(-logsig(gamma * (s_w - s_l)), num_pairs)
  return _with_kl(loss, pair_metrics(batch, gamma * s_w, gamma * s_l), kl_batch, beta, kl_estimator)


def preference_distillation_loss(batch: PairStats, *, gamma: float = 0.1, beta: float = 0.05,
                                 kl_batch: Optional[TokenBatch] = None, kl_estimator: str = "k2",
                                 num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """Preference distillation (Yun et al. v2 Eq. (9), (11), (12); OBJECTIVES.md §10.3).

  p_hat = sigma(R_hat(a1) - R_hat(a2)) (soft label, detached), d = S(a1) - S(a2),
  q = sigma(gamma d); L = mean_b -[p_hat logsig(gamma d) + (1 - p_hat) logsig(-gamma d)]
  [+ beta KL(pi || pi_0) with `kl_batch`]. This soft-label cross-entropy equals the Bernoulli KL
  plus the constant H(Bern(p_hat)); the KL value is reported as `distill/kl`. Pair order does not
  matter. `score_chosen` / `score_rejected` hold R_hat(a1) / R_hat(a2).
  """
  s_1, s_2 = as_float(batch.policy_chosen), as_float(batch.policy_rejected)
  r_1 = require(batch.score_chosen, "score_chosen", "preference_distillation")
  r_2 = require(batch.score_rejected, "score_rejected", "preference_distillation")
  logit_p = jax.lax.stop_gradient(r_1 - r_2)
  p_hat = jax.nn.sigmoid(logit_p)
  z = gamma * (s_1 - s_2)
  ce = -(p_hat * logsig(z) + (1.0 - p_hat) * logsig(-z))  # [B]
  entropy = -(p_hat * logsig(logit_p) + (1.0 - p_hat) * logsig(-logit_p))  # H(Bern(p_hat))
  q = jax.nn.sigmoid(z)
  metrics = pair_metrics(batch, gamma * s_1, gamma * s_2)
  metrics.update({
      "distill/kl": jnp.mean(ce - entropy),
      "distill/abs_error": jnp.mean(jnp.abs(p_hat - q)),
      "distill/agreement": jnp.mean(((p_hat > 0.5) == (q > 0.5)).astype(q.dtype)),
  })
  return _with_kl(mean_over(ce, num_pairs), metrics, kl_batch, beta, kl_estimator)


def rkl_token_rewards(score: Array, old_logps: Array, ref_logps: Array, mask: Array, *,
                      gamma: float = 0.01, beta: float = 0.05) -> tuple[Array, dict]:
  """RKL shaped rewards (Yun et al. v2 Eq. (14)-(15); OBJECTIVES.md §10.4, sampled form).

  r_t = -beta * (lp_t - lp_ref_t) - gamma * lp_t, with R_hat added at EOS: the per-sequence sum is
  R_hat - gamma ln pi(y) - beta ln(pi(y) / pi_0(y)); feed it to `advantages.gae` and `ppo_loss`.

  Args:
    score: [B] R_hat. old_logps, ref_logps, mask: [B, T] (rollout policy, reference).
  Returns:
    (rewards [B, T], metrics incl. rkl/objective = mean_b [-R + gamma S + beta (S - S_ref)]).
  """
  rewards, metrics = kl_shaped_rewards(score, old_logps, ref_logps, mask, beta=beta)
  entropy_term = -gamma * jnp.where(jnp.asarray(mask) > 0, as_float(old_logps), 0.0)
  rewards = rewards + entropy_term
  metrics = {**metrics, "rkl/objective": -jnp.mean(jnp.sum(rewards, axis=-1))}
  return rewards, jax.lax.stop_gradient(metrics)


def rkl_loss(batch: TokenBatch, *, gamma: float = 0.01, eps: float = 0.2, vf_coef: float = 0.1,
             eps_v: Optional[float] = 0.2,
             num_tokens: Optional[Array] = None) -> tuple[Array, dict]:
  """RKL with an exact-entropy bonus: PPO loss - gamma * tokmean(H) (OBJECTIVES.md §10.4).

  Use with standard KL-shaped rewards (beta 0.05); `batch.entropy` [B, T] is required. The sampled
  alternative is `rkl_token_rewards` + plain `ppo_loss`. gamma = 0 gives the RLHF objective (§4.1).
  """
  require(batch.entropy, "entropy", "rkl")
  return ppo_loss(batch, eps=eps, vf_coef=vf_coef, eps_v=eps_v, ent_coef=gamma,
                  num_tokens=num_tokens)
