"""Smooth replacements of the GRPO hard clip: SAPO (soft sigmoid gate) and VESPO (Gamma IS kernel).

Both take the GRPO-family TokenBatch of grpo.py (`logps`, `old_logps` (None = on-policy), `ref_logps`
for the k3 penalty, `mask`, `advantages` [B] or [B, T]) and the token filters of policy_masks.py
(`top_entropy_quantile`, `off_policy_mask_threshold`, off by default). TRL: GRPOConfig
`loss_type="sapo"` / `loss_type="vespo"`.
"""

import math
from typing import Optional

import jax
import jax.numpy as jnp

from jaxalign.losses.grpo import _filtered, _is_zero, _kl_metrics, _old
from jaxalign.losses.kl import k3
from jaxalign.losses.policy_masks import policy_token_filter
from jaxalign.losses.ppo import token_advantages, token_ratio
from jaxalign.losses.reductions import aggregate, divide, masked_mean, masked_sum
from jaxalign.losses.stats import Array, TokenBatch, as_float, check, finish, require, zero_masked

sg = jax.lax.stop_gradient

VESPO_LOG_RATIO_CLAMP = 20.0       # per-token and sequence log-ratio cap (TRL / VESPO reference code)
VESPO_LOG_W_MIN = math.log(1e-8)   # lower cap of the sequence log-weight


def sapo_loss(batch: TokenBatch, *, tau_pos: float = 1.0, tau_neg: float = 1.05, beta: float = 0.0,
              aggregation: str = "seq_mean_token_mean", max_len: Optional[int] = None,
              kl_bias_correction: bool = False, top_entropy_quantile: float = 1.0,
              off_policy_mask_threshold: Optional[float] = None, num_tokens: Optional[Array] = None,
              num_sequences: Optional[Array] = None) -> tuple[Array, dict]:
  """SAPO, Soft Adaptive Policy Optimization (Gao et al. 2025, arXiv:2511.20347; TRL `loss_type="sapo"`).

  The hard clip of GRPO is replaced by a temperature-controlled sigmoid gate of the token ratio:
    r_{i,t} = exp(lp_new - lp_old),  tau_{i,t} = tau_pos if A_{i,t} > 0 else tau_neg,
    f_{i,t}(r) = sigmoid(tau_{i,t} (r - 1)) * 4 / tau_{i,t},
    J = (1/G) sum_i (1/|o_i|) sum_t f_{i,t}(r_{i,t}) A_{i,t}   (the paper's objective; L = -J),
  plus beta * k3 (optionally times r: `kl_bias_correction`, as grpo_loss). df/dr = 4 s (1 - s), s the
  sigmoid, is 1 at r = 1, so on-policy SAPO has the GRPO gradient; the weight decays smoothly off-policy
  (faster for A <= 0 when tau_neg > tau_pos, the paper's recommendation; TRL defaults 1.0 / 1.05).
  The loss value is not GRPO's (f(1) = 2 / tau). TRL aggregates as "grpo" (default here); other
  reductions.AGGREGATIONS are accepted.

  Args:
    batch: TokenBatch (see module docstring).
    tau_pos, tau_neg: gate temperatures (> 0; TRL `sapo_temperature_pos` / `sapo_temperature_neg`).
    num_tokens / num_sequences: step-level counts for exact accumulation.
  Returns:
    (loss [], metrics: kl, entropy, completions/mean_length, sapo/gate_mean, ratio/mean, numerator,
    denominator, and the filters' metrics when they are on).
  """
  check(lambda: tau_pos > 0 and tau_neg > 0, f"sapo: temperatures must be > 0, got {tau_pos}, {tau_neg}")
  batch = zero_masked(batch)
  mask = as_float(batch.mask)
  adv = token_advantages(require(batch.advantages, "advantages", "sapo"), mask)
  ratio = token_ratio(batch.logps, _old(batch))
  tau = jnp.where(adv > 0, tau_pos, tau_neg)
  gate = jax.nn.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau
  keep, filter_metrics = policy_token_filter(batch, adv, mask, top_entropy_quantile=top_entropy_quantile,
                                             off_policy_mask_threshold=off_policy_mask_threshold, loss="sapo")
  per_token = _filtered(-gate * adv, keep)
  if not _is_zero(beta):
    kl = k3(batch.logps, require(batch.ref_logps, "ref_logps", "sapo"))
    per_token = per_token + beta * (kl * ratio if kl_bias_correction else kl)
  num, den = aggregate(per_token, mask, aggregation, max_len=max_len, num_tokens=num_tokens,
                       num_sequences=num_sequences)
  metrics = {**_kl_metrics(batch, mask), "sapo/gate_mean": masked_mean(gate, mask),
             "ratio/mean": masked_mean(ratio, mask), **filter_metrics, "numerator": num, "denominator": den}
  return finish(divide(num, den), metrics)


