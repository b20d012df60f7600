"""Critic-free group policy losses: GRPO, Dr. GRPO, DAPO, GSPO, CISPO (OBJECTIVES.md §6).

All take a TokenBatch with `logps` (gradient), `old_logps` (optional: None means one update per
rollout, lp_old = sg(lp_new)), `ref_logps` (for the k3 penalty / kl metric), `mask`, and
`advantages` per sequence [B] (from `advantages.grpo_advantages`) or per token [B, T].
"""

from typing import Optional

import jax
import jax.numpy as jnp

from jaxalign.losses.kl import EXP_CLAMP, k3
from jaxalign.losses.ppo import clipped_surrogate, token_advantages, token_ratio
from jaxalign.losses.reductions import aggregate, divide, masked_mean, masked_sum
from jaxalign.losses.stats import Array, TokenBatch, as_float, check, finish, require, safe_div
from jaxalign.losses.stats import zero_masked

sg = jax.lax.stop_gradient


def _is_zero(x) -> bool:
  return isinstance(x, (int, float)) and x == 0


def _old(batch: TokenBatch) -> Array:
  return sg(as_float(batch.logps)) if batch.old_logps is None else as_float(batch.old_logps)


def _kl_metrics(batch: TokenBatch, mask: Array) -> dict[str, Array]:
  metrics = {"completions/mean_length": jnp.mean(jnp.sum(mask, axis=-1))}
  if batch.ref_logps is not None:
    metrics["kl"] = masked_mean(k3(batch.logps, batch.ref_logps), mask)
  if batch.entropy is not None:
    metrics["entropy"] = masked_mean(batch.entropy, mask)
  return metrics


def _clip_metrics(ratio, adv, mask, eps_low, eps_high) -> dict[str, Array]:
  low = ((ratio < 1.0 - eps_low) & (adv < 0)).astype(mask.dtype)
  high = ((ratio > 1.0 + eps_high) & (adv > 0)).astype(mask.dtype)
  return {"clip_ratio/low_mean": masked_mean(low, mask),
          "clip_ratio/high_mean": masked_mean(high, mask),
          "clip_ratio/region_mean": masked_mean(jnp.maximum(low, high), mask)}


def grpo_loss(batch: TokenBatch, *, eps_low: float = 0.2, eps_high: float = 0.2,
              beta: float = 0.04, aggregation: str = "seq_mean_token_mean",
              max_len: Optional[int] = None, dual_clip: Optional[float] = None,
              kl_bias_correction: bool = False, num_tokens: Optional[Array] = None,
              num_sequences: Optional[Array] = None) -> tuple[Array, dict]:
  """GRPO, DeepSeekMath (arXiv:2402.03300) Eq. (3) with the k3 penalty of Eq. (4) (§6.1).

  l_{i,t} = -min(rho A_i, clip(rho, 1-eps_low, 1+eps_high) A_i) + beta * k3_{i,t};
  L = (1/N_seq) sum_i (1/|o_i|) sum_t m l_{i,t} under the default aggregation. Other aggregations
  (reductions.AGGREGATIONS) give BNPO/DAPO ("token_mean") and Dr. GRPO ("constant").

  kl_bias_correction: the k3 term times the importance ratio rho (DeepSeek-V3.2, arXiv:2512.02556; TRL's
  `use_bias_correction_kl`): an unbiased KL(pi_theta || pi_ref) estimate from samples of pi_old.

  Returns:
    (loss [], metrics: kl, clip_ratio/low_mean|high_mean|region_mean, completions/mean_length,
    entropy, numerator, denominator).
  """
  batch = zero_masked(batch)
  mask = as_float(batch.mask)
  adv = token_advantages(require(batch.advantages, "advantages", "grpo"), mask)
  ratio = token_ratio(batch.logps, _old(batch))
  per_token, _ = clipped_surrogate(ratio, adv, eps_low=eps_low, eps_high=eps_high,
                                   dual_clip=dual_clip)
  if not _is_zero(beta):
    kl = k3(batch.logps, require(batch.ref_logps, "ref_logps", "grpo"))
    per_token = per_token + beta * (kl * ratio if kl_bias_correction else kl)
  num, den = aggregate(per_token, mask, aggregation, max_len=max_len, num_tokens=num_tokens,
                       num_sequences=num_sequences)
  metrics = {**_kl_metrics(batch, mask), **_clip_metrics(ratio, adv, mask, eps_low, eps_high),
             "numerator": num, "denominator": den}
  return finish(divide(num, den), metrics)


