"""Critic-free group policy losses: GRPO, Dr. GRPO, DAPO, GSPO, LUSPO, CISPO (OBJECTIVES.md §6).

All take a TokenBatch with `logps` (gradient), `old_logps` (optional: None means one update per
rollout, lp_old = sg(lp_new)), `ref_logps` (for the k3 penalty / kl metric), `mask`, and
`advantages` per sequence [B] (from `advantages.grpo_advantages`) or per token [B, T].

Every loss here (and SAPO / VESPO in soft_gates.py) also takes the two token filters of
policy_masks.py, with defaults that change nothing: `top_entropy_quantile` (rho < 1 keeps the policy
term only on the top-rho entropy tokens, arXiv:2506.01939; needs `entropy`; not exact under
micro-batch accumulation) and `off_policy_mask_threshold` (delta: drops negative-advantage sequences
whose mean log(pi_old / pi_theta) exceeds delta, DeepSeek-V3.2 Eq. (9)).
"""

from typing import Optional

import jax
import jax.numpy as jnp

from jaxalign.losses.kl import EXP_CLAMP, k3
from jaxalign.losses.policy_masks import policy_token_filter
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


def _filtered(per_token: Array, keep: Optional[Array]) -> Array:
  """Applies a policy_masks filter to the per-token policy term (None = no filter)."""
  return per_token if keep is None else per_token * keep


def _clip_metrics(ratio, adv, mask, eps_low, eps_high) -> dict[str, Array]:
  low = ((ratio < 1.0 - eps_low) & (adv < 0)).astype(mask.dtype)
  high = ((ratio > 1.0 + eps_high) & (adv > 0)).astype(mask.dtype)
  return {"clip_ratio/low_mean": masked_mean(low, mask),
          "clip_ratio/high_mean": masked_mean(high, mask),
          "clip_ratio/region_mean": masked_mean(jnp.maximum(low, high), mask)}


def grpo_loss(batch: TokenBatch, *, eps_low: float = 0.2, eps_high: float = 0.2,
              beta: float = 0.04, aggregation: str = "seq_mean_token_mean",
              max_len: Optional[int] = None, dual_clip: Optional[float] = None,
              kl_bias_correction: bool = False, top_entropy_quantile: float = 1.0,
              off_policy_mask_threshold: Optional[float] = None, num_tokens: Optional[Array] = None,
              num_sequences: Optional[Array] = None) -> tuple[Array, dict]:
  """GRPO, DeepSeekMath (arXiv:2402.03300) Eq. (3) with the k3 penalty of Eq. (4) (§6.1).

  l_{i,t} = -min(rho A_i, clip(rho, 1-eps_low, 1+eps_high) A_i) + beta * k3_{i,t};
  L = (1/N_seq) sum_i (1/|o_i|) sum_t m l_{i,t} under the default aggregation. Other aggregations
  (reductions.AGGREGATIONS) give BNPO/DAPO ("token_mean") and Dr. GRPO ("constant").

  kl_bias_correction: the k3 term times the importance ratio rho (DeepSeek-V3.2, arXiv:2512.02556; TRL's
  `use_bias_correction_kl`): an unbiased KL(pi_theta || pi_ref) estimate from samples of pi_old.
  top_entropy_quantile / off_policy_mask_threshold: token filters of the policy term (policy_masks.py).

  Returns:
    (loss [], metrics: kl, clip_ratio/low_mean|high_mean|region_mean, completions/mean_length,
    entropy, numerator, denominator, and the filters' metrics when they are on).
  """
  batch = zero_masked(batch)
  mask = as_float(batch.mask)
  adv = token_advantages(require(batch.advantages, "advantages", "grpo"), mask)
  ratio = token_ratio(batch.logps, _old(batch))
  per_token, _ = clipped_surrogate(ratio, adv, eps_low=eps_low, eps_high=eps_high,
                                   dual_clip=dual_clip)
  keep, filter_metrics = policy_token_filter(batch, adv, mask, top_entropy_quantile=top_entropy_quantile,
                                             off_policy_mask_threshold=off_policy_mask_threshold, loss="grpo")
  per_token = _filtered(per_token, keep)
  if not _is_zero(beta):
    kl = k3(batch.logps, require(batch.ref_logps, "ref_logps", "grpo"))
    per_token = per_token + beta * (kl * ratio if kl_bias_correction else kl)
  num, den = aggregate(per_token, mask, aggregation, max_len=max_len, num_tokens=num_tokens,
                       num_sequences=num_sequences)
  metrics = {**_kl_metrics(batch, mask), **_clip_metrics(ratio, adv, mask, eps_low, eps_high),
             **filter_metrics, "numerator": num, "denominator": den}
  return finish(divide(num, den), metrics)


