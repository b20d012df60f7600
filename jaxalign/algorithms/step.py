"""The jitted train and eval steps shared by every offline objective, and the optimiser.

`step(state, batch, frozen) -> (state, metrics)`: `batch` carries a leading micro-batch axis [A, ...];
the step scans over it, summing gradients of loss shares whose denominators cover the whole step
(exact accumulation), clips, and applies AdamW. `frozen` holds what does not train: the base
weights under LoRA, and the reference policy's weights when it is a separate copy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxalign.algorithms import lora as lora_lib
from jaxalign.algorithms.objectives import Objective, combine_metrics, eval_metrics
from jaxalign.config import OptimConfig
from jaxalign.models import routing


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
  # Running means a loss keeps across steps ({argument: {"mean", "count"}}; `Objective.running`), else empty.
  loss_state: Any = {}


def init_loss_state(objective: Objective) -> dict:
  """Every running mean of `objective` at zero, before its first step."""
  return {arg: {"mean": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.int32)} for arg in objective.running}


def update_loss_state(objective: Objective, loss_state: dict, metrics: dict) -> dict:
  """The running means with this step's metrics counted (each step weighs the same)."""
  out = {}
  for arg, metric in objective.running.items():
    count = loss_state[arg]["count"] + 1
    mean = loss_state[arg]["mean"]
    out[arg] = {"mean": mean + (metrics[metric].astype(jnp.float32) - mean) / count, "count": count}
  return out


@dataclasses.dataclass(frozen=True)
class StepFns:
  """Static pieces the step closes over (the optax/levanter factory pattern)."""

  graphdef: Any
  objective: Objective
  tx: optax.GradientTransformation
  loss_params: dict
  lora: lora_lib.LoraConfig
  op: dict  # token_logprobs options (impl, temperature)
  # Mixture-of-experts policies: the coefficients of the load-balancing and router z-losses added to the loss
  # (`with_router_losses`).
  router_coefs: tuple[float, float] = (0.0, 0.0)

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

  def step_inputs(self, state, frozen_params, batch):
    """The loss's step-level inputs over the whole batch [A, ...]: its counts, its running means over the steps
    before, and the statistics that need a forward pass first (KTO's reference point), so that micro-batch
    losses sum exactly."""
    counts = {**self.objective.step_counts(batch), **{k: v["mean"] for k, v in state.loss_state.items()}}
    if self.objective.prepass is None:
      return counts
    policy, reference = self.policy(state.trainable, frozen_params), self.reference(frozen_params)
    return {**counts, **jax.lax.stop_gradient(self.objective.prepass(policy, reference, batch, **self.op))}

  def micro_loss(self, trainable, frozen_params, batch, counts, share: float = 1.0):
    """This micro-batch's (loss share, metrics), router losses included: `share` of them (1 / micro-batches)."""
    with routing.collecting() as collected:
      stats = self.stats(trainable, frozen_params, batch)
    loss, metrics = self.objective.loss(stats, counts, self.loss_params)
    return with_router_losses(loss, metrics, collected, self.router_coefs, share)


def with_router_losses(loss, metrics: dict, collected: list, coefs: tuple[float, float], share: float = 1.0):
  """(loss + share x (aux x balance + z x z-loss), metrics + the router's) over the router statistics a
  trained mixture of experts reported (`routing.collecting`); the loss as it is for a dense model. The router
  losses are per micro-batch, as in transformers and Megatron-LM (their balance term is a product of two means
  over tokens, not a sum over them): `share` (1 / micro-batches) makes the step's loss their mean over the
  micro-batches, as `combine_metrics` averages the router metrics (none of them is a share)."""
  aux, router_metrics = routing.aux_losses(collected, *coefs)
  return loss + share * aux, {**metrics, **router_metrics}


def make_train_step(fns: StepFns):
  """step(state, batch [A, ...], frozen) -> (state, metrics)."""

  def step(state: TrainState, batch: dict, frozen_params: dict):
    counts = fns.step_inputs(state, frozen_params, batch)
    grad_fn = jax.value_and_grad(fns.micro_loss, has_aux=True)

    def accumulate(grads, micro_batch):
      # Tie the weights to this micro-batch, so XLA cannot hoist their FSDP all-gathers out of the scan
      # (all layers' weights gathered at once: the whole model on every device).
      trainable, frozen, micro_batch = jax.lax.optimization_barrier((state.trainable, frozen_params, micro_batch))
      (loss, metrics), g = grad_fn(trainable, frozen, micro_batch, counts, share)
      return jax.tree.map(jnp.add, grads, g), {**metrics, "loss": loss}

    zeros = jax.tree.map(jnp.zeros_like, state.trainable)
    share = 1.0 / jax.tree.leaves(batch)[0].shape[0]
    grads, per_micro = jax.lax.scan(accumulate, zeros, batch)
    metrics = combine_metrics(per_micro)
    updates, opt_state = fns.tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    rng, _ = jax.random.split(state.rng)
    loss_state = update_loss_state(fns.objective, state.loss_state, metrics)
    return TrainState(trainable, opt_state, state.step + 1, rng, loss_state), metrics

  return step


def make_eval_step(fns: StepFns):
  """eval(state, batch [B, ...], frozen, counts=None) -> metrics. The loss is this batch's share of a loss over
  several batches whose step counts are `counts` (None: over this batch alone)."""

  def evaluate(state: TrainState, batch: dict, frozen_params: dict, counts: dict | None = None):
    stacked = jax.tree.map(lambda x: x[None], batch)
    with routing.collecting() as collected:
      stats = fns.stats(state.trainable, frozen_params, batch)
    inputs = {**fns.step_inputs(state, frozen_params, stacked), **(counts or {})}
    loss, metrics = fns.objective.loss(stats, inputs, fns.loss_params)
    router_metrics = routing.aux_losses(collected, *fns.router_coefs)[1]
    return {**metrics, **router_metrics, **eval_metrics(stats, inputs), "loss": loss}

  return evaluate