def dr_grpo_loss(batch: TokenBatch, *, max_len: int, eps_low: float = 0.2,
                 eps_high: float = 0.2, beta: float = 0.0, kl_bias_correction: bool = False,
                 num_sequences: Optional[Array] = None) -> tuple[Array, dict]:
  """Dr. GRPO (arXiv:2503.20783; §6.2): sum_{i,t} m l_{i,t} / (N_seq * L_max).

  Use with `grpo_advantages(..., scale="none")`. `max_len` is the configured maximum completion
  length (a constant, never the batch's longest completion).
  """
  return grpo_loss(batch, eps_low=eps_low, eps_high=eps_high, beta=beta, aggregation="constant",
                   max_len=max_len, kl_bias_correction=kl_bias_correction, num_sequences=num_sequences)


def dapo_loss(batch: TokenBatch, *, eps_low: float = 0.2, eps_high: float = 0.28,
              beta: float = 0.0, kl_bias_correction: bool = False,
              num_tokens: Optional[Array] = None) -> tuple[Array, dict]:
  """DAPO (arXiv:2503.14476; §6.3): clip-higher (0.2 / 0.28), token-level mean, no KL term.

  Pass `num_tokens` = the token count of the whole optimiser step (TRL "dapo"); without it the
  local count is used (TRL "bnpo"). Dynamic sampling: `advantages.groups_with_signal`; overlong
  reward: `shaping.overlong_penalty`.
  """
  return grpo_loss(batch, eps_low=eps_low, eps_high=eps_high, beta=beta, aggregation="token_mean",
                   kl_bias_correction=kl_bias_correction, num_tokens=num_tokens)


def gspo_loss(batch: TokenBatch, *, eps_low: float = 3e-4, eps_high: float = 4e-4,
              beta: float = 0.0, aggregation: str = "sequence_mean",
              num_sequences: Optional[Array] = None,
              num_tokens: Optional[Array] = None) -> tuple[Array, dict]:
  """GSPO, sequence-level ratio (arXiv:2507.18071; OBJECTIVES.md §6.5).

  s_i = exp((1/|o_i|) sum_t m (lp_new - lp_old));  l_i = -min(s_i A_i, clip(s_i, 1-eps_low,
  1+eps_high) A_i) [+ beta * mean_t k3];  L = (1/N_seq) sum_i l_i. `aggregation="token_mean"`
  weights l_i by |o_i| (TRL's "dapo"/"bnpo" reductions; not the paper). Fully masked rows give 0.

  Args:
    batch: TokenBatch; `advantages` must be per sequence [B].
  """
  check(aggregation in ("sequence_mean", "token_mean"),
        f"gspo: aggregation must be 'sequence_mean' or 'token_mean', got '{aggregation}'")
  batch = zero_masked(batch)
  mask = as_float(batch.mask)
  adv = sg(require(batch.advantages, "advantages", "gspo"))
  check(adv.ndim == 1, "gspo needs per-sequence advantages [B]; use gspo_token for [B, T]")
  n = jnp.sum(mask, axis=-1)  # [B]
  log_s = safe_div(masked_sum(as_float(batch.logps) - _old(batch), mask, axis=-1), n)
  s = jnp.exp(jnp.minimum(log_s, EXP_CLAMP))  # [B]
  per_seq, _ = clipped_surrogate(s, adv, eps_low=eps_low, eps_high=eps_high)
  if not _is_zero(beta):
    kl = k3(batch.logps, require(batch.ref_logps, "ref_logps", "gspo"))
    per_seq = per_seq + beta * safe_div(masked_sum(kl, mask, axis=-1), n)
  per_seq = jnp.where(n > 0, per_seq, 0.0)
  if aggregation == "sequence_mean":
    num, den = jnp.sum(per_seq), as_float(adv.shape[0] if num_sequences is None else num_sequences)
  else:
    num, den = jnp.sum(per_seq * n), as_float(jnp.sum(n) if num_tokens is None else num_tokens)
  seq_mask = (n > 0).astype(mask.dtype)
  metrics = {**_kl_metrics(batch, mask), **_clip_metrics(s, adv, seq_mask, eps_low, eps_high),
             "ratio/mean": masked_mean(s, seq_mask), "numerator": num, "denominator": den}
  return finish(divide(num, den), metrics)