def vespo_weights(logps: Array, old_logps: Array, advantages: Array, mask: Array, *, k_pos: float,
                  lambda_pos: float, k_neg: float, lambda_neg: float) -> tuple[Array, Array]:
  """VESPO's Gamma kernel phi(W) = W^k exp(lambda (1 - W)) of the sequence IS weight (detached).

  W_i = exp(sum_t m clip(lp_new - lp_old, -20, 20)), the log clamped to [log 1e-8, 20] (a product, not
  the GSPO geometric mean); (k, lambda) = (k_pos, lambda_pos) where A >= 0 else (k_neg, lambda_neg),
  lambda floored at 1e-4. phi(1) = 1. Computed as exp(lambda + k log W - lambda W), non-finite -> 0.

  Args:
    logps, old_logps, mask: [B, T]; advantages: [B, T] (per-sequence ones broadcast).
  Returns:
    (phi [B, T], log W [B]).
  """
  log_ratio = jnp.clip(as_float(logps) - as_float(old_logps), -VESPO_LOG_RATIO_CLAMP, VESPO_LOG_RATIO_CLAMP)
  log_w = sg(jnp.clip(masked_sum(log_ratio, mask, axis=-1), VESPO_LOG_W_MIN, VESPO_LOG_RATIO_CLAMP))  # [B]
  nonneg = sg(as_float(advantages)) >= 0
  k = jnp.where(nonneg, k_pos, k_neg)
  lam = jnp.maximum(jnp.where(nonneg, lambda_pos, lambda_neg), 1e-4)
  phi = jnp.exp(lam + k * log_w[:, None] - lam * jnp.exp(log_w)[:, None])
  return jnp.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0), log_w


def vespo_loss(batch: TokenBatch, *, k_pos: float = 2.0, lambda_pos: float = 3.0, k_neg: float = 3.0,
               lambda_neg: float = 2.0, beta: float = 0.0, aggregation: str = "token_mean",
               kl_bias_correction: bool = False, top_entropy_quantile: float = 1.0,
               off_policy_mask_threshold: Optional[float] = None, num_tokens: Optional[Array] = None,
               num_sequences: Optional[Array] = None) -> tuple[Array, dict]:
  """VESPO, Variational sEquence-level Soft Policy Optimization (Shen et al. 2026, arXiv:2602.10693).

  L = -E[ sg(phi(W)) A log pi_theta ] with the Gamma reshaping kernel phi(W) = W^k exp(lambda (1 - W))
  of the sequence importance weight W = pi_theta(o) / mu(o) (`vespo_weights`; the paper's c1, c2 =
  k, lambda, §3.4; TRL defaults k/lambda = 2/3 for A >= 0 and 3/2 for A < 0). Per token:
    l_{i,t} = -sg(phi_i) A_{i,t} lp_new_{i,t}  [+ beta k3],  L = sum m l / N_tok  (TRL: like "dapo").
  Like CISPO, the value contains lp_new (not comparable to GRPO values); dL/dlp_{i,t} = -phi_i A / N_tok.
  mu is `old_logps` (None: W = 1, phi = 1, plain REINFORCE with A). TRL also folds a vLLM
  token IS ratio pi_old / pi_sampler into W; pass the sampler's log-probs as `old_logps` for that.

  Args:
    batch: TokenBatch (see module docstring).
    k_pos, lambda_pos, k_neg, lambda_neg: kernel parameters (TRL `vespo_k_pos`, ...).
    aggregation: reductions.AGGREGATIONS (default token mean over `num_tokens`).
  Returns:
    (loss [], metrics: vespo/phi_seq_mean (mean over non-empty sequences, or over tokens for [B, T]
    advantages), kl, entropy, completions/mean_length, numerator, denominator, filters' metrics).
  """
  batch = zero_masked(batch)
  mask = as_float(batch.mask)
  raw_adv = require(batch.advantages, "advantages", "vespo")
  adv = token_advantages(raw_adv, mask)
  lp = as_float(batch.logps)
  old = _old(batch)
  phi, _ = vespo_weights(lp, old, adv, mask, k_pos=k_pos, lambda_pos=lambda_pos, k_neg=k_neg,
                         lambda_neg=lambda_neg)
  keep, filter_metrics = policy_token_filter(batch, adv, mask, top_entropy_quantile=top_entropy_quantile,
                                             off_policy_mask_threshold=off_policy_mask_threshold, loss="vespo")
  per_token = _filtered(-phi * adv * lp, keep)
  if not _is_zero(beta):
    kl = k3(lp, require(batch.ref_logps, "ref_logps", "vespo"))
    per_token = per_token + beta * (kl * token_ratio(lp, old) if kl_bias_correction else kl)
  num, den = aggregate(per_token, mask, aggregation, num_tokens=num_tokens, num_sequences=num_sequences)
  if jnp.ndim(raw_adv) == 1:
    phi_mean = masked_mean(phi[:, 0], (jnp.sum(mask, axis=-1) > 0).astype(mask.dtype))
  else:
    phi_mean = masked_mean(phi, mask)
  metrics = {**_kl_metrics(batch, mask), "vespo/phi_seq_mean": phi_mean, **filter_metrics,
             "numerator": num, "denominator": den}
  return finish(divide(num, den), metrics)
