"""Online RL in one jitted step: generate -> score -> reference / old log-probs -> advantages -> update.

`make_rl_step(fns, spec, ...)` returns `step(state, prompts, frozen) -> (state, metrics)`. Everything
runs inside one `jax.jit` over the mesh: the sampler (KV cache) uses the policy's own sharded weights
(no copy to an inference engine), rewards come from rule functions (one host callback) and/or a reward
model in the same graph, and the update is a scan over epochs x minibatches of the rollout.

Each algorithm is a row of `ALGORITHMS`: its advantage estimator, its loss from the registry, and whether
the KL to the reference enters the reward (PPO-style, k1) or the loss (GRPO-style, k3 in the loss).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxalign import losses
from jaxalign.algorithms.forward import frozen as no_grad
from jaxalign.algorithms.forward import token_logps
from jaxalign.algorithms.objectives import call_loss
from jaxalign.algorithms.step import StepFns, TrainState
from jaxalign.models.decoder import last_token_values
from jaxalign.rollout.sampler import SamplingConfig, generate


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """Rollout and update settings of the online algorithms."""

  group_size: int = 8  # G completions per prompt
  max_new_tokens: int = 16
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  epochs: int = 1  # passes over each rollout (PPO epochs)
  minibatches: int = 1  # optimiser steps per pass
  kl_coef: float = 0.0  # beta of the KL-in-reward algorithms (ppo, rloo, remax, reinforce, reinforce_pp)
  # KL to the reference as a loss term instead (or as well): coefficient and estimator (k3 as in GRPO, k2).
  kl_loss_coef: float = 0.0
  kl_loss_estimator: str = "k3"
  rewards: dict = dataclasses.field(default_factory=lambda: {"max_digit": 1.0})  # rule reward -> weight
  oversample: int = 1  # DAPO dynamic sampling: generate this many times the groups, keep those with signal
  is_cap: float = 0.0  # truncated importance weight on sampler / trainer log-prob mismatch (0: off)
  rft_threshold: float = 0.5  # rejection sampling keeps the best sample when its reward reaches this
  gamma: float = 1.0  # PPO: GAE discount
  lam: float = 0.95  # PPO: GAE lambda
  # HF directory of a reward model (*ForSequenceClassification) scored inside the step, added to the rule
  # rewards with this weight; PPO's critic starts from it (else from the policy's backbone, zero head).
  reward_model: str | None = None
  reward_model_weight: float = 1.0

  def __post_init__(self):
    if self.group_size < 1 or self.max_new_tokens < 1 or self.epochs < 1 or self.minibatches < 1:
      raise ValueError("rl.group_size, rl.max_new_tokens, rl.epochs and rl.minibatches must be >= 1")
    if not (self.temperature > 0 and 0 < self.top_p <= 1 and self.top_k >= 0 and self.oversample >= 1):
      raise ValueError("rl.temperature must be > 0, rl.top_p in (0, 1], rl.top_k >= 0 and rl.oversample >= 1")
    if min(self.kl_coef, self.kl_loss_coef, self.is_cap) < 0 or not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
      raise ValueError("rl.kl_coef, rl.kl_loss_coef and rl.is_cap must be >= 0, rl.gamma and rl.lam in [0, 1]")

  def sampling(self, tokenizer) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                          top_p=self.top_p, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id or 0)


class Spec(NamedTuple):
  advantages: str  # grpo | dr_grpo | rloo | remax | reinforce | reinforce_pp | pairs | best
  loss: str  # registered loss
  kl_in_reward: bool


ALGORITHMS = {
  "ppo": Spec("gae", "ppo", True),
  "grpo": Spec("grpo", "grpo", False),
  "dr_grpo": Spec("dr_grpo", "dr_grpo", False),
  "dapo": Spec("grpo", "dapo", False),
  "gspo": Spec("grpo", "gspo", False),
  "cispo": Spec("grpo", "cispo", False),
  "rloo": Spec("rloo", "rloo", True),
  "remax": Spec("remax", "reinforce", True),
  "reinforce": Spec("reinforce", "reinforce", True),
  "reinforce_pp": Spec("reinforce_pp", "reinforce_pp", True),
  "online_dpo": Spec("pairs", "dpo", False),
  "rft": Spec("best", "sft", False),
}


def rollout_rows(prompt_ids, prompt_mask, tokens, mask) -> dict:
  """Training rows [R, P+N] from left-padded prompts and completions (segment 1 on real tokens)."""
  ids = jnp.concatenate([prompt_ids, tokens], axis=1)
  return {"input_ids": ids, "loss_mask": jnp.concatenate([jnp.zeros_like(prompt_mask), mask], axis=1),
          "segment_ids": jnp.concatenate([prompt_mask, mask], axis=1)}


def completion_logps(model, rows: dict, num_new: int, temperature: float, impl: str):
  """Log-probs [R, N] of the completion tokens (positions P-1 .. P+N-2 of the row) and their mask."""
  logps, mask = token_logps(model, rows, temperature=temperature, impl=impl)
  return logps[:, -num_new:], mask[:, -num_new:]


class Context(NamedTuple):
  """What an advantage estimator may read, all detached: scores [R], log-probs and mask [R, N], groups."""

  scores: jax.Array
  greedy_scores: jax.Array | None
  old: jax.Array
  ref: jax.Array
  mask: jax.Array
  group_ids: jax.Array
  num_groups: int
  kl_coef: float


def _kl_scores(c: Context):
  return losses.kl_penalised_scores(c.scores, c.old, c.ref, c.mask, beta=c.kl_coef) if c.kl_coef else c.scores


ESTIMATORS = {
  "grpo": lambda c: losses.grpo_advantages(c.scores, c.group_ids, c.num_groups),
  "dr_grpo": lambda c: losses.grpo_advantages(c.scores, c.group_ids, c.num_groups, scale="none"),
  "rloo": lambda c: losses.rloo_advantages(_kl_scores(c), c.group_ids, c.num_groups),
  "remax": lambda c: losses.remax_advantages(_kl_scores(c), c.greedy_scores),
  "reinforce": lambda c: losses.reinforce_advantages(_kl_scores(c)),
  "reinforce_pp": lambda c: losses.reinforce_pp_advantages(
    losses.kl_shaped_rewards(c.scores, c.old, c.ref, c.mask, beta=c.kl_coef)[0], c.mask),
}


@dataclasses.dataclass(frozen=True)
class OnlineFns:
  """Static pieces of the online step (closed over by jit)."""

  fns: StepFns
  spec: Spec
  rl: RLConfig
  sampling: SamplingConfig
  reward: object  # RuleRewards: (uid, tokens, mask) -> (scores [R], host seconds)
  uses_reference: bool
  critic: object = None  # graphdef of the PPO value model (trainable = {"policy", "value"})
  reward_model: object = None  # graphdef of the reward model (weights in frozen["reward_model"])

  def policy(self, trainable, frozen_params):
    return self.fns.policy(trainable["policy"] if self.critic is not None else trainable, frozen_params)

  def values(self, value_params, rows):
    """V(s_t) [R, N] before each completion token (positions P-1 .. P+N-2)."""
    values = nnx.merge(self.critic, value_params)(rows["input_ids"], segment_ids=rows["segment_ids"])
    return values[:, -self.rl.max_new_tokens - 1:-1]

  def scores(self, frozen_params, uid, rollout, rows):
    """Rule rewards (host callback) plus the reward model read at each row's last real token."""
    scores, seconds = self.reward(uid, rollout.tokens, rollout.mask)
    if self.reward_model is not None:
      model = nnx.merge(self.reward_model, frozen_params["reward_model"])
      values = model(rows["input_ids"], segment_ids=rows["segment_ids"])
      scores = scores + self.rl.reward_model_weight * last_token_values(values, rows["segment_ids"] != 0)
    return scores, seconds

  def completion_logps(self, model, rows):
    return completion_logps(model, rows, self.rl.max_new_tokens, self.rl.temperature, self.fns.op["impl"])

  def loss(self, stats, counts: dict):
    """The algorithm's loss; Dr. GRPO's constant normaliser defaults to rl.max_new_tokens."""
    if "max_len" not in self.fns.loss_params:
      counts = {**counts, "max_len": self.rl.max_new_tokens}
    return call_loss(self.spec.loss, stats, self.fns.loss_params, counts)


