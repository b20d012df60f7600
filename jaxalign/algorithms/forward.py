"""Model forward passes that training needs: token log-probs and sequence statistics.

Log-probs always come from final hidden states and the LM head through `ops.token_logprobs`, so no
training path materialises [tokens, vocab] logits (DESIGN.md principle 3). Shape letters: R rows
(batch x responses, or packed rows), T positions, D width, E... a batch's examples ([B, C] or [B]).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxalign import losses, ops, sharding
from jaxalign.models.routing import collecting


def loss_targets(batch: dict) -> tuple[jax.Array, jax.Array]:
  """Next-token targets [R, T-1] (-1 where ignored) and the loss mask [R, T-1] (OBJECTIVES.md §1.3).

  Position t predicts token t+1; it counts when token t+1 is a response token of the same segment.
  """
  mask = losses.packed_loss_mask(batch["loss_mask"], batch["segment_ids"])
  return jnp.where(mask > 0, batch["input_ids"][:, 1:], -1), mask


def token_logps(model, batch: dict, *, temperature: float = 1.0, impl: str = "auto",
                return_entropy: bool = False, return_log_sum_sq: bool = False,
                logit_floor: jax.Array | None = None):
  """Per-token log-probs [R, T-1] of the batch's responses (0 off the mask), and the mask [R, T-1]. A batch's
  "routed_experts" [R, T, L, k] (a mixture-of-experts rollout's record) are replayed (`Decoder.__call__`).

  With return_entropy, also the predictive entropy [R, T-1] at every position; with return_log_sum_sq, then
  log sum_v p_v^2 [R, T-1] (no gradient). `logit_floor` [R, T-1] renormalises each position over the tokens
  whose tempered logit reaches it (what a top-k / top-p sampler drew from; -inf: the full distribution), see
  `ops.token_logprobs`.
  """
  targets, mask = loss_targets(batch)
  hidden = model.hidden_states(batch["input_ids"], segment_ids=batch["segment_ids"],
                               routing=batch.get("routed_experts"))[:, :-1]  # [R, T-1, D]
  out = _head_logps(model, hidden, targets, temperature, impl, logit_floor, return_entropy=return_entropy,
                    return_log_sum_sq=return_log_sum_sq)
  return _with_mask(out, mask)


def shared_prompt_token_logps(model, batch: dict, prompt_length: int, group: int, *, temperature: float = 1.0,
                              impl: str = "auto", return_entropy: bool = False, return_log_sum_sq: bool = False,
                              logit_floor: jax.Array | None = None):
  """`token_logps` at the completion targets of rows [R, T] whose first `prompt_length` (P) tokens are a
  left-padded prompt shared by `group` consecutive rows (a GRPO group): each prompt runs through the model
  once (`CausalLM.shared_prefix_hidden_states`), not `group` times. Equal to `token_logps(...)[..., P-1:]`:
  log-probs [R, T-P] of tokens P .. T-1, their mask (, entropies, log sum p^2); logit_floor [R, T-P].
  """
  targets, mask = (x[:, prompt_length - 1:] for x in loss_targets(batch))
  ids, seg, routing = batch["input_ids"], batch["segment_ids"], batch.get("routed_experts")
  prompt, prompt_seg = ids[::group, :prompt_length], seg[::group, :prompt_length]
  replay = () if routing is None else (routing[::group, :prompt_length], routing[:, prompt_length:])
  hidden_p, hidden_s = model.shared_prefix_hidden_states(prompt, prompt_seg, ids[:, prompt_length:],
                                                         seg[:, prompt_length:], *replay)
  # Token P is predicted from the prompt's last position, token P + j from the completion's position j - 1.
  hidden = jnp.concatenate([jnp.repeat(hidden_p[:, -1:], group, axis=0), hidden_s[:, :-1]], axis=1)
  out = _head_logps(model, hidden, targets, temperature, impl, logit_floor, return_entropy=return_entropy,
                    return_log_sum_sq=return_log_sum_sq)
  return _with_mask(out, mask)


def _with_mask(out, mask):
  """(logps, mask, *extras) from the head's (logps, *extras)."""
  return (out[0], mask, *out[1:])


def _head_logps(model, hidden, targets, temperature, impl, logit_floor, **extras):
  """The LM head's log-probs of targets [R, W] at hidden states [R, W, D], then the extras asked for (entropies,
  log sum p^2 [R, W]; `ops.token_logprobs`), as a tuple."""
  r, t, d = hidden.shape
  # The head in the compute dtype, like every other weight: a float32-master policy and its compute-dtype
  # frozen reference then give identical log-probs at identical weights.
  weight = model.head_weight().astype(hidden.dtype)
  floor = None if logit_floor is None else logit_floor.reshape(-1)
  out = ops.token_logprobs(hidden.reshape(r * t, d), weight, targets.reshape(-1), temperature=temperature,
                           logit_floor=floor, logit_softcap=model.config.final_logit_softcap, impl=impl, **extras)
  return tuple(x.reshape(r, t) for x in (out if isinstance(out, tuple) else (out,)))


def packing_index(batch: dict, prefix: str = "") -> tuple[jax.Array, jax.Array, jax.Array]:
  """Where each sequence of a batch lies: its row [E...] and segment [E...] (E... the batch's examples, [B, C]
  or [B]) and the segment ids [R, T] they refer to.

  A packed batch carries them (`pack_row`, `pack_segment`: several sequences per row). A padded batch is the
  case of one sequence per row: row r of the [R, T] view, all of its tokens in segment 1.
  """
  seg = batch[prefix + "segment_ids"]
  if prefix + "pack_row" in batch:
    return batch[prefix + "pack_row"], batch[prefix + "pack_segment"], seg
  shape = seg.shape[:-1]
  row = jnp.arange(math.prod(shape), dtype=jnp.int32).reshape(shape)
  return row, jnp.ones(shape, jnp.int32), (seg.reshape(-1, seg.shape[-1]) != 0).astype(jnp.int32)


def sequence_sums(values: jax.Array, mask: jax.Array, batch: dict, prefix: str = "") -> tuple[jax.Array, jax.Array]:
  """Per-sequence sums of values * mask and of mask [E...], from padded or packed rows alike.

  values, mask [R, W] over the batch's [R, T] row view: tokens (W = T) or next-token targets (W = T - 1,
  aligned with tokens 1..T-1); each counts toward the segment of the token it is aligned with. A segment sum
  per (row, segment) [R, T + 1], read at each sequence's (row, segment) (`packing_index`).
  """
  row, segment, seg = packing_index(batch, prefix)
  seg = seg[:, seg.shape[1] - values.shape[1]:]  # the segment of the token each value is aligned with
  sums = losses.segment_sums(values, mask, seg, seg.shape[1])  # [R, W]: ids 1 .. at most W
  counts = losses.segment_sums(jnp.ones_like(mask, jnp.float32), mask, seg, seg.shape[1])
  return sums[row, segment - 1], counts[row, segment - 1]


def prompt_sharing(num_rows: int, group: int) -> int:
  """How many consecutive rows of [num_rows, ...], in groups of `group` with one prompt, run one computation of
  it: the largest divisor of `group` whose prompts split over the batch shards as the rows do (each shard then
  holds its rows' prompts). A group split over two shards computes its prompt once on each; 1: none shared."""
  for size in range(group, 1, -1):
    if group % size == 0 and num_rows % size == 0 and (
        sharding.shards("batch", num_rows // size) == sharding.shards("batch", num_rows)):
      return size
  return 1


def example_logps(model, batch: dict, prefix: str = "", *, ld_alpha: float | None = None,
                  wpo: bool = False, **kwargs) -> tuple[jax.Array, ...]:
  """Summed response log-probs S [E...] and response token counts n [E...] (>= 1) of every sequence of a
  padded or packed batch (E... its examples: [B, C] for pairs and lists, [B] for single responses).
  A shared-prompt batch (`prompt_mask` [B, P]: rows of the prompt left-padded to P, then a response) runs
  each prompt once. ld_alpha (pairs [B, 2]): LD-DPO's sums, the tokens past the shorter response's length
  weighted by ld_alpha (`ld_weights`). wpo: also WPO's log-weight of each sequence [E...] (`wpo_log_weights`),
  from the same pass."""
  view, prompt = rows(batch, prefix), batch.get(prefix + "prompt_mask")
  sharing = 1 if prompt is None else prompt_sharing(view["input_ids"].shape[0], batch[prefix + "input_ids"].shape[-2])
  if sharing > 1:
    logps, mask, *extra = shared_prompt_token_logps(model, view, prompt.shape[-1], sharing,
                                                    return_log_sum_sq=wpo, **kwargs)
  else:
    logps, mask, *extra = token_logps(model, view, return_log_sum_sq=wpo, **kwargs)
  log_w = [wpo_log_weights(logps, extra[0], mask, batch, prefix)] if wpo else []
  if ld_alpha is not None:
    logps = logps * ld_weights(mask, batch, ld_alpha, prefix)
  s, n = sequence_sums(logps, mask, batch, prefix)
  return s, jnp.maximum(n, 1.0), *log_w


def wpo_log_weights(logps: jax.Array, log_sum_sq: jax.Array, mask: jax.Array, batch: dict,
                    prefix: str = "") -> jax.Array:
  """WPO's log-weight of each sequence [E...] (Zhou et al. 2024, arXiv:2406.11827, Eq. 2, in TRL's
  `use_weighting` form): the mean over its response tokens of log p(y_t) - log sum_v p_v^2, the token's
  probability relative to the distribution's own collision probability. No gradient. logps, log_sum_sq, mask
  [R, W] as `token_logps` returns them."""
  s, n = sequence_sums(jax.lax.stop_gradient(logps - log_sum_sq), mask, batch, prefix)
  return s / jnp.maximum(n, 1.0)


def ld_weights(mask: jax.Array, batch: dict, ld_alpha: float, prefix: str = "") -> jax.Array:
  """LD-DPO's token weights [R, W] for pairs (Liu et al. 2024, arXiv:2409.06411; TRL's ld_alpha): 1 on each
  response's first l_p tokens, l_p = min(n(y_w), n(y_l)) of its pair, ld_alpha after them. mask [R, W] (the
  loss tokens, aligned with the last W tokens of the batch's rows), padded or packed alike."""
  row, segment, seg = packing_index(batch, prefix)
  seg = seg[:, seg.shape[1] - mask.shape[1]:]
  mask = mask.astype(jnp.float32)
  totals = losses.segment_sums(mask, mask, seg, seg.shape[1])  # [R, W] tokens of segment k at column k - 1
  before = jnp.cumsum(totals, axis=1) - totals  # tokens of the row's earlier segments
  rank = jnp.cumsum(mask, axis=1) - jnp.take_along_axis(jnp.pad(before, ((0, 0), (1, 0))), seg, axis=1)
  lengths = totals[row, segment - 1]  # [B, 2] each response's length
  shared = jnp.broadcast_to(jnp.min(lengths, axis=-1, keepdims=True), lengths.shape)
  table = jnp.zeros((seg.shape[0], seg.shape[1] + 1)).at[row, segment].set(shared)  # (row, segment) -> l_p
  limit = jnp.take_along_axis(table, seg, axis=1)
  return jnp.where(rank <= limit, 1.0, ld_alpha)


def example_and_prompt_logps(model, batch: dict, **kwargs) -> tuple[jax.Array, ...]:
  """`example_logps` (S, n [E...]) and the summed log-probs and counts of each sequence's prompt tokens (all but
  its first: S_prompt, n_prompt [E...]), from one pass over whole rows (no shared prompts)."""
  view = rows(batch)
  every_target = {**view, "loss_mask": (view["segment_ids"] != 0).astype(view["loss_mask"].dtype)}
  logps, every = token_logps(model, every_target, **kwargs)
  response = loss_targets(view)[1]
  s, n = sequence_sums(logps, response, batch)
  s_prompt, n_prompt = sequence_sums(logps, every - response, batch)
  return s, jnp.maximum(n, 1.0), s_prompt, n_prompt


def rows(batch: dict, prefix: str = "") -> dict:
  """The [R, T] row view of a batch whose arrays may carry a response axis ([B, C, T] -> [B*C, T])."""
  keys = ("input_ids", "loss_mask", "segment_ids")
  return {k: batch[prefix + k].reshape(-1, batch[prefix + k].shape[-1]) for k in keys}


def frozen(fn, *args, **kwargs):
  """Call fn on a frozen model (reference / old policy): same numerics, no gradient, and its router statistics
  left out of the trained model's (`routing.collecting`)."""
  with collecting():
    return jax.tree.map(jax.lax.stop_gradient, fn(*args, **kwargs))
