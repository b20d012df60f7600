"""What an online algorithm is: what it needs, how it turns a scored rollout into update units, its loss.

The step (`online.step`) generates, scores and runs the old-policy and reference passes for every
algorithm alike, then hands a `Scored` rollout to the algorithm. An algorithm returns its update units
(a NamedTuple of arrays with the unit axis first: rows, pairs, ...), and for each minibatch of them the
loss statistics and the loss. Shape letters: R rollout rows, P prompt length, N new tokens, T = P + N.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxalign import losses
from jaxalign.algorithms.objectives import call_loss


class Scored(NamedTuple):
  """One scored rollout (all detached): what every algorithm reads."""

  rollout: object  # sampler.Rollout
  rows: dict  # training rows [R, T]: input_ids, loss_mask, segment_ids
  floor: jax.Array | None  # [R, T-1] logit floor of each row's targets (None: the full distribution)
  uid: jax.Array  # [R] example ids (rule rewards look up gold answers by them)
  scores: jax.Array  # [R] rewards
  old: jax.Array | None  # [R, N] old-policy log-probs on the training path (None: no old pass, see needs_old_pass)
  ref: jax.Array | None  # [R, N] reference log-probs (= old without a reference)
  mask: jax.Array  # [R, N] completion tokens that train (float32)
  group_ids: jax.Array  # [R] the prompt each row answers
  num_groups: int
  # The batch's own rows for algorithms that train on a dataset (`Algorithm.data_format` not "prompt"): the
  # demonstration [B, T] or pair [B, 2, T] rows of each prompt (`batching.collate_online`), else None.
  data: dict | None = None


class TokenUnits(NamedTuple):
  """Rows trained token by token (policy gradient, rejection sampling)."""

  rows: dict  # [U, T]
  floor: jax.Array | None  # [U, T-1]
  mask: jax.Array  # [U, N]
  old: jax.Array | None = None  # [U, N] (None: the update's own log-probs, detached)
  ref: jax.Array | None = None  # [U, N]
  adv: jax.Array | None = None  # [U] per sequence or [U, N] per token
  sampler: jax.Array | None = None  # [U, N] the sampler's log-probs, when no old pass compared them


def take(tree, index):
  """Rows `index` of every array of a pytree (update units, rows, rollouts)."""
  return jax.tree.map(lambda x: x[index], tree)


class Algorithm:
  """One online algorithm. Subclasses set `loss` (a registered loss) and implement `units` and `stats`.

  `ctx` below is the step's `online.step.OnlineFns`: the policy, the completion log-prob pass, rewards,
  the critic and the config.
  """

  loss: str
  # The data.format it trains on: "prompt" (prompts only, every response sampled in the step), or "sft" /
  # "preference": the dataset's demonstrations / pairs ride in the step's batch beside their prompts.
  data_format: str = "prompt"
  # Whether the step scores its samples (rule rewards, rl.reward_model): algorithms that learn from the data's
  # responses draw samples for another purpose (SPIN's rejected answers, PMLE's KL term) and need no rewards.
  scores_rollout: bool = True
  critic: bool = False  # trains a value model beside the policy: trainable = {"policy", "value"}
  # Log-probs (old, reference, current) under the distribution sampled from (the kept top-k / top-p set):
  # what importance ratios need. Algorithms that fit the model's own distribution (DPO, SFT) leave it off.
  replays_sampling_mask: bool = False
  # Whether the update units' rows are the rollout's rows in order (whole groups, consecutive), so that a
  # single-minibatch update can run each prompt once (rl.share_prompt).
  units_keep_groups: bool = False
  normalizes_advantages: bool = False  # honours rl.normalize_advantages

  def uses_reference(self, rl, loss_params: dict) -> bool:
    """Whether the step runs the frozen reference: a KL term as a loss (rl.kl_loss_coef), or a loss that reads
    it (its registration: DPO always, the GRPO family when its beta > 0)."""
    return rl.kl_loss_coef > 0 or losses.spec(self.loss).uses_reference(loss_params)

  def needs_old_pass(self, rl) -> bool:
    """Whether `units` or the loss read old-policy log-probs that differ from the update's own (detached):
    else the step skips the old-policy forward pass (Scored.old is None)."""
    del rl
    return True

  def update_metrics(self, unit, stats) -> dict:
    """Metrics of a minibatch that only the update pass can give (e.g. when the old pass was skipped)."""
    del unit, stats
    return {}

  def check(self, rl, loss_params: dict, prompts: int) -> None:
    """ValueError (one line) for `rl.*` settings this algorithm cannot honour (`prompts` per step)."""
    if rl.normalize_advantages and not self.normalizes_advantages:
      raise ValueError("rl.normalize_advantages applies to rloo (TRL's RLOO normalisation); this algorithm "
                       "normalises its advantages its own way")
    if rl.reference_update_steps and not self.uses_reference(rl, loss_params):
      raise ValueError(f"rl.reference_update_steps={rl.reference_update_steps} updates a reference this run does "
                       "not use (its loss and rl.kl_* read none)")
    units = prompts * self.units_per_prompt(rl)
    if units % rl.minibatches:
      raise ValueError(f"rl.minibatches={rl.minibatches} does not divide the {units} update units of a step "
                       f"({prompts} prompts x {self.units_per_prompt(rl)})")

  def check_data(self, rl, examples) -> None:
    """ValueError (one line) when the training `examples` (encoded) lack what the algorithm reads."""
    del rl, examples

  def units_per_prompt(self, rl) -> int:
    """Update units each prompt gives (rows of its group by default)."""
    return rl.group_size

  def units(self, ctx, state, frozen_params, scored: Scored, key) -> tuple[NamedTuple, dict]:
    """(update units, metrics) from a scored rollout."""
    raise NotImplementedError

  def stats(self, ctx, policy, trainable, unit):
    """The loss statistics of a minibatch of units under the current `policy` (gradient flows)."""
    raise NotImplementedError

  def counts(self, ctx, stats, size: int) -> dict:
    """Step counts the loss may take (it receives those its signature names)."""
    return {"num_sequences": size}

  def loss_fn(self, ctx, stats, counts: dict):
    """(loss, metrics) of the registered loss on `stats`."""
    return call_loss(self.loss, stats, ctx.fns.loss_params, counts)

  def policy_params(self, trainable):
    """The policy's parameters inside the trainable tree."""
    return trainable["policy"] if self.critic else trainable