def _take(tree, index):
  return jax.tree.map(lambda x: x[index], tree)


def _select_groups(rollout_tree, scores, group_ids, num_groups: int, keep: int, group_size: int):
  """DAPO dynamic sampling inside jit: keep `keep` groups, those with reward variance first."""
  signal = losses.groups_with_signal(scores, group_ids, num_groups).reshape(num_groups, group_size)[:, 0]
  order = jnp.argsort(~signal, stable=True)[:keep]  # [keep] groups
  rows = (order[:, None] * group_size + jnp.arange(group_size)[None]).reshape(-1)
  return _take(rollout_tree, rows), _take(scores, rows), jnp.mean(signal.astype(jnp.float32))


def _pg_units(of: OnlineFns, rows, old, ref, mask, advantages, sampler_logps):
  """Per-row update units for the policy-gradient losses (optionally importance-weighted)."""
  if of.rl.is_cap:
    weight = jnp.minimum(jnp.exp(old - sampler_logps), of.rl.is_cap) * mask
    advantages = (advantages[:, None] if advantages.ndim == 1 else advantages) * jax.lax.stop_gradient(weight)
  return {"rows": rows, "old": old, "ref": ref, "mask": mask, "adv": advantages}


def _pg_stats(of: OnlineFns, policy, unit, trainable=None):
  logps, _ = of.completion_logps(policy, unit["rows"])
  batch = losses.TokenBatch(logps=logps, mask=unit["mask"], old_logps=unit["old"], ref_logps=unit["ref"],
                            advantages=unit["adv"])
  if of.critic is None:
    return batch
  return batch._replace(values=of.values(trainable["value"], unit["rows"]), old_values=unit["old_values"],
                        returns=unit["returns"])


