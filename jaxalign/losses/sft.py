"""SFT negative log-likelihood on completion tokens (OBJECTIVES.md §2).

Standard MLE as used in the RLHF pipeline (InstructGPT, arXiv:2203.02155, §3.5); DeepSeekMath
(arXiv:2402.03300) App. A.1.1 writes it with a per-sequence 1/|o|. Packed rows: build the mask with
`reductions.packed_loss_mask` so that no target crosses a document boundary (§1.3).
"""

from typing import Optional

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
  check(reduction in SFT_REDUCTIONS,
        f"unknown SFT reduction '{reduction}'; choose one of {list(SFT_REDUCTIONS)}")
  batch = zero_masked(batch)
  mask = as_float(batch.mask)
  num, den = aggregate(-as_float(batch.logps), mask, SFT_REDUCTIONS[reduction],
                       num_tokens=num_tokens, num_sequences=num_sequences)
  loss = divide(num, den)
  metrics = {"num_tokens": jnp.sum(mask), "numerator": num, "denominator": den}
  if batch.correct is not None:
    metrics["mean_token_accuracy"] = masked_mean(as_float(batch.correct), mask)
  if batch.entropy is not None:
    metrics["entropy"] = masked_mean(batch.entropy, mask)
  return finish(loss, metrics)
