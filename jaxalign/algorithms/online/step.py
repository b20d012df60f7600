"""Online RL in one jitted step: generate -> score -> old / reference log-probs -> update units -> update.

`make_rl_step(ctx)` returns `step(state, prompts, frozen) -> (state, metrics)`. Everything runs inside one
`jax.jit` over the mesh: the sampler (KV cache, one prefill per distinct prompt) uses the policy's own
weights resharded into the decode layout (`rollout.decode_layout`; no copy to an inference engine), rewards come from rule functions (one host callback) and/or a
reward model in the same graph, and the update is a scan over epochs x minibatches of the algorithm's
update units. What differs between algorithms lives in their `Algorithm` object (`online.base`).
Shape letters: B prompts, G group size, R = B x G rollout rows, P prompt length, N new tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxalign import losses
from jaxalign.algorithms.forward import frozen as no_grad
from jaxalign.algorithms.forward import loss_targets, prompt_sharing, shared_prompt_token_logps, token_logps
from jaxalign.algorithms.online.base import Algorithm, Scored, mismatch_metrics, take
from jaxalign.algorithms.online.packing import pack, packed_or_padded, packed_rows, unpack
from jaxalign.algorithms.step import StepFns, TrainState, with_router_losses
from jaxalign.config import RLConfig
from jaxalign.data import batching
from jaxalign.models import routing
from jaxalign.models.decoder import last_token_values
from jaxalign.rollout.decode_layout import generate_in_decode_layout
from jaxalign.rollout.sampler import SamplingConfig


@dataclasses.dataclass(frozen=True)
class OnlineFns:
  """Static pieces of the online step (closed over by jit), and the passes every algorithm shares."""

  fns: StepFns
  algorithm: Algorithm
  rl: RLConfig
  sampling: SamplingConfig
  reward: object  # RuleRewards: (uid, tokens, mask) -> (scores [R], {"reward/host_seconds", verifier metrics})
  uses_reference: bool
  critic: object = None  # graphdef of the value model (trainable = {"policy", "value"})
  reward_model: object = None  # graphdef of the reward model (weights in frozen["reward_model"])
  # rl.reference_update_steps > 0: the shardings of the reference weights held in the train state
  # (`state.loss_state["reference"]`, those of the frozen reference), kept explicitly when it is replaced.
  reference_shardings: object = None
  # Rows come in groups of this many consecutive rows with the same prompt: `completion_logps` runs each
  # prompt once (`with_shared_prompts`; 1: every row whole).
  prompt_group: int = 1

  def policy(self, trainable, frozen_params):
    return self.fns.policy(self.algorithm.policy_params(trainable), frozen_params)

  def values(self, value_params, rows):
    """V(s_t) [R, N] before each completion token (positions P-1 .. P+N-2)."""
    model, packing = nnx.merge(self.critic, value_params), rows.get("packing")
    if packing is None:
      values = model(rows["input_ids"], segment_ids=rows["segment_ids"])
    else:
      packed = packed_rows(rows, packing)
      values = unpack(model(packed["input_ids"], segment_ids=packed["segment_ids"]), packing)
    return values[:, -self.rl.max_new_tokens - 1:-1]

  def reference(self, state: TrainState, frozen_params):
    """The reference model, or None when the run uses none: the policy as it was at the last iteration
    boundary (rl.reference_update_steps; its weights in the train state), else the frozen one."""
    if not self.uses_reference:
      return None
    if "reference" in state.loss_state:
      return self.fns.policy(state.loss_state["reference"], frozen_params)
    return self.fns.reference(frozen_params)

  def scores(self, frozen_params, uid, rollout, rows):
    """Rule rewards (host callback) plus the reward model read at each row's last real token; and the callback's
    metrics (host seconds; with verifier rewards the pool's seconds, timeouts and errors)."""
    scores, metrics = self.reward(uid, rollout.tokens, rollout.mask)
    if self.reward_model is not None:
      scores = scores + self.rl.reward_model_weight * self.model_scores(frozen_params, rows)
    return scores, metrics

  def model_scores(self, frozen_params, rows) -> jax.Array:
    """The reward model's score [R] of rows [R, T] (left or right padded), read at each row's last real token."""
    model = nnx.merge(self.reward_model, frozen_params["reward_model"])
    values = model(rows["input_ids"], segment_ids=rows["segment_ids"])
    return last_token_values(values, rows["segment_ids"] != 0)

  def completion_mask(self, rows) -> jax.Array:
    """The completion tokens [R, N] of training rows (float32), as `completion_logps` returns them."""
    return loss_targets(rows)[1][:, -self.rl.max_new_tokens:]

  def completion_logps(self, model, rows, floor, *, entropy: bool = False):
    """Log-probs [R, N] of the completion tokens (positions P-1 .. P+N-2 of the row), their mask, and the
    entropies [R, N] (None unless asked), renormalised over the sampled set where `floor` [R, T-1] says.
    Rows that carry a "packing" (`online.packing`) run packed and are read back into the row view."""
    kwargs = dict(temperature=self.rl.temperature, impl=self.fns.op["impl"], return_entropy=entropy)
    packing, n = rows.get("packing"), self.rl.max_new_tokens
    sharing = self.prompt_sharing(rows) if packing is None else 1
    if sharing > 1:
      prompt = rows["input_ids"].shape[1] - n
      floor = None if floor is None else floor[:, -n:]
      logps, mask, *entropies = shared_prompt_token_logps(model, rows, prompt, sharing, logit_floor=floor, **kwargs)
      return logps, mask, entropies[0] if entropy else None
    if packing is None:
      out = token_logps(model, rows, logit_floor=floor, **kwargs)
    else:
      floor = None if floor is None else pack(floor, packing, -jnp.inf, targets=True)
      out = token_logps(model, packed_rows(rows, packing), logit_floor=floor, **kwargs)
      out = (unpack(out[0], packing, targets=True), None, *(unpack(x, packing, targets=True) for x in out[2:]))
    return out[0][:, -n:], self.completion_mask(rows), out[2][:, -n:] if entropy else None

  def with_shared_prompts(self) -> OnlineFns:
    """These passes on rollout rows in whole groups (rl.share_prompt): each prompt computed once."""
    return dataclasses.replace(self, prompt_group=self.rl.group_size) if self.rl.share_prompt else self

  def prompt_sharing(self, rows) -> int:
    """How many consecutive rows of `rows` run one computation of their prompt (`forward.prompt_sharing`)."""
    return prompt_sharing(rows["input_ids"].shape[0], self.prompt_group)

  def generate(self, policy, prompts: dict, key, group_size: int, sampling: SamplingConfig | None = None):
    """Rollout of `group_size` samples of each prompt (one prefill per prompt), on the policy's weights
    resharded into the decode layout in the compute dtype (no device holds more than its share of them)."""
    return generate_in_decode_layout(policy, prompts["prompt_ids"], prompts["prompt_mask"], key,
                                     sampling or self.sampling, group_size=group_size)

  def greedy_scores(self, state: TrainState, frozen_params, prompts: dict):
    """Rewards [B] of the policy's greedy completions of `prompts`, shaped as the samples' are."""
    greedy = self.generate(self.policy(state.trainable, frozen_params), prompts, jax.random.PRNGKey(0), 1,
                           dataclasses.replace(self.sampling, temperature=0.0))
    scores = self.scores(frozen_params, prompts["uid"], greedy, rollout_rows(greedy))[0]
    return shaped_scores(self.rl, scores, greedy)[0]


def rollout_rows(rollout, replay: bool = False) -> dict:
  """Training rows [R, P+N] from left-padded prompts and completions (segment 1 on real tokens); replay: with the
  experts a mixture-of-experts sampler routed each token to ("routed_experts" [R, P+N, L, k]), if it recorded
  them."""
  ids = jnp.concatenate([rollout.prompt_ids, rollout.tokens], axis=1)
  rows = {"input_ids": ids,
          "loss_mask": jnp.concatenate([jnp.zeros_like(rollout.prompt_mask), rollout.mask], axis=1),
          "segment_ids": jnp.concatenate([rollout.prompt_mask, rollout.mask], axis=1)}
  if replay and rollout.routing is not None:
    rows["routed_experts"] = rollout.routing
  return rows


def without_replay(rows: dict) -> dict:
  """Rows whose tokens route themselves."""
  return {k: v for k, v in rows.items() if k != "routed_experts"}


# The training path recomputes the logits the sampler compared with its floor, equal up to rounding in float32
# (cached vs full forward, x / T vs x * (1 / T)): the floor is lowered by this relative slack so that the kept
# tokens stay kept. In bf16 the two forwards differ by far more than any slack: near-floor tokens then flip
# and the gap shows in rollout/logprob_mismatch_* (rl.is_cap corrects for it).
FLOOR_SLACK = 1e-5


def target_floor(rollout) -> jax.Array:
  """The sampler's logit floor [R, P+N-1] at every target position of the rollout's rows (-inf on prompts),
  lowered by FLOOR_SLACK."""
  floor = rollout.logit_floor.astype(jnp.float32)
  floor = floor - FLOOR_SLACK * jnp.maximum(1.0, jnp.abs(floor))
  prompt = jnp.full((rollout.prompt_ids.shape[0], rollout.prompt_ids.shape[1] - 1), -jnp.inf, jnp.float32)
  return jnp.concatenate([prompt, floor], axis=1)


def _select_groups(tree, scores, group_ids, num_groups: int, keep: int, group_size: int):
  """DAPO dynamic sampling inside jit: keep `keep` groups, those with reward variance first."""
  signal = losses.groups_with_signal(scores, group_ids, num_groups).reshape(num_groups, group_size)[:, 0]
  order = jnp.argsort(~signal, stable=True)[:keep]  # [keep] groups
  rows = (order[:, None] * group_size + jnp.arange(group_size)[None]).reshape(-1)
  return take(tree, rows), take(scores, rows), jnp.mean(signal.astype(jnp.float32))


def shaped_scores(rl: RLConfig, scores, rollout) -> tuple[jax.Array, dict]:
  """Rewards [R] plus DAPO's overlong penalty (rl.overlong_buffer > 0) on each completion's length."""
  if not rl.overlong_buffer:
    return scores, {}
  penalty = losses.overlong_penalty(jnp.sum(rollout.mask, -1), max_len=rl.max_new_tokens,
                                    cache_len=rl.overlong_buffer)
  return scores + penalty, {"reward/overlong_penalty": jnp.mean(penalty)}


def trained_mask(rl: RLConfig, mask, rollout) -> jax.Array:
  """The completion tokens [R, N] that train: all, or (rl.mask_truncated_completions) only those of rows that
  emitted EOS."""
  return mask * rollout.finished[:, None] if rl.mask_truncated_completions else mask


def _update(ctx: OnlineFns, state: TrainState, frozen_params, units, key):
  """Epochs x minibatches of optimiser steps over the update units (a lax.scan)."""
  rl, algorithm = ctx.rl, ctx.algorithm
  num = jax.tree.leaves(units)[0].shape[0]
  size = num // rl.minibatches
  whole = rl.minibatches == 1 and algorithm.units_keep_groups
  if whole:
    # Every pass takes all units, whose order the loss does not depend on: the rollout's, groups whole, as they
    # are (no gather); the scan only counts the epochs.
    ctx = ctx.with_shared_prompts()
    order = None
  else:
    keys = jax.random.split(key, rl.epochs)
    order = jnp.concatenate([jax.random.permutation(k, num)[:size * rl.minibatches] for k in keys])
    order = order.reshape(rl.epochs * rl.minibatches, size)

  def loss_fn(trainable, unit):
    with routing.collecting() as collected:
      stats = algorithm.stats(ctx, ctx.policy(trainable, frozen_params), trainable, unit)
    loss, metrics = algorithm.loss_fn(ctx, stats, algorithm.counts(ctx, stats, size))
    loss, metrics = with_router_losses(loss, metrics, collected, ctx.fns.router_coefs)
    return loss, {**metrics, **algorithm.update_metrics(unit, stats)}

  def one_step(carry, index):
    trainable, opt_state = carry
    gradient = jax.value_and_grad(loss_fn, has_aux=True)
    minibatch = units if whole else take(units, index)
    ((_, metrics), grads), packing = packed_or_padded(lambda unit: gradient(trainable, unit), minibatch,
                                                      rl.pack_ratio, rl.pack_length)
    updates, opt_state = ctx.fns.tx.update(grads, opt_state, trainable)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics.update({f"packing/update_{k}": v for k, v in packing.items()})
    return (optax.apply_updates(trainable, updates), opt_state), metrics

  (trainable, opt_state), metrics = jax.lax.scan(one_step, (state.trainable, state.opt_state), order,
                                                 length=rl.epochs if whole else None)
  return trainable, opt_state, {k: jnp.mean(v) for k, v in metrics.items()}


def _rollout_metrics(rollout, mask) -> dict:
  tokens = jnp.maximum(jnp.sum(rollout.mask), 1.0)
  return {"rollout/logprob_mean": jnp.sum(rollout.logprobs * rollout.mask) / tokens,
          "completions/mean_length": jnp.mean(jnp.sum(rollout.mask, -1)),
          "completions/clipped_ratio": 1.0 - jnp.mean(rollout.finished.astype(jnp.float32)),
          "completions/trained_tokens": jnp.sum(mask)}


def learn(ctx: OnlineFns, state: TrainState, frozen_params, rollout, uid, scores, group_ids, keys, data=None):
  """The training passes of a scored rollout: old-policy and reference log-probs, the algorithm's update
  units, and the update. -> (trainable, opt_state, metrics).

  rollout [R rows]; uid, scores, group_ids [R]: each row's example, reward and prompt (rows of a prompt are
  consecutive); keys: (units key, update key); data: the batch's own rows (`split_data`), or None."""
  rl, algorithm = ctx.rl, ctx.algorithm
  policy = ctx.policy(state.trainable, frozen_params)
  scores, metrics = shaped_scores(rl, scores, rollout)
  rows = rollout_rows(rollout, replay=rl.routing_replay != "none")
  floor = target_floor(rollout) if algorithm.replays_sampling_mask and rl.truncates else None
  reference = ctx.reference(state, frozen_params)

  old_pass = algorithm.needs_old_pass(rl)
  replayed = "routed_experts" in rows

  def old_and_reference(rows):
    logps = ctx.with_shared_prompts().completion_logps  # the rollout's rows: whole groups
    old = no_grad(logps, policy, rows, floor)[0] if old_pass else None
    unreplayed = no_grad(logps, policy, without_replay(rows), floor)[0] if old_pass and replayed else None
    # The reference's full distribution: the floor is the policy's logit, meaningless for another network,
    # and the KL terms measure KL(pi_sampled || pi_ref).
    return old, no_grad(logps, reference, rows, None)[0] if reference is not None else old, unreplayed

  (old, ref, unreplayed), packing = (packed_or_padded(old_and_reference, rows, rl.pack_ratio, rl.pack_length)
                                     if old_pass or reference is not None else ((None, None, None), {}))
  metrics.update({f"packing/scoring_{k}": v for k, v in packing.items()})
  mask = trained_mask(rl, ctx.completion_mask(rows), rollout)
  metrics.update(_rollout_metrics(rollout, mask))
  if unreplayed is not None:
    metrics.update({f"{k}_no_replay": v for k, v in mismatch_metrics(unreplayed, rollout.logprobs,
                                                                      rollout.mask).items()})
  if rl.routing_replay == "scoring":
    rows = without_replay(rows)
  if old is not None:
    metrics.update(mismatch_metrics(old, rollout.logprobs, rollout.mask))
    if reference is not None:  # the sampled tokens' k1 to the reference (a loss's own "kl" is its estimate)
      metrics["rollout/kl_k1"] = jnp.sum((old - ref) * mask) / jnp.maximum(jnp.sum(mask), 1.0)

  scored = Scored(rollout, rows, floor, uid, scores, old, ref, mask, group_ids, scores.shape[0] // rl.group_size,
                  data)
  units, unit_metrics = algorithm.units(ctx, state, frozen_params, scored, keys[0])
  trainable, opt_state, update_metrics = _update(ctx, state, frozen_params, units, keys[1])
  return trainable, opt_state, {**metrics, **unit_metrics, **update_metrics}


def split_data(batch: dict) -> tuple[dict, dict | None]:
  """(prompts {prompt_ids, prompt_mask [B, P], uid [B]}, the data's own rows with their prefix dropped, or None)
  of an online batch (`batching.with_prompts`)."""
  prefix = batching.DATA_PREFIX
  data = {k.removeprefix(prefix): v for k, v in batch.items() if k.startswith(prefix)}
  return {k: v for k, v in batch.items() if not k.startswith(prefix)}, data or None


def next_reference(ctx: OnlineFns, state: TrainState, trainable) -> dict:
  """The loss state after this step: with rl.reference_update_steps = K, the reference becomes the updated policy
  at the end of every K-th step (steps tK+1 .. (t+1)K train against the policy after step tK: SPIN's pi_t), cast
  to the reference's dtypes and constrained to its shardings."""
  k = ctx.rl.reference_update_steps
  if not k:
    return state.loss_state
  boundary = (state.step + 1) % k == 0
  reference = jax.tree.map(lambda r, p: jnp.where(boundary, p.astype(r.dtype), r), state.loss_state["reference"],
                           ctx.algorithm.policy_params(trainable))
  if ctx.reference_shardings is not None:
    reference = jax.lax.with_sharding_constraint(reference, ctx.reference_shardings)
  return {**state.loss_state, "reference": reference}


def make_rl_step(ctx: OnlineFns):
  """step(state, batch, frozen) -> (state, metrics). batch: the prompts {prompt_ids, prompt_mask [B, P], uid [B]}
  and, for an algorithm that trains on a dataset, its rows (`split_data`)."""
  rl = ctx.rl

  def step(state: TrainState, batch: dict, frozen_params: dict):
    prompts, data = split_data(batch)
    rng, gen_key, unit_key, update_key = jax.random.split(state.rng, 4)
    policy = ctx.policy(state.trainable, frozen_params)
    num_prompts = prompts["prompt_ids"].shape[0]
    groups = num_prompts * rl.oversample
    tiled = jax.tree.map(lambda x: jnp.tile(x, (rl.oversample,) + (1,) * (x.ndim - 1)), prompts)
    rollout = ctx.generate(policy, tiled, gen_key, rl.group_size)
    uid = jnp.repeat(tiled["uid"], rl.group_size)
    group_ids = jnp.repeat(jnp.arange(groups), rl.group_size)
    metrics = {}
    if ctx.algorithm.scores_rollout:
      scores, reward_metrics = ctx.scores(frozen_params, uid, rollout, rollout_rows(rollout))
      metrics.update(reward_metrics)
    else:  # the samples train without rewards (SPIN, PMLE, distillation: `online.offline_data`)
      scores = jnp.zeros(uid.shape, jnp.float32)
    if rl.oversample > 1:  # on the task rewards: groups that differ only in length carry no signal
      (rollout, uid), scores, kept = _select_groups((rollout, uid), scores, group_ids, groups, num_prompts,
                                                    rl.group_size)
      group_ids, metrics["dynamic_sampling/signal_fraction"] = group_ids[:scores.shape[0]], kept
    if ctx.algorithm.scores_rollout:
      metrics.update(losses.group_metrics(scores, group_ids, num_prompts))
    trainable, opt_state, learn_metrics = learn(ctx, state, frozen_params, rollout, uid, scores, group_ids,
                                                (unit_key, update_key), data)
    return state._replace(trainable=trainable, opt_state=opt_state, step=state.step + 1, rng=rng,
                          loss_state=next_reference(ctx, state, trainable)), {**metrics, **learn_metrics}

  return step


def make_rl_eval(ctx: OnlineFns):
  """eval(state, batch, frozen) -> mean greedy reward on held-out prompts (and length), or for an algorithm that
  trains on a dataset its held-out metrics (`evaluate` of `online.offline_data`)."""

  def evaluate(state: TrainState, batch: dict, frozen_params: dict):
    prompts, data = split_data(batch)
    if data is not None:
      return ctx.algorithm.evaluate(ctx, ctx.policy(state.trainable, frozen_params), data)
    greedy = ctx.generate(ctx.policy(state.trainable, frozen_params), prompts, jax.random.PRNGKey(0), 1,
                          dataclasses.replace(ctx.sampling, temperature=0.0))
    scores, _ = ctx.scores(frozen_params, prompts["uid"], greedy, rollout_rows(greedy))
    return {"reward": jnp.mean(scores), "completions/mean_length": jnp.mean(jnp.sum(greedy.mask, -1)),
            "loss": -jnp.mean(scores)}

  return evaluate