def _pair_units(of: OnlineFns, rows, old, ref, mask, scores):
  """Online DPO: the best and worst sample of each group become (chosen, rejected); ties pair a sample with
  itself, which gives no gradient."""
  g = of.rl.group_size
  best, worst, distinct = losses.best_worst(scores.reshape(-1, g))
  base = jnp.arange(best.shape[0]) * g
  chosen, rejected = base + best, base + jnp.where(distinct, worst, best)
  ref_sums, counts = jnp.sum(ref * mask, -1), jnp.sum(mask, -1)  # [R]
  units = {"chosen": _take(rows, chosen), "rejected": _take(rows, rejected), "ref_c": ref_sums[chosen],
           "ref_r": ref_sums[rejected], "n_c": counts[chosen], "n_r": counts[rejected]}
  return units, jnp.mean(distinct.astype(jnp.float32))


def _sequence_logp(of: OnlineFns, policy, rows):
  logps, mask = of.completion_logps(policy, rows)
  return jnp.sum(logps * mask, -1)


def _pair_stats(of: OnlineFns, policy, unit, trainable=None):
  del trainable
  return losses.PairStats(policy_chosen=_sequence_logp(of, policy, unit["chosen"]),
                          policy_rejected=_sequence_logp(of, policy, unit["rejected"]),
                          ref_chosen=unit["ref_c"], ref_rejected=unit["ref_r"],
                          n_chosen=jnp.maximum(unit["n_c"], 1.0), n_rejected=jnp.maximum(unit["n_r"], 1.0))


def _best_units(of: OnlineFns, rows, mask, scores):
  """Rejection sampling: each group's best sample, kept when its reward reaches the threshold."""
  g = of.rl.group_size
  best, _, _ = losses.best_worst(scores.reshape(-1, g))
  index = jnp.arange(best.shape[0]) * g + best
  keep = (scores[index] >= of.rl.rft_threshold).astype(jnp.float32)
  return {"rows": _take(rows, index), "mask": mask[index] * keep[:, None]}, jnp.mean(keep)


def _best_stats(of: OnlineFns, policy, unit, trainable=None):
  del trainable
  logps, _ = of.completion_logps(policy, unit["rows"])
  return losses.TokenBatch(logps=logps, mask=unit["mask"])


def _ppo_units(of: OnlineFns, trainable, rows, old, ref, mask, scores, rollout):
  """PPO: KL-shaped token rewards with the score at EOS, GAE on the critic's values, whitened advantages."""
  old_values = no_grad(of.values, trainable["value"], rows)
  token_rewards, metrics = losses.kl_shaped_rewards(scores, old, ref, mask, beta=of.rl.kl_coef)
  advantages, returns = losses.gae(token_rewards, old_values, mask, gamma=of.rl.gamma, lam=of.rl.lam)
  units = _pg_units(of, rows, old, ref, mask, losses.whiten(advantages, mask), rollout.logprobs)
  return {**units, "old_values": old_values, "returns": returns}, metrics


