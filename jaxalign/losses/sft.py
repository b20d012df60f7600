"""SFT negative log-likelihood on completion tokens (OBJECTIVES.md §2), and its DFT reweighting.

Standard MLE as used in the RLHF pipeline (InstructGPT, arXiv:2203.02155, §3.5); DeepSeekMath
(arXiv:2402.03300) App. A.1.1 writes it with a per-sequence 1/|o|. Packed rows: build the mask with
`reductions.packed_loss_mask` so that no target crosses a document boundary (§1.3).
DFT (Wu et al. 2025, arXiv:2508.05629) weights each token's NLL by its detached probability.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from jaxalign.losses.reductions import aggregate, divide, masked_mean
from jaxalign.losses.stats import Array, TokenBatch, as_float, check, finish, zero_masked

# reduction name -> aggregation mode (reductions.AGGREGATIONS)
SFT_REDUCTIONS = {
    "token_mean": "token_mean",              # HF/TRL default: global token mean
    "sequence_mean": "seq_mean_token_mean",  # DeepSeekMath: -(1/B) sum_b S_b / n_b
    "sequence_sum": "seq_mean_token_sum",    # original DPO code's "SFT": -(1/B) sum_b S_b
}


def sft_loss(batch: TokenBatch, *, reduction: str = "token_mean",
             num_tokens: Optional[Array] = None,
             num_sequences: Optional[Array] = None) -> tuple[Array, dict]:
  """L_SFT = -sum_{b,t} m lp / sum_{b,t} m (default), or a per-sequence variant.

  Args:
    batch: TokenBatch with `logps` [B, T] and `mask` [B, T] (prompt, padding and packing boundaries
      masked); optional `correct` [B, T] (argmax == target) and `entropy` [B, T] for metrics.
    reduction: "token_mean" | "sequence_mean" | "sequence_sum".
    num_tokens / num_sequences: step-level counts for exact gradient accumulation (reductions.py).
  Returns:
    (loss [], metrics: loss, num_tokens, numerator, denominator, mean_token_accuracy, entropy).
  """
  return _weighted_nll(batch, "sft", dft=False, reduction=reduction, num_tokens=num_tokens,
                       num_sequences=num_sequences)


def dft_loss(batch: TokenBatch, *, reduction: str = "token_mean",
             num_tokens: Optional[Array] = None,
             num_sequences: Optional[Array] = None) -> tuple[Array, dict]:
  """DFT, Dynamic Fine-Tuning (Wu et al. 2025, arXiv:2508.05629; TRL SFTConfig loss_type="dft").

  The paper's L_DFT = E[-sum_t sg(pi(y_t | y_<t, x)) log pi(y_t | y_<t, x)] (as in TRL's paper index);
  here L = -sum_{b,t} m sg(exp(lp)) lp / sum_{b,t} m: each token's NLL weighted by its detached
  probability ("reward rectification" of the SFT gradient, which the paper shows is a policy gradient
  with an implicit reward 1/pi). The paper writes a per-sequence sum; TRL (and the default here)
  divides by the token count (`num_items_in_batch`), exact over micro-batches with `num_tokens`.
  The gradient is -sum m exp(lp) d lp / N_tok.

  Args / Returns: as `sft_loss`, plus the metric nll = the plain SFT token-mean NLL (not accumulated).
  """
  return _weighted_nll(batch, "dft", dft=True, reduction=reduction, num_tokens=num_tokens,
                       num_sequences=num_sequences)


def _weighted_nll(batch: TokenBatch, name: str, *, dft: bool, reduction: str,
                  num_tokens: Optional[Array], num_sequences: Optional[Array]) -> tuple[Array, dict]:
  """-w lp aggregated by `reduction`, with w = 1 (SFT) or w = sg(exp(lp)) (DFT)."""
  check(reduction in SFT_REDUCTIONS,
        f"unknown {name.upper()} reduction '{reduction}'; choose one of {list(SFT_REDUCTIONS)}")
  batch = zero_masked(batch)
  mask = as_float(batch.mask)
  lp = as_float(batch.logps)
  per_token = -jax.lax.stop_gradient(jnp.exp(lp)) * lp if dft else -lp
  num, den = aggregate(per_token, mask, SFT_REDUCTIONS[reduction],
                       num_tokens=num_tokens, num_sequences=num_sequences)
  loss = divide(num, den)
  metrics = {"num_tokens": jnp.sum(mask), "numerator": num, "denominator": den}
  if dft:
    metrics["nll"] = masked_mean(-lp, mask)
  if batch.correct is not None:
    metrics["mean_token_accuracy"] = masked_mean(as_float(batch.correct), mask)
  if batch.entropy is not None:
    metrics["entropy"] = masked_mean(batch.entropy, mask)
  return finish(loss, metrics)