def gspo_token_loss(batch: TokenBatch, *, eps_low: float = 3e-4, eps_high: float = 4e-4,
                    beta: float = 0.0, num_sequences: Optional[Array] = None) -> tuple[Array, dict]:
  """GSPO-token (arXiv:2507.18071; §6.5): s_{i,t} = sg(s_i) exp(lp_t - sg(lp_t)), per-token A.

  Same value as s_i; with A_{i,t} = A_i it has the same loss and gradient as `gspo_loss`.
  Aggregated as a per-sequence token mean, then a mean over sequences.
  """
  batch = zero_masked(batch)
  mask = as_float(batch.mask)
  adv = token_advantages(require(batch.advantages, "advantages", "gspo_token"), mask)
  lp = as_float(batch.logps)
  log_s = safe_div(masked_sum(lp - _old(batch), mask, axis=-1), jnp.sum(mask, axis=-1))  # [B]
  s_tok = sg(jnp.exp(jnp.minimum(log_s, EXP_CLAMP)))[:, None] * jnp.exp(lp - sg(lp))  # [B, T]
  per_token, _ = clipped_surrogate(s_tok, adv, eps_low=eps_low, eps_high=eps_high)
  if not _is_zero(beta):
    per_token = per_token + beta * k3(lp, require(batch.ref_logps, "ref_logps", "gspo_token"))
  num, den = aggregate(per_token, mask, "seq_mean_token_mean", num_sequences=num_sequences)
  metrics = {**_kl_metrics(batch, mask), **_clip_metrics(s_tok, adv, mask, eps_low, eps_high),
             "numerator": num, "denominator": den}
  return finish(divide(num, den), metrics)


def cispo_loss(batch: TokenBatch, *, eps_max: float = 5.0, eps_min: Optional[float] = None,
               beta: float = 0.0, aggregation: str = "token_mean",
               num_tokens: Optional[Array] = None,
               num_sequences: Optional[Array] = None) -> tuple[Array, dict]:
  """CISPO, MiniMax-M1 (arXiv:2506.13585; OBJECTIVES.md §6.6).

  w = sg(clip(rho, eps_min, eps_max));  L = -sum m w A lp_new / sum m  (token-level).
  `eps_max` is the absolute cap on the IS weight (TRL's `epsilon_high`; 1.2 means "1 + 0.2";
  TRL recommends 5.0); `eps_min` (absolute, default None = no lower bound, as in the paper).
  The weight is detached, so clipped tokens keep the gradient -w A / N_tok.

  Returns:
    (loss [], metrics: cispo_clip_ratio = masked mean of (rho > eps_max) & (A > 0), kl, ...).
  """
  batch = zero_masked(batch)
  mask = as_float(batch.mask)
  adv = token_advantages(require(batch.advantages, "advantages", "cispo"), mask)
  lp = as_float(batch.logps)
  ratio = token_ratio(lp, require(batch.old_logps, "old_logps", "cispo"))
  weight = jnp.minimum(ratio, eps_max)
  if eps_min is not None:
    weight = jnp.maximum(weight, eps_min)
  per_token = -sg(weight) * adv * lp
  if not _is_zero(beta):
    per_token = per_token + beta * k3(lp, require(batch.ref_logps, "ref_logps", "cispo"))
  num, den = aggregate(per_token, mask, aggregation, num_tokens=num_tokens,
                       num_sequences=num_sequences)
  clipped = ((ratio > eps_max) & (adv > 0)).astype(mask.dtype)
  metrics = {**_kl_metrics(batch, mask), "cispo_clip_ratio": masked_mean(clipped, mask),
             "numerator": num, "denominator": den}
  return finish(divide(num, den), metrics)
