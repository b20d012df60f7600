"""Masked reductions, loss aggregation modes and packing helpers (OBJECTIVES.md §0, §1.1, §1.3).

Token-normalised losses are built as `numerator / denominator`. `aggregate` returns the pair, and
every such loss takes the step-level count (`num_tokens` or `num_sequences`) as an optional keyword:
with it, each micro-batch loss is its exact share of the full-batch loss, so summing micro-batch
losses (and gradients) over a gradient-accumulation step equals one large batch. The same
numerator and denominator are also reported in the metrics, for logging.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from jaxalign.losses.stats import Array, as_float, check, safe_div

# Loss aggregation modes over a [B, T] array of per-token losses (OBJECTIVES.md §0):
#   token_mean           sum_{b,t} m*l / sum_{b,t} m                 (SFT, DAPO/BNPO, PPO)
#   seq_mean_token_mean  (1/B) sum_b sum_t m*l / n_b                 (original GRPO)
#   seq_mean_token_sum   (1/B) sum_b sum_t m*l                       (summed sequence losses)
#   constant             sum_{b,t} m*l / (B * max_len)               (Dr. GRPO)
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant")


def masked_sum(x: Array, mask: Array, axis=None) -> Array:
  """sum(x * mask) over `axis`; masked entries never contribute, whatever their value."""
  x, mask = as_float(x), jnp.asarray(mask)
  return jnp.sum(jnp.where(mask > 0, x * mask.astype(x.dtype), 0.0), axis=axis)


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
  """Masked mean; 0 (not NaN) when the mask is empty."""
  return safe_div(masked_sum(x, mask, axis), jnp.sum(as_float(mask), axis=axis))


def masked_var(x: Array, mask: Array, *, ddof: int = 1) -> Array:
  """Masked variance over all entries, with `ddof` (TRL's masked_var uses Bessel, ddof=1)."""
  mean = masked_mean(x, mask)
  count = jnp.sum(as_float(mask))
  return safe_div(masked_sum((as_float(x) - mean) ** 2, mask), jnp.maximum(count - ddof, 0.0))


def aggregate(values: Array, mask: Array, mode: str = "token_mean", *,
              max_len: Optional[int] = None, num_tokens: Optional[Array] = None,
              num_sequences: Optional[Array] = None) -> tuple[Array, Array]:
  """Reduces per-token losses to (numerator, denominator) under one of `AGGREGATIONS`.

  Args:
    values: [B, T] per-token losses. mask: [B, T] loss-token mask.
    mode: one of AGGREGATIONS.
    max_len: the configured maximum completion length (mode "constant" only; a constant, not the
      batch's longest completion - OBJECTIVES.md §6.2).
    num_tokens: step-level token count (all micro-batches, all devices); default: this batch's.
    num_sequences: step-level sequence count; default: this batch's B.
  Returns:
    (numerator [], denominator []); the loss is `divide(numerator, denominator)`.
  """
  check(mode in AGGREGATIONS, f"unknown aggregation '{mode}'; choose one of {AGGREGATIONS}")
  mask = as_float(mask)
  per_seq = masked_sum(values, mask, axis=-1)  # [B]
  n_seq = values.shape[0] if num_sequences is None else num_sequences
  if mode == "token_mean":
    den = jnp.sum(mask) if num_tokens is None else num_tokens
    return jnp.sum(per_seq), as_float(den)
  if mode == "seq_mean_token_mean":
    return jnp.sum(safe_div(per_seq, jnp.sum(mask, axis=-1))), as_float(n_seq)
  if mode == "seq_mean_token_sum":
    return jnp.sum(per_seq), as_float(n_seq)
  check(max_len is not None, "aggregation 'constant' needs max_len (the configured maximum length)")
  return jnp.sum(per_seq), as_float(n_seq) * max_len


def divide(numerator: Array, denominator: Array) -> Array:
  """numerator / denominator, 0 for an empty denominator."""
  return safe_div(numerator, denominator)


def packed_loss_mask(loss_mask: Array, segment_ids: Array) -> Array:
  """Loss mask of the shifted targets for packed rows (OBJECTIVES.md §1.3).

  m[t] = loss_mask[t+1] * (seg[t+1] == seg[t]) * (seg[t+1] != 0): drops the target that would
  predict the first token of document k+1 from the last token of document k, and padding.

  Args:
    loss_mask: [B, T] 1 on loss tokens (inputs, before the shift). segment_ids: [B, T], 0 = pad.
  Returns:
    [B, T-1] float mask aligned with lp[:, t] = log p(ids[t+1] | ids[<=t]).
  """
  seg_in, seg_tgt = segment_ids[:, :-1], segment_ids[:, 1:]  # [B, T-1]
  same = (seg_tgt == seg_in) & (seg_tgt != 0)
  return as_float(loss_mask[:, 1:]) * same.astype(jnp.float32)


def segment_sums(x: Array, mask: Array, segment_ids: Array, num_segments: int) -> Array:
  """Per-segment masked sums in packed rows: S_k = sum_t [seg[t] == k] * m[t] * x[t] (the one home of
  per-sequence sums: `algorithms.forward.sequence_sums` reads padded and packed batches through it).

  Args:
    x: [B, T] values (e.g. shifted token log-probs). mask: [B, T]. segment_ids: [B, T] segment of
      each *target* (use `segment_ids[:, 1:]` with shifted log-probs); ids 1..num_segments, 0 = pad.
    num_segments: static maximum number of segments per row.
  Returns:
    [B, num_segments]; column k-1 holds segment k (sums over n use x = 1).
  """
  x, mask = as_float(x), jnp.asarray(mask)
  values = jnp.where(mask > 0, x * mask.astype(x.dtype), 0.0)
  per_row = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=num_segments + 1))
  return per_row(values, segment_ids)[:, 1:]


def last_token_onehot(mask: Array) -> Array:
  """One-hot [B, T] of the last valid position of each row (left or right padding); all zeros for an empty row."""
  mask = jnp.asarray(mask) > 0
  t = mask.shape[-1]
  last = t - 1 - jnp.argmax(mask[:, ::-1], axis=-1)  # [B]
  onehot = jax.nn.one_hot(last, t, dtype=jnp.float32)  # [B, T]
  return onehot * jnp.any(mask, axis=-1, keepdims=True)


def segment_ends(segment_ids: Array) -> Array:
  """Bool [B, T]: the last token of each segment of packed rows (ids 1, 2, ...; 0 = padding). With one segment
  per row it is `last_token_onehot` of the row's tokens."""
  seg = jnp.asarray(segment_ids)
  following = jnp.pad(seg[:, 1:], ((0, 0), (0, 1)))
  return (seg != 0) & (seg != following)
