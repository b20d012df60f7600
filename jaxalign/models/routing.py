"""Mixture-of-experts routing: top-k choice (or replay of a recorded choice), the router statistics a forward
pass reports, and the auxiliary losses made of them.

Shape letters: N tokens, E experts, k experts per token, L layers.

Routing replay (`route(..., replay=)`): an RL sampler records which experts each token went to
(`Decoder.decode` keeps them in its cache), and the training passes route the same tokens to the same experts,
with weights from their own router. Near-tied router scores otherwise flip between the cached sampler and the
full training forward, so the "old policy" of the importance ratio is not the policy that sampled (Megatron-LM
issue 4168; Ma et al. 2025, "Rollout Routing Replay", arXiv:2510.11370).

Router statistics (`RouterStats`) are sums over a forward pass's real tokens, one per layer; the training step
collects every policy forward's (`collecting`) and adds the auxiliary losses (`aux_losses`):
  load balancing (Switch Transformer; transformers' `load_balancing_loss_func`, pooled over layers and tokens as
    there): E * sum_e f_e P_e, f_e = (assignments to e) / N over the k slots together, P_e the mean router
    probability of e; k when perfectly balanced, no gradient through f;
  router z-loss (ST-MoE, Zoph et al. 2022): the mean over layers and tokens of logsumexp(router logits)^2.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple

import jax
import jax.numpy as jnp

# A recorded expert index where no record exists (a token the sampler never ran, e.g. a row's last): the
# token routes itself.
NOT_RECORDED = -1


class Routing(NamedTuple):
  """One layer's routing of N tokens: chosen experts [N, k] and their weights [N, k] (float32)."""

  experts: jax.Array
  weights: jax.Array


class RouterStats(NamedTuple):
  """Sums over one layer's real tokens (stacked [L, ...] for a model): how many tokens, the assignments each
  expert received [E], its router probabilities [E], and logsumexp(router logits)^2."""

  tokens: jax.Array
  load: jax.Array
  probs: jax.Array
  z: jax.Array


def route(logits: jax.Array, k: int, normalize: bool, replay: jax.Array | None = None) -> Routing:
  """Softmax-then-top-k routing of router logits [N, E]: the k most probable experts of each token and their
  probabilities (renormalised over the k when `normalize`). replay [N, k]: those experts instead, weighted by
  their probabilities under these logits, for the tokens that have a record (`NOT_RECORDED` elsewhere)."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, k)  # [N, k] each
  if replay is not None:
    recorded = jnp.all(replay != NOT_RECORDED, axis=-1, keepdims=True)
    experts = jnp.where(recorded, replay.astype(experts.dtype), experts)
    weights = jnp.take_along_axis(probs, experts, axis=-1)
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return Routing(experts, weights)


def router_stats(logits: jax.Array, experts: jax.Array, token_mask: jax.Array) -> RouterStats:
  """The statistics of one layer's routing: router logits [N, E], chosen experts [N, k], token_mask [N] (1 on
  real tokens)."""
  logits = logits.astype(jnp.float32)
  m = token_mask.astype(jnp.float32)
  num_experts = logits.shape[-1]
  load = jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(jnp.repeat(m, experts.shape[-1]))
  lse = jax.nn.logsumexp(logits, axis=-1)
  return RouterStats(jnp.sum(m), load, jnp.sum(jax.nn.softmax(logits, axis=-1) * m[:, None], axis=0),
                     jnp.sum(jnp.square(lse) * m))


def recorded_dtype(num_experts: int):
  """The smallest signed integer type holding every expert index and `NOT_RECORDED`."""
  return jnp.int8 if num_experts <= 127 else jnp.int16 if num_experts <= 32767 else jnp.int32


def balance_loss(stats: RouterStats) -> jax.Array:
  """transformers' `load_balancing_loss_func` from stats [L, ...]: E * sum_e (load_e / N) (probs_e / N), N the
  tokens of every layer together."""
  tokens = jnp.maximum(jnp.sum(stats.tokens), 1.0)
  load, probs = jnp.sum(stats.load, axis=0), jnp.sum(stats.probs, axis=0)
  return load.shape[-1] * jnp.sum((jax.lax.stop_gradient(load) / tokens) * (probs / tokens))


def z_loss(stats: RouterStats) -> jax.Array:
  """The router z-loss from stats [L, ...]: the mean over layers and tokens of logsumexp(logits)^2."""
  return jnp.sum(stats.z) / jnp.maximum(jnp.sum(stats.tokens), 1.0)


def load_metrics(stats: RouterStats) -> dict:
  """How balanced the experts were, from stats [L, ...]: each layer's most and least loaded expert relative to a
  perfectly even share (1.0), averaged over layers."""
  per_token = stats.load / jnp.maximum(stats.tokens, 1.0)[:, None]  # [L, E] assignments per token
  even = jnp.sum(per_token, axis=-1, keepdims=True) / per_token.shape[-1]  # k / E
  relative = per_token / jnp.maximum(even, 1e-9)
  return {"router/max_load": jnp.mean(jnp.max(relative, axis=-1)),
          "router/min_load": jnp.mean(jnp.min(relative, axis=-1))}


_COLLECTED: contextvars.ContextVar[list | None] = contextvars.ContextVar("jaxalign_router_stats", default=None)


@contextlib.contextmanager
def collecting():
  """Collects the `RouterStats` [L, ...] of every mixture-of-experts forward pass run inside the block (traced
  values: read them in the same trace). Yields the list they are appended to."""
  collected: list = []
  token = _COLLECTED.set(collected)
  try:
    yield collected
  finally:
    _COLLECTED.reset(token)


def report(stats: RouterStats | None) -> None:
  """Hands a forward pass's router statistics to the enclosing `collecting` block, if any."""
  collected = _COLLECTED.get()
  if collected is not None and stats is not None:
    collected.append(stats)


def aux_losses(collected: list, aux_coef: float, z_coef: float) -> tuple[jax.Array, dict]:
  """(aux_coef * balance + z_coef * z-loss, router metrics) over the collected passes' statistics (together, as
  one pass); (0, {}) when nothing was collected (a dense model)."""
  if not collected:
    return jnp.zeros((), jnp.float32), {}
  stats = jax.tree.map(lambda *x: jnp.concatenate(x, axis=0), *collected)  # [passes * L, ...]
  balance, z = balance_loss(stats), z_loss(stats)
  return aux_coef * balance + z_coef * z, {"router/balance": balance, "router/z": z,
                                           **load_metrics(stats)}
