"""The jitted train and eval steps shared by every offline objective, and the optimiser.

`step(state, batch, frozen) -> (state, metrics)`: `batch` carries a leading micro-batch axis [A, ...];
the step scans over it, summing gradients of loss shares whose denominators cover the whole step
(exact accumulation), clips, and applies AdamW. `frozen` holds what does not train: the base
weights under LoRA, and the reference policy's weights when it is a separate copy.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxalign.algorithms import lora as lora_lib
from jaxalign.algorithms.objectives import Objective, eval_metrics


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with warm-up and decay, global-norm clipping and gradient accumulation."""

  lr: float = 1e-4
  # constant | linear | cosine (decay to lr * min_lr_ratio after warm-up)
  schedule: str = "cosine"
  warmup_steps: int = 0
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  # Global-norm gradient clipping; 0 disables it.
  max_grad_norm: float = 1.0
  # Micro-batches per optimiser step.
  grad_accum: int = 1
  # dtype of Adam's first moment: None = the parameters' dtype, or "bfloat16" / "float32". The second
  # moment always follows the parameter dtype, so TRL's bf16 precision is model.param_dtype=bfloat16
  # optim.mu_dtype=bfloat16, and float32 master weights and moments are the default with param_dtype float32.
  mu_dtype: str | None = None
  # An update whose gradient is not finite is skipped (the weights stay as they were) and counted; this many
  # skipped in a row stop the run with an error (0: never stop).
  max_consecutive_skips: int = 5

  def __post_init__(self):
    if not (math.isfinite(self.lr) and self.lr > 0):
      raise ValueError(f"optim.lr={self.lr} must be a finite number > 0")
    if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1 and self.eps > 0):
      raise ValueError("optim.b1 and optim.b2 must be in [0, 1) and optim.eps > 0")
    if not (self.warmup_steps >= 0 and 0 <= self.min_lr_ratio <= 1 and self.weight_decay >= 0
            and self.max_grad_norm >= 0 and self.max_consecutive_skips >= 0):
      raise ValueError("optim.warmup_steps, weight_decay, max_grad_norm and max_consecutive_skips must be >= 0, "
                       "optim.min_lr_ratio in [0, 1]")
    if self.schedule not in ("constant", "linear", "cosine"):
      raise ValueError(f"optim.schedule={self.schedule!r}; choose constant, linear or cosine")
    if self.grad_accum < 1:
      raise ValueError("optim.grad_accum must be >= 1")
    if self.mu_dtype not in (None, "bfloat16", "float32"):
      raise ValueError(f"optim.mu_dtype={self.mu_dtype!r}; choose bfloat16, float32 or null (the parameters' dtype)")


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Learning rate by update count: linear warm-up, then constant / linear / cosine decay to lr * min_lr_ratio."""
  decay_steps = max(total_steps - cfg.warmup_steps, 1)
  end = cfg.lr * cfg.min_lr_ratio
  decay = {"constant": optax.constant_schedule(cfg.lr),
           "linear": optax.linear_schedule(cfg.lr, end, decay_steps),
           "cosine": optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)}[cfg.schedule]
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), decay],
                              [cfg.warmup_steps]) if cfg.warmup_steps else decay


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  schedule = make_schedule(cfg, total_steps)
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      mu_dtype=cfg.mu_dtype)
  tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw) if cfg.max_grad_norm else adamw
  # A non-finite gradient leaves the parameters as they were and is counted (`skipped_updates`); the loop
  # stops after optim.max_consecutive_skips in a row, so no NaN ever reaches a checkpoint.
  return optax.apply_if_finite(tx, max_consecutive_errors=2**30)


def skipped_updates(opt_state) -> tuple[jax.Array, jax.Array]:
  """(updates skipped in a row, skipped in total) for non-finite gradients, from `make_optimizer`'s state."""
  return opt_state.notfinite_count, opt_state.total_notfinite


