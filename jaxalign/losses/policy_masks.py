"""Token filters shared by every GRPO-family loss: top-entropy tokens and off-policy sequence masking.

Both are options of all GRPO-family losses (grpo, dr_grpo, dapo, gspo, gspo_token, luspo, cispo, sapo,
vespo), as in TRL's GRPOTrainer, where they apply to every `loss_type`. Each gives a detached 0/1 filter
f_{i,t} that multiplies the per-token *policy* term l^pg_{i,t} only; the beta * KL term and every
denominator (token / sequence counts) are left unchanged:

  l_{i,t} = f_{i,t} * l^pg_{i,t} + beta * kl_{i,t}.

* `top_entropy_quantile = rho` - Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens
  Drive Effective Reinforcement Learning for LLM Reasoning" (arXiv:2506.01939; its RLVR objective keeps
  the policy-gradient term only on the top-rho fraction of tokens by entropy, rho = 0.2 recommended;
  TRL `top_entropy_quantile`):
    f_{i,t} = 1[H_{i,t} >= Q_{1-rho}(H)],
  where Q_q is the q-quantile (linear interpolation between order statistics, as `torch.quantile` and
  `np.quantile`) of the entropies of all loss tokens of the batch passed in. rho = 1 keeps every token
  (the default: the entropy is then not read); rho = 0 keeps only the highest-entropy token(s). The
  entropy is detached (it only selects tokens).
  NOT exact under micro-batch accumulation: the quantile is a batch-level statistic, so micro-batches
  select tokens by their own thresholds and the summed micro-batch losses differ from the full-batch
  loss. TRL has the same property (it gathers the entropies across processes, but per micro-batch). Pass
  the whole optimiser batch in one call (or precompute the mask) where exactness matters.
* `off_policy_mask_threshold = delta` - DeepSeek-V3.2 (arXiv:2512.02556) Eq. (9), off-policy sequence
  masking (TRL `off_policy_mask_threshold`; TRL suggests delta = 0.5):
    f_{i,t} = 0  if A_{i,t} < 0 and (1/|o_i|) sum_t m log(pi_old / pi_theta) > delta,  else 1,
  i.e. sequences with a negative advantage whose mean log-ratio (a sampled KL(pi_old || pi_theta)
  estimate) exceeds delta are dropped. pi_theta is detached here; pi_old is `old_logps` (TRL prefers
  the sampler's log-probs when they differ: pass those as `old_logps` to get that behaviour). With
  `old_logps = None` (one update per rollout) the drift is 0 and nothing is masked, as in TRL. Per
  sequence, so exact under micro-batch accumulation (sequences are never split across micro-batches).
"""

from typing import Optional

import jax
import jax.numpy as jnp

from jaxalign.losses.reductions import masked_mean, masked_sum
from jaxalign.losses.stats import Array, TokenBatch, as_float, check, require

sg = jax.lax.stop_gradient


def masked_quantile(x: Array, mask: Array, q: float) -> Array:
  """q-quantile of the entries of `x` where mask > 0, linear interpolation (torch.quantile's default).

  Q = v_(lo) + (h - lo) (v_(hi) - v_(lo)) with v sorted ascending, h = q (n - 1), lo = floor(h),
  hi = ceil(h). Returns +inf when no entry is valid. Jittable (n is traced); detached.
  """
  x = sg(as_float(x))
  valid = jnp.asarray(mask) > 0
  n = jnp.sum(valid)
  ordered = jnp.sort(jnp.where(valid, x, jnp.inf).reshape(-1))
  h = q * jnp.maximum(n - 1, 0).astype(x.dtype)
  lo, hi = jnp.floor(h), jnp.ceil(h)
  v_lo, v_hi = ordered[lo.astype(jnp.int32)], ordered[hi.astype(jnp.int32)]
  value = v_lo + (h - lo) * jnp.where(hi > lo, v_hi - v_lo, 0.0)
  return jnp.where(n > 0, value, jnp.inf)


def high_entropy_mask(entropy: Array, mask: Array, top_quantile: float) -> tuple[Array, Array]:
  """Top-rho entropy filter of arXiv:2506.01939: 1 on loss tokens with H >= Q_{1-rho}(H), else 0.

  Args:
    entropy: [B, T] per-token entropy (detached here). mask: [B, T] loss-token mask.
    top_quantile: rho in [0, 1], the fraction of (highest-entropy) tokens to keep.
  Returns:
    (filter [B, T] float, threshold []).
  """
  threshold = masked_quantile(entropy, mask, 1.0 - top_quantile)
  keep = (sg(as_float(entropy)) >= threshold) & (jnp.asarray(mask) > 0)
  return keep.astype(as_float(mask).dtype), threshold


def off_policy_mask(logps: Array, old_logps: Array, advantages: Array, mask: Array,
                    threshold: float) -> tuple[Array, Array]:
  """Off-policy sequence mask of DeepSeek-V3.2 (arXiv:2512.02556) Eq. (9).

  Args:
    logps: [B, T] lp_new (detached here). old_logps: [B, T] lp_old. advantages: [B, T] (per-sequence
      advantages broadcast). mask: [B, T]. threshold: delta.
  Returns:
    (filter [B, T] float: 0 where A < 0 and the row's mean log(pi_old / pi_theta) > delta,
     drift [B]: that row mean, over max(|o_i|, 1) tokens).
  """
  mask = as_float(mask)
  log_ratio = sg(as_float(old_logps)) - sg(as_float(logps))
  drift = masked_sum(log_ratio, mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)  # [B]
  keep = (sg(as_float(advantages)) >= 0) | (drift[:, None] <= threshold)
  return keep.astype(mask.dtype), drift


def policy_token_filter(batch: TokenBatch, advantages: Array, mask: Array, *, top_entropy_quantile: float,
                        off_policy_mask_threshold: Optional[float],
                        loss: str) -> tuple[Optional[Array], dict[str, Array]]:
  """The combined filter f = f_entropy * f_off_policy of a GRPO-family loss (module docstring).

  Args:
    batch: the (zero-masked) TokenBatch; reads `entropy` when top_entropy_quantile < 1 and `old_logps`
      (None = on-policy) when off_policy_mask_threshold is set.
    advantages: [B, T] token advantages (per-sequence ones broadcast). mask: [B, T].
  Returns:
    (filter [B, T] or None when both options are off, metrics: entropy_mask/threshold,
    entropy_mask/kept_fraction, off_policy_mask/dropped_fraction - token fractions of loss tokens).
  """
  check(lambda: 0.0 <= top_entropy_quantile <= 1.0,
        f"{loss}: top_entropy_quantile must be in [0, 1], got {top_entropy_quantile}")
  keep, metrics = None, {}
  if not (isinstance(top_entropy_quantile, (int, float)) and top_entropy_quantile == 1):
    entropy = require(batch.entropy, "entropy", f"{loss} (top_entropy_quantile < 1)")
    keep, threshold = high_entropy_mask(entropy, mask, top_entropy_quantile)
    metrics["entropy_mask/threshold"] = jnp.where(jnp.isfinite(threshold), threshold, 0.0)
    metrics["entropy_mask/kept_fraction"] = masked_mean(keep, mask)
  if off_policy_mask_threshold is not None:
    old = sg(as_float(batch.logps)) if batch.old_logps is None else batch.old_logps
    opm, _ = off_policy_mask(batch.logps, old, advantages, mask, off_policy_mask_threshold)
    metrics["off_policy_mask/dropped_fraction"] = masked_mean(1.0 - opm, mask)
    keep = opm if keep is None else keep * opm
  return keep, metrics
