"""KL estimators k1 / k2 / k3 (OBJECTIVES.md §1.4).

J. Schulman, "Approximating KL Divergence" (blog, 2020). Tokens are sampled from pi_theta (or
pi_old); the target is KL(pi_theta || pi_ref); with d_t = lp_t - lp_ref_t:

  k1 = d                   unbiased, high variance, can be < 0 (rewards / monitoring)
  k2 = d^2 / 2             biased, low variance, >= 0         (as a loss: reverse-KL gradient)
  k3 = exp(-d) - 1 + d     unbiased, low variance, >= 0       (as a loss: forward-KL gradient)

k3 is the GRPO penalty, DeepSeekMath (arXiv:2402.03300) Eq. (4). Using k1 directly as a loss has
zero expected gradient on-policy; put it in the reward instead (`shaping.kl_shaped_rewards`).
"""

from typing import Callable

import jax.numpy as jnp

from jaxalign.losses.reductions import masked_sum
from jaxalign.losses.stats import Array, TokenBatch, as_float, check, require, zero_masked

EXP_CLAMP = 80.0  # largest exponent of a log-ratio passed to exp in float32 (OBJECTIVES.md §0)


def k1(logps: Array, ref_logps: Array) -> Array:
  """k1 = d = lp - lp_ref, per token."""
  return as_float(logps) - as_float(ref_logps)


def k2(logps: Array, ref_logps: Array) -> Array:
  """k2 = d^2 / 2, per token."""
  return 0.5 * k1(logps, ref_logps) ** 2


def k3(logps: Array, ref_logps: Array) -> Array:
  """k3 = exp(-d) - 1 + d = (r - 1) - log r with r = pi_ref / pi, per token (exponent clamped)."""
  d = k1(logps, ref_logps)
  return jnp.exp(jnp.minimum(-d, EXP_CLAMP)) - 1.0 + d


ESTIMATORS: dict[str, Callable[[Array, Array], Array]] = {"k1": k1, "k2": k2, "k3": k3}


def kl_estimate(logps: Array, ref_logps: Array, estimator: str = "k1") -> Array:
  """Per-token KL estimate with `estimator` in {"k1", "k2", "k3"}; same shape as the inputs."""
  check(estimator in ESTIMATORS,
        f"unknown KL estimator '{estimator}'; choose one of {list(ESTIMATORS)}")
  return ESTIMATORS[estimator](logps, ref_logps)


def sequence_kl(logps: Array, ref_logps: Array, mask: Array, estimator: str = "k1") -> Array:
  """Sequence KL estimate sum_t m_t * k_t, [B] from [B, T] inputs."""
  return masked_sum(kl_estimate(logps, ref_logps, estimator), mask, axis=-1)


def kl_penalty(batch: TokenBatch, *, estimator: str = "k2") -> Array:
  """Sequence-level KL(pi_theta || pi_ref) as a loss term: mean_b sum_t m * k_t.

  Used for the explicit KL regulariser of the Yun et al. objectives (OBJECTIVES.md §10.2, on-policy
  samples). The default k2 gives the per-state reverse-KL gradient (§1.4); k1 would give none.

  Args:
    batch: TokenBatch with `logps` (gradient), `ref_logps`, `mask`, [B, T] each, sampled on-policy.
  Returns:
    [] scalar.
  """
  batch = zero_masked(batch)
  ref = require(batch.ref_logps, "ref_logps", "kl_penalty")
  return jnp.mean(sequence_kl(batch.logps, ref, batch.mask, estimator))