def opt_state_shardings(tx: optax.GradientTransformation, abstract_trainable, trainable_shardings,
                        mesh: jax.sharding.Mesh):
  """The sharding pytree of `tx.init(trainable)`: each moment in its parameter's sharding, everything else
  (step counts, apply_if_finite's flags) replicated.

  `abstract_trainable` may be concrete arrays or `jax.ShapeDtypeStruct`s; `trainable_shardings` has the
  trainable's structure with a `jax.sharding.Sharding` per leaf.
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  abstract_state = jax.eval_shape(tx.init, abstract_trainable)
  return optax.tree_map_params(tx, lambda _, s: s, abstract_state, trainable_shardings,
                               transform_non_params=lambda _: replicated)


def init_opt_state(tx: optax.GradientTransformation, trainable, trainable_shardings, mesh: jax.sharding.Mesh):
  """`tx.init(trainable)` created directly in `opt_state_shardings` (a plain `jax.jit(tx.init)` would
  replicate every moment on every device)."""
  shardings = opt_state_shardings(tx, trainable, trainable_shardings, mesh)
  return jax.jit(tx.init, out_shardings=shardings)(trainable)


class TrainState(NamedTuple):
  """Everything a checkpoint must hold to continue a run exactly."""

  trainable: Any  # model parameters, or LoRA adapters
  opt_state: Any
  step: jax.Array
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepFns:
  """Static pieces the step closes over (the optax/levanter factory pattern)."""

  graphdef: Any
  objective: Objective
  tx: optax.GradientTransformation
  loss_params: dict
  lora: lora_lib.LoraConfig
  op: dict  # token_logprobs options (impl, temperature)

  def policy(self, trainable, frozen_params):
    params = lora_lib.merge(frozen_params["base"], trainable, self.lora) if self.lora.enabled else trainable
    return nnx.merge(self.graphdef, params)

  def reference(self, frozen_params):
    if not self.objective.uses_reference:
      return None
    ref = frozen_params.get("reference", frozen_params.get("base"))
    return None if ref is None else nnx.merge(self.graphdef, ref)

  def stats(self, trainable, frozen_params, batch):
    policy, reference = self.policy(trainable, frozen_params), self.reference(frozen_params)
    return self.objective.stats(policy, reference, batch, **self.op)

  def micro_loss(self, trainable, frozen_params, batch, counts):
    return self.objective.loss(self.stats(trainable, frozen_params, batch), counts, self.loss_params)


def make_train_step(fns: StepFns):
  """step(state, batch [A, ...], frozen) -> (state, metrics)."""

  def step(state: TrainState, batch: dict, frozen_params: dict):
    counts = fns.objective.step_counts(batch)
    grad_fn = jax.value_and_grad(fns.micro_loss, has_aux=True)

    def accumulate(grads, micro_batch):
      # Tie the weights to this micro-batch, so XLA cannot hoist their FSDP all-gathers out of the scan
      # (all layers' weights gathered at once: the whole model on every device).
      trainable, frozen, micro_batch = jax.lax.optimization_barrier((state.trainable, frozen_params, micro_batch))
      (loss, metrics), g = grad_fn(trainable, frozen, micro_batch, counts)
      return jax.tree.map(jnp.add, grads, g), {**metrics, "loss": loss}

    zeros = jax.tree.map(jnp.zeros_like, state.trainable)
    grads, per_micro = jax.lax.scan(accumulate, zeros, batch)
    metrics = {k: jnp.mean(v, axis=0) for k, v in per_micro.items()}
    metrics["loss"] = jnp.sum(per_micro["loss"])  # shares sum to the step loss
    updates, opt_state = fns.tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    rng, _ = jax.random.split(state.rng)
    return TrainState(trainable, opt_state, state.step + 1, rng), metrics

  return step


def make_eval_step(fns: StepFns):
  """eval(state, batch [B, ...], frozen) -> metrics (loss over this batch alone)."""

  def evaluate(state: TrainState, batch: dict, frozen_params: dict):
    stacked = jax.tree.map(lambda x: x[None], batch)
    stats = fns.stats(state.trainable, frozen_params, batch)
    loss, metrics = fns.objective.loss(stats, fns.objective.step_counts(stacked), fns.loss_params)
    return {**metrics, **eval_metrics(stats), "loss": loss}

  return evaluate
