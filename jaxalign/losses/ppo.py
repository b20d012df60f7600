"""PPO for RLHF: clipped surrogate, dual clip, clipped value loss, entropy bonus (OBJECTIVES.md §5).

Schulman et al. 2017 (arXiv:1707.06347): clipped surrogate Eq. (7), combined objective Eq. (9).
Value clipping follows the OpenAI baselines / TRL implementation ("The N+ Implementation Details
of RLHF with PPO", arXiv:2403.17031). Dual clip: Ye et al. 2020 (arXiv:1912.09729), dual-clip PPO.
Advantages come from `advantages.gae` + `advantages.whiten` (or any estimator) in the batch.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from jaxalign.losses.kl import EXP_CLAMP
from jaxalign.losses.reductions import aggregate, divide, masked_mean
from jaxalign.losses.stats import Array, TokenBatch, as_float, check, finish, require
from jaxalign.losses.stats import zero_masked

sg = jax.lax.stop_gradient


def token_ratio(logps: Array, old_logps: Array) -> Array:
  """rho = exp(lp_new - lp_old), exponent clamped at EXP_CLAMP; old log-probs are detached."""
  return jnp.exp(jnp.minimum(as_float(logps) - sg(as_float(old_logps)), EXP_CLAMP))


def token_advantages(advantages: Array, like: Array) -> Array:
  """Broadcasts per-sequence advantages [B] (or token advantages [B, T]) to [B, T]; detached."""
  adv = sg(as_float(advantages))
  if adv.ndim == 1:
    adv = adv[:, None]
  return jnp.broadcast_to(adv, like.shape)


def clipped_surrogate(ratio: Array, adv: Array, *, eps_low: float, eps_high: float,
                      dual_clip: Optional[float] = None) -> tuple[Array, Array]:
  """Per-token loss max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high)) (PPO Eq. (7), negated).

  With `dual_clip = c > 1`, tokens with A < 0 are additionally capped at -c A (Ye et al. 2020).
  Returns (loss, clipped) where clipped marks tokens on which the clipped branch is active.
  """
  check(lambda: dual_clip is None or dual_clip > 1, f"dual_clip must be > 1, got {dual_clip}")
  pg1 = -adv * ratio
  pg2 = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  loss = jnp.maximum(pg1, pg2)
  if dual_clip is not None:
    loss = jnp.where(adv < 0, jnp.minimum(loss, -dual_clip * adv), loss)
  return loss, pg2 > pg1


def clipped_value_loss(values: Array, old_values: Array, returns: Array, *,
                       eps_v: Optional[float]) -> tuple[Array, Array]:
  """vf = 0.5 max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, -eps_v, eps_v).

  eps_v = None gives the unclipped 0.5 (V - R)^2. Returns (per-token loss, clipped indicator).
  """
  values, returns = as_float(values), sg(as_float(returns))
  unclipped = (values - returns) ** 2
  if eps_v is None:
    return 0.5 * unclipped, jnp.zeros(values.shape, bool)
  old = sg(as_float(old_values))
  clipped = (old + jnp.clip(values - old, -eps_v, eps_v) - returns) ** 2
  return 0.5 * jnp.maximum(unclipped, clipped), clipped > unclipped


def ppo_loss(batch: TokenBatch, *, eps: float = 0.2, eps_high: Optional[float] = None,
             dual_clip: Optional[float] = None, vf_coef: float = 0.1,
             eps_v: Optional[float] = 0.2, ent_coef: float = 0.0,
             aggregation: str = "token_mean", max_len: Optional[int] = None,
             num_tokens: Optional[Array] = None,
             num_sequences: Optional[Array] = None) -> tuple[Array, dict]:
  """L_PPO = agg(pg) + vf_coef * agg(vf) - ent_coef * agg(H) (PPO Eq. (9); OBJECTIVES.md §5.2).

  Args:
    batch: TokenBatch with `logps`, `old_logps`, `advantages` ([B, T] or [B]) and `mask`; for the
      value loss `values`, `old_values`, `returns` (skipped when `values` is None); `entropy` when
      ent_coef != 0 (and for the metric).
    eps: clip range; eps_high: upper range if different (clip-higher), default eps.
    dual_clip: optional c > 1 for A < 0. vf_coef, eps_v (None = no value clipping), ent_coef:
      TRL defaults 0.1, 0.2, 0.
    aggregation: reductions.AGGREGATIONS (default global token mean); max_len for "constant".
    num_tokens / num_sequences: step-level counts for exact gradient accumulation.
  Returns:
    (loss [], metrics: loss/policy, loss/value, policy/approxkl, policy/clipfrac, val/clipfrac,
    val/ratio, policy/entropy, numerator, denominator).
  """
  batch = zero_masked(batch)
  mask = as_float(batch.mask)
  old = require(batch.old_logps, "old_logps", "ppo")
  adv = token_advantages(require(batch.advantages, "advantages", "ppo"), mask)
  ratio = token_ratio(batch.logps, old)
  eps_high = eps if eps_high is None else eps_high
  pg, pg_clipped = clipped_surrogate(ratio, adv, eps_low=eps, eps_high=eps_high,
                                     dual_clip=dual_clip)
  agg = lambda x: aggregate(x, mask, aggregation, max_len=max_len, num_tokens=num_tokens,
                            num_sequences=num_sequences)
  total = pg
  metrics = {"loss/policy": divide(*agg(pg))}
  if batch.values is not None:
    old_values = None if eps_v is None else require(batch.old_values, "old_values", "ppo")
    returns = require(batch.returns, "returns", "ppo")
    vf, vf_clipped = clipped_value_loss(batch.values, old_values, returns, eps_v=eps_v)
    total = total + vf_coef * vf
    metrics["loss/value"] = divide(*agg(vf))
    metrics["val/clipfrac"] = masked_mean(vf_clipped.astype(mask.dtype), mask)
  if batch.entropy is not None:
    metrics["policy/entropy"] = masked_mean(batch.entropy, mask)
  if not (isinstance(ent_coef, (int, float)) and ent_coef == 0):
    total = total - ent_coef * require(batch.entropy, "entropy", "ppo (ent_coef != 0)")
  num, den = agg(total)
  log_ratio = as_float(batch.logps) - old
  metrics.update({
      "policy/approxkl": 0.5 * masked_mean(log_ratio ** 2, mask),
      "policy/clipfrac": masked_mean(pg_clipped.astype(mask.dtype), mask),
      "val/ratio": masked_mean(ratio, mask),
      "numerator": num,
      "denominator": den,
  })
  return finish(divide(num, den), metrics)


def reinforce_pp_loss(batch: TokenBatch, *, eps: float = 0.2, eps_high: Optional[float] = None,
                      aggregation: str = "token_mean",
                      num_tokens: Optional[Array] = None) -> tuple[Array, dict]:
  """REINFORCE++ (arXiv:2501.03262; OBJECTIVES.md §7.4): PPO clipped token loss, no critic.

  Advantages must come from `advantages.reinforce_pp_advantages` (globally whitened returns of the
  KL-shaped token rewards). Value fields of the batch are ignored.
  """
  batch = batch._replace(values=None)
  return ppo_loss(batch, eps=eps, eps_high=eps_high, aggregation=aggregation,
                  num_tokens=num_tokens)
