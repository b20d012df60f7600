"""Model forward passes that training needs: token log-probs and sequence statistics.

Log-probs always come from final hidden states and the LM head through `ops.token_logprobs`, so no
training path materialises [tokens, vocab] logits (DESIGN.md principle 3). Shape letters: R rows
(batch x responses), T positions, D width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign import ops


def loss_targets(batch: dict) -> tuple[jax.Array, jax.Array]:
  """Next-token targets [R, T-1] (-1 where ignored) and the loss mask [R, T-1] (OBJECTIVES.md §1.3).

  Position t predicts token t+1; it counts when token t+1 is a response token of the same segment.
  """
  ids, seg = batch["input_ids"], batch["segment_ids"]
  mask = (batch["loss_mask"][:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
  return jnp.where(mask, ids[:, 1:], -1), mask.astype(jnp.float32)


def token_logps(model, batch: dict, *, temperature: float = 1.0, impl: str = "auto",
                return_entropy: bool = False):
  """Per-token log-probs [R, T-1] of the batch's responses (0 off the mask), and the mask [R, T-1].

  With return_entropy, also the predictive entropy [R, T-1] at every position.
  """
  targets, mask = loss_targets(batch)
  hidden = model.hidden_states(batch["input_ids"], segment_ids=batch["segment_ids"])[:, :-1]  # [R, T-1, D]
  r, t, d = hidden.shape
  # The head in the compute dtype, like every other weight: a float32-master policy and its compute-dtype
  # frozen reference then give identical log-probs at identical weights.
  weight = model.head_weight().astype(hidden.dtype)
  out = ops.token_logprobs(hidden.reshape(r * t, d), weight, targets.reshape(-1),
                           temperature=temperature, return_entropy=return_entropy, impl=impl)
  if return_entropy:
    logps, entropy = out
    return logps.reshape(r, t), mask, entropy.reshape(r, t)
  return out.reshape(r, t), mask


def sequence_logps(model, batch: dict, **kwargs) -> tuple[jax.Array, jax.Array]:
  """Summed response log-probs S [R] and response token counts n [R] (>= 1)."""
  logps, mask = token_logps(model, batch, **kwargs)
  return jnp.sum(logps * mask, axis=-1), jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def rows(batch: dict, prefix: str = "") -> dict:
  """The [R, T] row view of a batch whose arrays may carry a response axis ([B, C, T] -> [B*C, T])."""
  keys = ("input_ids", "loss_mask", "segment_ids")
  return {k: batch[prefix + k].reshape(-1, batch[prefix + k].shape[-1]) for k in keys}


def frozen(fn, *args, **kwargs):
  """Call fn on a frozen model (reference / old policy): same numerics, no gradient."""
  return jax.tree.map(jax.lax.stop_gradient, fn(*args, **kwargs))