UPDATE_STATS = {"pairs": _pair_stats, "best": _best_stats}


def _update(of: OnlineFns, state: TrainState, frozen_params, units, key):
  """Epochs x minibatches of optimiser steps over the update units (a lax.scan)."""
  num = jax.tree.leaves(units)[0].shape[0]
  size = num // of.rl.minibatches
  stats_fn = UPDATE_STATS.get(of.spec.advantages, _pg_stats)
  keys = jax.random.split(key, of.rl.epochs)
  order = jnp.concatenate([jax.random.permutation(k, num)[:size * of.rl.minibatches] for k in keys])
  order = order.reshape(of.rl.epochs * of.rl.minibatches, size)

  def loss_fn(trainable, unit):
    stats = stats_fn(of, of.policy(trainable, frozen_params), unit, trainable)
    mask = stats.mask if isinstance(stats, losses.TokenBatch) else None
    counts = {"num_sequences": size, "num_pairs": size}
    if mask is not None:
      counts["num_tokens"] = jnp.maximum(jnp.sum(mask), 1.0)
    loss, metrics = of.loss(stats, counts)
    if of.rl.kl_loss_coef and mask is not None:  # KL in the loss (PPO / REINFORCE family option)
      kl = losses.kl_penalty(stats, estimator=of.rl.kl_loss_estimator)
      loss, metrics = loss + of.rl.kl_loss_coef * kl, {**metrics, "kl_loss": jax.lax.stop_gradient(kl)}
    return loss, metrics

  def one_step(carry, index):
    trainable, opt_state = carry
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, _take(units, index))
    updates, opt_state = of.fns.tx.update(grads, opt_state, trainable)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return (optax.apply_updates(trainable, updates), opt_state), metrics

  (trainable, opt_state), metrics = jax.lax.scan(one_step, (state.trainable, state.opt_state), order)
  return trainable, opt_state, {k: jnp.mean(v) for k, v in metrics.items()}


class Sampled(NamedTuple):
  """One scored rollout: what the update-unit builders read (all detached)."""

  rollout: object  # sampler.Rollout
  rows: dict  # training rows [R, P+N]
  uid: jax.Array  # [R]
  scores: jax.Array  # [R]
  old: jax.Array  # [R, N] old-policy log-probs (training path)
  ref: jax.Array  # [R, N] reference log-probs (= old without a reference)
  mask: jax.Array  # [R, N]
  group_ids: jax.Array  # [R]
  num_groups: int


def _pg_rollout_units(of: OnlineFns, state, frozen_params, s: Sampled, greedy_key):
  """Critic-free policy gradient: the algorithm's estimator (ReMax first decodes a greedy baseline)."""
  greedy, metrics = None, {}
  if of.spec.advantages == "remax":
    baseline = generate(of.policy(state.trainable, frozen_params), s.rollout.prompt_ids, s.rollout.prompt_mask,
                        greedy_key, dataclasses.replace(of.sampling, temperature=0.0))
    rows = rollout_rows(baseline.prompt_ids, baseline.prompt_mask, baseline.tokens, baseline.mask)
    greedy, _ = of.scores(frozen_params, s.uid, baseline, rows)
    metrics["remax/greedy_reward"] = jnp.mean(greedy)
  context = Context(s.scores, greedy, s.old, s.ref, s.mask, s.group_ids, s.num_groups, of.rl.kl_coef)
  advantages = ESTIMATORS[of.spec.advantages](context)
  return _pg_units(of, s.rows, s.old, s.ref, s.mask, advantages, s.rollout.logprobs), metrics


UNITS = {
  "pairs": lambda of, state, frozen_params, s, key: _named(
    _pair_units(of, s.rows, s.old, s.ref, s.mask, s.scores), "online_dpo/distinct_fraction"),
  "best": lambda of, state, frozen_params, s, key: _named(_best_units(of, s.rows, s.mask, s.scores),
                                                          "rft/accept_rate"),
  "gae": lambda of, state, frozen_params, s, key: _ppo_units(of, state.trainable, s.rows, s.old, s.ref, s.mask,
                                                             s.scores, s.rollout),
}


def _named(units_and_value, name: str):
  units, value = units_and_value
  return units, {name: value}


