"""Online algorithms that learn from a dataset's responses, with samples of the same prompts drawn in the step.

The step's batch carries each prompt (to sample from) and the data's rows for it (`batching.with_prompts`): an
SFT demonstration [B, T] or a preference pair [B, 2, T] (+ `scores` [B, 2]). The step draws rl.group_size
samples per prompt from the policy (unscored: `scores_rollout` is off) and runs the reference on them; one
update unit is one prompt: its data rows and its G samples. What the samples are for is the algorithm's: SPIN's
rejected answers, the on-policy KL term of PMLE and preference distillation.
Shape letters: U units (prompts), G samples per prompt, T data row length, P + N sample row length.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxalign import losses
from jaxalign.algorithms.forward import example_logps
from jaxalign.algorithms.forward import frozen as no_grad
from jaxalign.algorithms.forward import rows as row_view
from jaxalign.algorithms.online.base import Algorithm


class DataUnits(NamedTuple):
  """One prompt's data rows and its samples (unit axis U first)."""

  data: dict  # the data's rows: a demonstration [U, T] or a pair [U, 2, T] (+ prompt_mask [U, P], scores [U, 2])
  samples: dict  # the G samples' rows [U, G, P+N]
  mask: jax.Array  # [U, G, N] the samples' completion tokens
  ref: jax.Array | None  # [U, G, N] their reference log-probs (None: no reference)
  data_ref: jax.Array | None = None  # [U] / [U, 2] summed reference log-probs of the data's responses
  scores: jax.Array | None = None  # [U, 2] R_hat of the pair's responses (preference distillation)


class SampleStats(NamedTuple):
  """Loss statistics of a minibatch: the data's (`pairs`) and the samples' token log-probs (`kl`, for a KL term)."""

  pairs: losses.PairStats
  kl: losses.TokenBatch | None


class DataAlgorithm(Algorithm):
  """Shared by SPIN, PMLE and preference distillation: units per prompt, log-prob passes, checks, evaluation."""

  scores_rollout = False
  reads_reward_model = False  # scores the data's responses with rl.reward_model

  def units_per_prompt(self, rl) -> int:
    return 1

  def needs_old_pass(self, rl) -> bool:
    return False  # the losses compare the policy with the data and the reference only

  def check(self, rl, loss_params: dict, prompts: int) -> None:
    super().check(rl, loss_params, prompts)
    if rl.oversample > 1 or rl.kl_coef or rl.kl_loss_coef or rl.entropy_coef:
      raise ValueError("rl.oversample, rl.kl_coef, rl.kl_loss_coef and rl.entropy_coef apply to reward-driven "
                       "algorithms; this one's regularisation is its loss's (loss.params)")
    if rl.reward_model and not self.reads_reward_model:
      raise ValueError(f"rl.reward_model={rl.reward_model}: this algorithm scores nothing (its samples need no "
                       "reward); leave it unset")

  def units(self, ctx, state, frozen_params, s, key):
    g = ctx.rl.group_size

    def by_prompt(x):  # [R, ...] -> [U, G, ...]: a prompt's samples are consecutive rows
      return x.reshape(x.shape[0] // g, g, *x.shape[1:])

    units = DataUnits(data=s.data, samples=jax.tree.map(by_prompt, s.rows), mask=by_prompt(s.mask),
                      ref=None if s.ref is None else by_prompt(s.ref))
    return self.complete(ctx, state, frozen_params, units)

  def complete(self, ctx, state, frozen_params, units: DataUnits) -> tuple[DataUnits, dict]:
    """(units with what this algorithm adds before the update: reference or reward passes on the data, metrics)."""
    del ctx, state, frozen_params
    return units, {}

  def data_logps(self, ctx, model, data: dict) -> tuple[jax.Array, jax.Array]:
    """Summed log-probs and token counts of the data's responses, [U] or [U, 2], at the sampling temperature
    (the samples' log-probs are taken at it too)."""
    return example_logps(model, data, temperature=ctx.rl.temperature, **ctx.fns.op)

  def sample_logps(self, ctx, policy, unit: DataUnits) -> tuple[jax.Array, jax.Array]:
    """Log-probs [U*G, N] of the samples' completion tokens under `policy`, each prompt run once, and their
    mask [U*G, N]."""
    rows = jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]), unit.samples)
    logps = ctx.with_shared_prompts().completion_logps(policy, rows, None)[0]
    return logps, unit.mask.reshape(logps.shape)

  def kl_batch(self, ctx, policy, unit: DataUnits) -> losses.TokenBatch | None:
    """The on-policy KL block: samples' log-probs (gradient), the reference's, the mask; None without reference."""
    if unit.ref is None:
      return None
    logps, mask = self.sample_logps(ctx, policy, unit)
    return losses.TokenBatch(logps=logps, mask=mask, ref_logps=unit.ref.reshape(logps.shape))

  def loss_fn(self, ctx, stats: SampleStats, counts: dict):
    return super().loss_fn(ctx, stats.pairs, {**counts, "kl_batch": stats.kl})

  def counts(self, ctx, stats: SampleStats, size: int) -> dict:
    return {"num_pairs": stats.pairs.policy_chosen.shape[0]}

  def evaluate(self, ctx, policy, data: dict) -> dict:
    """Held-out metrics of the data's rows under `policy`."""
    raise NotImplementedError


class PairDataAlgorithm(DataAlgorithm):
  """Trains on preference pairs (chosen, rejected): the policy's summed log-probs of both give the PairStats."""

  data_format = "preference"

  def pair_stats(self, ctx, policy, unit: DataUnits) -> losses.PairStats:
    s, n = self.data_logps(ctx, policy, unit.data)  # [U, 2]
    score = (None, None) if unit.scores is None else (unit.scores[:, 0], unit.scores[:, 1])
    return losses.PairStats(policy_chosen=s[:, 0], policy_rejected=s[:, 1], n_chosen=n[:, 0], n_rejected=n[:, 1],
                            score_chosen=score[0], score_rejected=score[1])

  def stats(self, ctx, policy, trainable, unit: DataUnits):
    return SampleStats(self.pair_stats(ctx, policy, unit), self.kl_batch(ctx, policy, unit))

  def evaluate(self, ctx, policy, data: dict) -> dict:
    """Does the policy rank the held-out chosen response first (the implicit reward gamma * S of Yun et al.
    orders a pair as S does), and by how much (summed log-prob margin)."""
    s = self.data_logps(ctx, policy, data)[0]
    margin = s[:, 0] - s[:, 1]
    return {"policy_prefers_chosen": jnp.mean((margin > 0).astype(jnp.float32)), "logps/margin": jnp.mean(margin),
            "loss": -jnp.mean(jax.nn.log_sigmoid(margin))}


def reference_logps(ctx, state, frozen_params, algorithm: DataAlgorithm, data: dict) -> jax.Array:
  """Summed reference log-probs of the data's responses (no gradient), [U] or [U, 2]."""
  return no_grad(algorithm.data_logps, ctx, ctx.reference(state, frozen_params), data)[0]


def reward_model_scores(ctx, frozen_params, data: dict) -> jax.Array:
  """rl.reward_model's scores of the data's responses, [U, C] (each read at its last real token)."""
  rows = row_view(data)
  return jax.lax.stop_gradient(ctx.model_scores(frozen_params, rows)).reshape(data["input_ids"].shape[:-1])