def dr_grpo_loss(batch: TokenBatch, *, max_len: int, eps_low: float = 0.2,
                 eps_high: float = 0.2, beta: float = 0.0, kl_bias_correction: bool = False,
                 top_entropy_quantile: float = 1.0, off_policy_mask_threshold: Optional[float] = None,
                 num_sequences: Optional[Array] = None) -> tuple[Array, dict]:
  """Dr. GRPO (arXiv:2503.20783; §6.2): sum_{i,t} m l_{i,t} / (N_seq * L_max).

  Use with `grpo_advantages(..., scale="none")`. `max_len` is the configured maximum completion
  length (a constant, never the batch's longest completion).
  """
  return grpo_loss(batch, eps_low=eps_low, eps_high=eps_high, beta=beta, aggregation="constant",
                   max_len=max_len, kl_bias_correction=kl_bias_correction,
                   top_entropy_quantile=top_entropy_quantile,
                   off_policy_mask_threshold=off_policy_mask_threshold, num_sequences=num_sequences)


def dapo_loss(batch: TokenBatch, *, eps_low: float = 0.2, eps_high: float = 0.28,
              beta: float = 0.0, kl_bias_correction: bool = False, top_entropy_quantile: float = 1.0,
              off_policy_mask_threshold: Optional[float] = None,
              num_tokens: Optional[Array] = None) -> tuple[Array, dict]:
  """DAPO (arXiv:2503.14476; §6.3): clip-higher (0.2 / 0.28), token-level mean, no KL term.

  Pass `num_tokens` = the token count of the whole optimiser step (TRL "dapo"); without it the
  local count is used (TRL "bnpo"). Dynamic sampling: `advantages.groups_with_signal`; overlong
  reward: `shaping.overlong_penalty`.
  """
  return grpo_loss(batch, eps_low=eps_low, eps_high=eps_high, beta=beta, aggregation="token_mean",
                   kl_bias_correction=kl_bias_correction, top_entropy_quantile=top_entropy_quantile,
                   off_policy_mask_threshold=off_policy_mask_threshold, num_tokens=num_tokens)


def _gspo_terms(batch: TokenBatch, *, eps_low: float, eps_high: float, beta: float,
                top_entropy_quantile: float, off_policy_mask_threshold: Optional[float],
                loss: str) -> tuple[Array, Array, Array, dict]:
  """Per-sequence GSPO losses shared by GSPO and LUSPO (arXiv:2507.18071; OBJECTIVES.md §6.5).

  l_i = -min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i) * k_i / |o_i| [+ beta * mean_t k3], with
  s_i = exp((1/|o_i|) sum_t m (lp_new - lp_old)) and k_i = sum_t m f_{i,t} the loss tokens kept by the
  policy_masks filter (k_i = |o_i| without one): TRL broadcasts l_i to the tokens before filtering.

  Returns:
    (l [B] (0 on fully masked rows), |o| [B], A [B], metrics).
  """
  batch = zero_masked(batch)
  mask = as_float(batch.mask)
  adv = sg(require(batch.advantages, "advantages", loss))
  check(adv.ndim == 1, f"{loss} needs per-sequence advantages [B]; use gspo_token for [B, T]")
  n = jnp.sum(mask, axis=-1)  # [B]
  log_s = safe_div(masked_sum(as_float(batch.logps) - _old(batch), mask, axis=-1), n)
  s = jnp.exp(jnp.minimum(log_s, EXP_CLAMP))  # [B]
  per_seq, _ = clipped_surrogate(s, adv, eps_low=eps_low, eps_high=eps_high)
  keep, filter_metrics = policy_token_filter(batch, token_advantages(adv, mask), mask,
                                             top_entropy_quantile=top_entropy_quantile,
                                             off_policy_mask_threshold=off_policy_mask_threshold, loss=loss)
  if keep is not None:
    per_seq = per_seq * safe_div(masked_sum(keep, mask, axis=-1), n)
  if not _is_zero(beta):
    kl = k3(batch.logps, require(batch.ref_logps, "ref_logps", loss))
    per_seq = per_seq + beta * safe_div(masked_sum(kl, mask, axis=-1), n)
  per_seq = jnp.where(n > 0, per_seq, 0.0)
  seq_mask = (n > 0).astype(mask.dtype)
  metrics = {**_kl_metrics(batch, mask), **_clip_metrics(s, adv, seq_mask, eps_low, eps_high),
             "ratio/mean": masked_mean(s, seq_mask), **filter_metrics}
  return per_seq, n, adv, metrics