class TokenAlgorithm(Algorithm):
  """Algorithms whose loss reads token statistics (`losses.TokenBatch`): the KL-to-reference loss term and
  the entropy bonus apply to all of them."""

  def counts(self, ctx, stats, size: int) -> dict:
    # Dr. GRPO's constant normaliser: the configured completion length (never the batch's longest).
    return {"num_sequences": size, "num_tokens": jnp.maximum(jnp.sum(stats.mask), 1.0),
            "max_len": ctx.rl.max_new_tokens}

  def loss_fn(self, ctx, stats, counts: dict):
    counts = {k: v for k, v in counts.items() if k != "max_len" or "max_len" not in ctx.fns.loss_params}
    loss, metrics = super().loss_fn(ctx, stats, counts)
    return regularised(ctx.rl, stats, loss, metrics)

  def needs_entropy(self, ctx) -> bool:
    return ctx.rl.entropy_coef > 0

  def token_batch(self, ctx, policy, unit: TokenUnits, **fields) -> losses.TokenBatch:
    """TokenBatch of `unit` under `policy`: log-probs (and entropies when the bonus needs them)."""
    logps, _, entropy = ctx.completion_logps(policy, unit.rows, unit.floor, entropy=self.needs_entropy(ctx))
    old = jax.lax.stop_gradient(logps) if unit.old is None else unit.old
    return losses.TokenBatch(logps=logps, mask=unit.mask, old_logps=old, ref_logps=unit.ref,
                             advantages=unit.adv, entropy=entropy, **fields)


def regularised(rl, stats: losses.TokenBatch, loss, metrics: dict):
  """The loss plus rl.kl_loss_coef x KL(policy || reference) minus rl.entropy_coef x token-mean entropy."""
  if rl.kl_loss_coef:
    kl = losses.kl_penalty(stats, estimator=rl.kl_loss_estimator)
    loss, metrics = loss + rl.kl_loss_coef * kl, {**metrics, "kl_loss": jax.lax.stop_gradient(kl)}
  if rl.entropy_coef:
    entropy = jnp.sum(stats.entropy * stats.mask) / jnp.maximum(jnp.sum(stats.mask), 1.0)
    loss, metrics = loss - rl.entropy_coef * entropy, {**metrics, "entropy": jax.lax.stop_gradient(entropy)}
  return loss, metrics