def needs_reference(spec: Spec, rl: RLConfig, loss_params: dict) -> bool:
  """Whether the step must run the frozen reference: DPO pairs, a KL-in-reward beta, or a KL term in the loss."""
  beta = loss_params.get("beta", inspect.signature(losses.get(spec.loss)).parameters.get("beta"))
  beta = getattr(beta, "default", beta)
  kl_term = (spec.kl_in_reward and rl.kl_coef > 0) or rl.kl_loss_coef > 0
  return spec.loss == "dpo" or kl_term or bool(isinstance(beta, float) and beta > 0)


def make_rl_step(of: OnlineFns):
  """step(state, prompts {prompt_ids, prompt_mask [B, P], uid [B]}, frozen) -> (state, metrics)."""
  rl = of.rl

  def step(state: TrainState, prompts: dict, frozen_params: dict):
    rng, gen_key, greedy_key, update_key = jax.random.split(state.rng, 4)
    policy = of.policy(state.trainable, frozen_params)
    prompts_n = prompts["prompt_ids"].shape[0]
    groups = prompts_n * rl.oversample
    repeat = lambda x: jnp.repeat(jnp.tile(x, (rl.oversample,) + (1,) * (x.ndim - 1)), rl.group_size, axis=0)
    ids, pmask, uid = repeat(prompts["prompt_ids"]), repeat(prompts["prompt_mask"]), repeat(prompts["uid"])
    rollout = generate(policy, ids, pmask, gen_key, of.sampling)
    rows = rollout_rows(rollout.prompt_ids, rollout.prompt_mask, rollout.tokens, rollout.mask)
    scores, host_seconds = of.scores(frozen_params, uid, rollout, rows)
    group_ids = jnp.repeat(jnp.arange(groups), rl.group_size)
    metrics = {"reward/host_seconds": host_seconds}
    if rl.oversample > 1:
      (rollout, rows, uid), scores, kept = _select_groups((rollout, rows, uid), scores, group_ids, groups,
                                                          prompts_n, rl.group_size)
      group_ids, metrics["dynamic_sampling/signal_fraction"] = group_ids[:scores.shape[0]], kept
    metrics.update(losses.group_metrics(scores, group_ids, prompts_n))

    old, mask = no_grad(of.completion_logps, policy, rows)
    reference = of.fns.reference(frozen_params) if of.uses_reference else None
    ref = no_grad(of.completion_logps, reference, rows)[0] if reference is not None else old
    gap = jnp.abs(old - rollout.logprobs) * mask
    metrics.update({"rollout/logprob_mismatch_max": jnp.max(gap),
                    "rollout/logprob_mismatch_mean": jnp.sum(gap) / jnp.maximum(jnp.sum(mask), 1.0),
                    "completions/mean_length": jnp.mean(jnp.sum(mask, -1)),
                    "completions/clipped_ratio": 1.0 - jnp.mean(rollout.finished.astype(jnp.float32)),
                    "kl": jnp.sum((old - ref) * mask) / jnp.maximum(jnp.sum(mask), 1.0)})

    sampled = Sampled(rollout, rows, uid, scores, old, ref, mask, group_ids, prompts_n)
    units, unit_metrics = UNITS.get(of.spec.advantages, _pg_rollout_units)(of, state, frozen_params, sampled,
                                                                           greedy_key)
    metrics.update(unit_metrics)
    trainable, opt_state, update_metrics = _update(of, state, frozen_params, units, update_key)
    metrics.update(update_metrics)
    return TrainState(trainable, opt_state, state.step + 1, rng), metrics

  return step


def make_rl_eval(of: OnlineFns):
  """eval(state, prompts, frozen) -> mean greedy reward on held-out prompts (and length)."""

  def evaluate(state: TrainState, prompts: dict, frozen_params: dict):
    policy = of.policy(state.trainable, frozen_params)
    greedy = generate(policy, prompts["prompt_ids"], prompts["prompt_mask"], jax.random.PRNGKey(0),
                      dataclasses.replace(of.sampling, temperature=0.0))
    rows = rollout_rows(greedy.prompt_ids, greedy.prompt_mask, greedy.tokens, greedy.mask)
    scores, _ = of.scores(frozen_params, prompts["uid"], greedy, rows)
    return {"reward": jnp.mean(scores), "completions/mean_length": jnp.mean(jnp.sum(greedy.mask, -1)),
            "loss": -jnp.mean(scores)}

  return evaluate