def gspo_loss(batch: TokenBatch, *, eps_low: float = 3e-4, eps_high: float = 4e-4,
              beta: float = 0.0, aggregation: str = "sequence_mean", top_entropy_quantile: float = 1.0,
              off_policy_mask_threshold: Optional[float] = None,
              num_sequences: Optional[Array] = None,
              num_tokens: Optional[Array] = None) -> tuple[Array, dict]:
  """GSPO, sequence-level ratio (arXiv:2507.18071; OBJECTIVES.md §6.5).

  s_i = exp((1/|o_i|) sum_t m (lp_new - lp_old));  l_i = -min(s_i A_i, clip(s_i, 1-eps_low,
  1+eps_high) A_i) [+ beta * mean_t k3];  L = (1/N_seq) sum_i l_i. `aggregation="token_mean"`
  weights l_i by |o_i| (TRL's "dapo"/"bnpo" reductions; not the paper). Fully masked rows give 0.
  Token filters (policy_masks.py) scale the policy part of l_i by the kept fraction of its tokens.

  Args:
    batch: TokenBatch; `advantages` must be per sequence [B].
  """
  check(aggregation in ("sequence_mean", "token_mean"),
        f"gspo: aggregation must be 'sequence_mean' or 'token_mean', got '{aggregation}'")
  per_seq, n, adv, metrics = _gspo_terms(batch, eps_low=eps_low, eps_high=eps_high, beta=beta,
                                         top_entropy_quantile=top_entropy_quantile,
                                         off_policy_mask_threshold=off_policy_mask_threshold, loss="gspo")
  if aggregation == "sequence_mean":
    num, den = jnp.sum(per_seq), as_float(adv.shape[0] if num_sequences is None else num_sequences)
  else:
    num, den = jnp.sum(per_seq * n), as_float(jnp.sum(n) if num_tokens is None else num_tokens)
  return finish(divide(num, den), {**metrics, "numerator": num, "denominator": den})


def luspo_loss(batch: TokenBatch, *, eps_low: float = 2e-3, eps_high: float = 2.5e-3,
               beta: float = 0.0, top_entropy_quantile: float = 1.0,
               off_policy_mask_threshold: Optional[float] = None,
               num_sequences: Optional[Array] = None) -> tuple[Array, dict]:
  """LUSPO, Length-Unbiased Sequence Policy Optimization (Liu et al. 2026, arXiv:2602.05261).

  GSPO with each sequence loss scaled by its length (TRL `loss_type="luspo"`, which needs
  `importance_sampling_level="sequence"`):  L = (1/N_seq) sum_i |o_i| l_i,  l_i as in `gspo_loss`
  (so the KL part is (1/N_seq) sum_i beta sum_t k3). Defaults eps 2e-3 / 2.5e-3 are the paper's §5.1
  setting (TRL docs). With a token filter, |o_i| l_i^pg becomes k_i l_i^pg (k_i kept tokens).
  Measured against TRL 1.16's GRPOTrainer `luspo` (bench/trl_agreement.py) with beta 0 and 0.04 and with
  the token filters: equal to 3e-16 (TRL sums each row's masked tokens, then averages over rows).

  Args:
    batch: TokenBatch; `advantages` per sequence [B]. num_sequences: step-level sequence count.
  Returns:
    (loss [], metrics as gspo_loss).
  """
  per_seq, n, adv, metrics = _gspo_terms(batch, eps_low=eps_low, eps_high=eps_high, beta=beta,
                                         top_entropy_quantile=top_entropy_quantile,
                                         off_policy_mask_threshold=off_policy_mask_threshold, loss="luspo")
  num = jnp.sum(per_seq * n)
  den = as_float(adv.shape[0] if num_sequences is None else num_sequences)
  return finish(divide(num, den), {**metrics, "numerator": num, "denominator": den})


def gspo_token_loss(batch: TokenBatch, *, eps_low: float = 3e-4, eps_high: float = 4e-4,
                    beta: float = 0.0, top_entropy_quantile: float = 1.0,
                    off_policy_mask_threshold: Optional[float] = None,
                    num_sequences: Optional[Array] = None) -> tuple[Array, dict]:
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
  keep, filter_metrics = policy_token_filter(batch, adv, mask, top_entropy_quantile=top_entropy_quantile,
                                             off_policy_mask_threshold=off_policy_mask_threshold,
                                             loss="gspo_token")
  per_token = _filtered(per_token, keep)
  if not _is_zero(beta):
    per_token = per_token + beta * k3(lp, require(batch.ref_logps, "ref_logps", "gspo_token"))
  num, den = aggregate(per_token, mask, "seq_mean_token_mean", num_sequences=num_sequences)
  metrics = {**_kl_metrics(batch, mask), **_clip_metrics(s_tok, adv, mask, eps_low, eps_high),
             **filter_metrics, "numerator": num, "denominator": den}
  return finish(divide(num, den), metrics)


def cispo_loss(batch: TokenBatch, *, eps_max: float = 5.0, eps_min: Optional[float] = None,
               beta: float = 0.0, aggregation: str = "token_mean", top_entropy_quantile: float = 1.0,
               off_policy_mask_threshold: Optional[float] = None,
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
  keep, filter_metrics = policy_token_filter(batch, adv, mask, top_entropy_quantile=top_entropy_quantile,
                                             off_policy_mask_threshold=off_policy_mask_threshold, loss="cispo")
  per_token = _filtered(per_token, keep)
  if not _is_zero(beta):
    per_token = per_token + beta * k3(lp, require(batch.ref_logps, "ref_logps", "cispo"))
  num, den = aggregate(per_token, mask, aggregation, num_tokens=num_tokens,
                       num_sequences=num_sequences)
  clipped = ((ratio > eps_max) & (adv > 0)).astype(mask.dtype)
  metrics = {**_kl_metrics(batch, mask), "cispo_clip_ratio": masked_mean(clipped, mask),
             **filter_metrics, "numerator": num, "denominator": den}
  return finish(divide(num, den), metrics)