class PolicyGradient(TokenAlgorithm):
  """Policy-gradient algorithms: an advantage per sequence or token, optionally importance-weighted for the
  sampler / trainer log-prob mismatch (rl.is_cap). `kl_in_reward`: rl.kl_coef shapes the reward."""

  kl_in_reward: bool = False
  replays_sampling_mask = True
  units_keep_groups = True  # `token_units`: the rollout's rows

  def uses_reference(self, rl, loss_params: dict) -> bool:
    return super().uses_reference(rl, loss_params) or (self.kl_in_reward and rl.kl_coef > 0)

  def needs_old_pass(self, rl) -> bool:
    # One optimiser step per rollout: pi_old is the policy being updated (TRL and Tunix skip the pass too).
    return rl.epochs * rl.minibatches > 1 or rl.is_cap > 0 or self.kl_in_reward

  def update_metrics(self, unit, stats) -> dict:
    if getattr(unit, "sampler", None) is None:
      return {}
    return mismatch_metrics(jax.lax.stop_gradient(stats.logps), unit.sampler, unit.mask)

  def advantages(self, ctx, state, frozen_params, s: Scored, key) -> tuple[jax.Array, dict]:
    """(advantages [R] or [R, N], metrics)."""
    raise NotImplementedError

  def units(self, ctx, state, frozen_params, s: Scored, key):
    advantages, metrics = self.advantages(ctx, state, frozen_params, s, key)
    return token_units(ctx.rl, s, advantages), metrics

  def stats(self, ctx, policy, trainable, unit: TokenUnits):
    return self.token_batch(ctx, policy, unit)

  def loss_fn(self, ctx, stats, counts: dict):
    loss, metrics = super().loss_fn(ctx, stats, counts)
    # pi_theta / pi_old: exactly 1 in the first minibatch of a rollout when both passes see the same distribution.
    ratio = jnp.exp(jax.lax.stop_gradient(stats.logps) - stats.old_logps)
    return loss, {**metrics, "ratio_deviation_max": jnp.max(jnp.abs(ratio - 1.0) * stats.mask)}

  def kl_scores(self, rl, s: Scored) -> jax.Array:
    """Scores minus rl.kl_coef x the sequence KL (k1) to the reference."""
    return losses.kl_penalised_scores(s.scores, s.old, s.ref, s.mask, beta=rl.kl_coef) if rl.kl_coef else s.scores


def token_units(rl, s: Scored, advantages) -> TokenUnits:
  """Policy-gradient units; with rl.is_cap the advantages carry the truncated importance weight
  min(pi_old / pi_sampler, cap) of each token (Yao et al. 2025, TIS), detached."""
  if rl.is_cap:
    weight = jnp.minimum(jnp.exp(s.old - s.rollout.logprobs), rl.is_cap) * s.mask
    advantages = (advantages[:, None] if advantages.ndim == 1 else advantages) * jax.lax.stop_gradient(weight)
  sampler = s.rollout.logprobs if s.old is None else None  # compared in the update (`update_metrics`)
  return TokenUnits(rows=s.rows, floor=s.floor, mask=s.mask, old=s.old, ref=s.ref, adv=advantages, sampler=sampler)


def mismatch_metrics(logps, sampler, mask) -> dict:
  """How far the training path's log-probs [R, N] are from the sampler's on the `mask`ed tokens."""
  gap = jnp.abs(logps - sampler) * mask
  return {"rollout/logprob_mismatch_max": jnp.max(gap),
          "rollout/logprob_mismatch_mean": jnp.sum(gap) / jnp.maximum(jnp.sum(mask), 1.0)}


def group_best(scores: jax.Array, group_size: int, trains: jax.Array):
  """(best, worst, distinct) per group of `group_size` consecutive rows, as row indices [G_count], among the
  rows that train (`trains` [R]: rl.mask_truncated_completions leaves truncated rows out). `distinct`: two
  training rows of different reward exist."""
  scores = scores.reshape(-1, group_size)
  trains = trains.reshape(-1, group_size)
  best = jnp.argmax(jnp.where(trains, scores, -jnp.inf), axis=-1)
  worst = jnp.argmin(jnp.where(trains, scores, jnp.inf), axis=-1)
  distinct = jnp.take_along_axis(scores, best[:, None], -1)[:, 0] > jnp.take_along_axis(scores, worst[:, None], -1)[:, 0]
  distinct = distinct & jnp.take_along_axis(trains, best[:, None], -1)[:, 0]
  base = jnp.arange(best.shape[0]) * group_size
  return base + best, base + worst, distinct
