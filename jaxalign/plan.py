"""`python -m jaxalign.train --config R --plan`: a recipe's training step compiled for its mesh on fake CPU
devices, nothing allocated and no data or weights read, with XLA's per-device memory analysis.

Shapes come from the config (`data.*`, `optim.grad_accum`, `rl.*`), the architecture from `model.*` or
from `init_from`'s config.json alone. The state (trainable parameters, optimizer moments, frozen models)
is described by `jax.ShapeDtypeStruct`s carrying the shardings training gives them, so the compiled
step is the one a real run compiles. Users run it on a laptop before renting a pod.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import sharding
from jaxalign.algorithms import lora as lora_lib
from jaxalign.algorithms import online
from jaxalign.algorithms.step import TrainState, init_loss_state, make_optimizer, make_train_step
from jaxalign.algorithms.step import opt_state_shardings
from jaxalign.config import ConfigError, TrainConfig
from jaxalign.data.pipeline import Batches
from jaxalign.data.tokenize import Encoded
from jaxalign.models import CausalLM, ScalarModel, moe
from jaxalign.models.hf import config_from_hf
from jaxalign.trainer import (Run, batch_shardings, build_tokenizer, check_combination, frozen_dtype, objective_of,
                              online_fns, reference_in_state, stack_micro_batches, step_fns)

GIB = 2**30


def use_fake_devices(count: int) -> None:
  """Run on `count` CPU devices; must be called before JAX starts a backend."""
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", count)


def mesh_size(cfg: TrainConfig) -> int | None:
  """Devices the recipe's mesh names, or None when one axis is -1 (all remaining devices)."""
  sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  return None if -1 in sizes else math.prod(sizes)


def model_config(cfg: TrainConfig):
  """The architecture: init_from's config.json (no weights read) run as `model.*` says, else `model.*`."""
  if not cfg.init_from:
    return cfg.model
  file = pathlib.Path(cfg.init_from) / "config.json"
  if not file.exists():
    raise ConfigError(f"init_from={cfg.init_from}: no config.json to plan from")
  return config_from_hf(json.loads(file.read_text()), str(file)).with_execution_of(cfg.model)


def _dummy_examples(cfg: TrainConfig, count: int, responses: int):
  """`count` examples of the longest shape the data config admits (prompt + responses at their limits)."""
  data = cfg.data
  prompt = np.ones(data.max_prompt_length, np.int32)
  response = np.ones(data.max_length - data.max_prompt_length, np.int32)
  precomputed = cfg.reference.mode == "precomputed"
  return [Encoded(prompt, (response,) * responses, scores=(1.0,) * responses, answer="",
                  ref_logps=(0.0,) * responses if precomputed else (), uid=i) for i in range(count)]


def example_batch(cfg: TrainConfig, mesh=None, responses_per_list: int = 4) -> dict[str, np.ndarray]:
  """One step's host batch at the configured limits, built by the real pipeline from dummy examples (packed
  pair / list rows a multiple of `mesh`'s batch shards, as training builds them)."""
  responses = {"preference": 2, "ranked": responses_per_list}.get(cfg.data.format, 1)
  count = cfg.data.batch_size * cfg.optim.grad_accum  # full-length examples: one per (packed) row
  batches = Batches(_dummy_examples(cfg, count, responses), cfg.data, cfg.seed, shuffle=False)
  batches.prompts = cfg.algorithm in online.ALGORITHMS  # an online algorithm's data rows come with their prompts
  if mesh is not None:
    batches.pack_multiple = sharding.local_batch_shards(mesh, cfg.mesh.rules, cfg.data.batch_size)
  if cfg.algorithm in online.ALGORITHMS:
    return next(batches)
  return stack_micro_batches([next(batches) for _ in range(cfg.optim.grad_accum)])


def _shaped(tree, shardings):
  """ShapeDtypeStructs of `tree`'s shapes and dtypes in `shardings` (a tree of the same structure)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _frozen(tree, compute_dtype):
  """A frozen tree as `trainer.frozen_copy` holds it (floats narrowed to the compute dtype), abstractly."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, frozen_dtype(x, compute_dtype),
                                                     sharding=x.sharding), tree)


def _abstract_model(model_cls, mcfg, mesh, rules):
  """(graphdef, params as ShapeDtypeStructs in their rule-given shardings) of a model built from nothing."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_cls(mcfg, rngs=nnx.Rngs(0))))
  shardings = nnx.to_pure_dict(sharding.param_shardings(abstract, mesh, rules))
  return graphdef, _shaped(nnx.to_pure_dict(abstract), shardings)


def abstract_run(cfg: TrainConfig, mcfg, mesh):
  """The `trainer.Run` that `build_run(cfg)` makes, every array a ShapeDtypeStruct in its training sharding,
  and no weights or data read (tests/train/test_plan.py checks the two agree leaf by leaf)."""
  objective, rules = objective_of(cfg), cfg.mesh.rules
  check_combination(cfg, objective)
  graphdef, params = _abstract_model(ScalarModel if objective.scalar_head else CausalLM, mcfg, mesh, rules)
  shardings_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
  frozen = {}
  if cfg.lora.enabled:
    adapters = jax.eval_shape(lambda p: lora_lib.init_adapters(p, cfg.lora, jax.random.PRNGKey(0)), params)
    trainable = _shaped(adapters, lora_lib.adapter_shardings(shardings_of(params), cfg.lora))
    frozen["base"] = _frozen(params, mcfg.compute_dtype)
  else:
    trainable = params
    if objective.uses_reference and cfg.reference.mode == "model":
      frozen["reference"] = _frozen(params, mcfg.compute_dtype)
  reward_graphdef = critic_graphdef = None
  if cfg.algorithm in online.ALGORITHMS and cfg.rl.reward_model:
    reward_cfg = model_config(dataclasses.replace(cfg, init_from=cfg.rl.reward_model))
    reward_graphdef, reward_params = _abstract_model(ScalarModel, reward_cfg, mesh, rules)
    frozen["reward_model"] = _frozen(reward_params, mcfg.compute_dtype)
  if cfg.algorithm in online.ALGORITHMS and online.ALGORITHMS[cfg.algorithm].critic:
    if reward_graphdef is not None:
      critic_graphdef, value = reward_graphdef, reward_params
    else:
      critic_graphdef, head = _abstract_model(ScalarModel, mcfg, mesh, rules)
      value = {"model": params["model"], "score": head["score"]}
    trainable = {"policy": trainable, "value": value}
  tx = make_optimizer(cfg.optim, cfg.steps)
  opt_state = _shaped(jax.eval_shape(tx.init, trainable),
                      opt_state_shardings(tx, trainable, shardings_of(trainable), mesh))
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  loss_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            jax.eval_shape(lambda: init_loss_state(objective)))
  state = TrainState(trainable, opt_state, jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                     jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated), loss_state)
  fns = step_fns(cfg, graphdef, objective, tx)
  run = Run(cfg, mesh, build_tokenizer(cfg), mcfg, objective, fns, state, frozen, None, None, make_train_step(fns))
  if run.online:
    reference_in_state(run, copy=_frozen)
    run.train_fn = online.make_rl_step(online_fns(run, [], critic_graphdef, reward_graphdef))
  return run


@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-device bytes of one compiled training step (XLA's memory analysis) and the analytic floor."""

  arguments: int
  outputs: int
  aliased: int
  temp: int
  state_floor: int  # bytes of state + frozen models over all devices, divided by the device count
  devices: int
  compile_seconds: float

  @property
  def peak(self) -> int:
    """Arguments live with outputs that are not donated into them, plus temporaries."""
    return self.arguments + self.outputs - self.aliased + self.temp

  def table(self) -> str:
    rows = [("arguments", self.arguments), ("outputs (not aliased)", self.outputs - self.aliased),
            ("temp", self.temp), ("peak", self.peak), ("state floor (state bytes / devices)", self.state_floor)]
    return "\n".join(f"{name:<38} {value / GIB:10.3f} GiB" for name, value in rows)


def plan(cfg: TrainConfig) -> Plan:
  """Compile cfg's training step for its mesh on the current (fake) devices, from abstract inputs.

  cfg.model is the architecture (see `model_config`); cfg.init_from is not read.
  """
  mesh = sharding.make_mesh(cfg.mesh)
  run = abstract_run(cfg, cfg.model, mesh)
  leading = 0 if cfg.algorithm in online.ALGORITHMS else 1
  host_batch = example_batch(cfg, mesh)
  batch = _shaped(host_batch, batch_shardings(host_batch, mesh, cfg.mesh.rules, leading))
  state_shardings = jax.tree.map(lambda x: x.sharding, run.state)
  start = time.perf_counter()
  # On the host's XLA:CPU a grouped matmul would compile densely over every expert: plan its buffers as a GPU /
  # TPU kernel allocates them (`moe.projecting_memory`).
  with sharding.use_mesh(mesh, cfg.mesh.rules), moe.projecting_memory():
    step = jax.jit(run.train_fn, out_shardings=(state_shardings, None), donate_argnums=0)
    compiled = step.lower(run.state, batch, run.frozen).compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  devices = mesh.devices.size
  total = sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves((run.state, run.frozen)))
  return Plan(memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.alias_size_in_bytes,
              memory.temp_size_in_bytes, total // devices, devices, seconds)


def report(cfg: TrainConfig, result: Plan, model_cfg) -> str:
  """What `--plan` prints; the last line is machine-readable."""
  head = (f"plan: {cfg.name} ({cfg.algorithm}{'/' + cfg.loss.name if cfg.algorithm == 'preference' else ''}), "
          f"{model_cfg.num_params() / 1e9:.2f}B parameters, {result.devices} devices "
          f"(mesh data={cfg.mesh.data} fsdp={cfg.mesh.fsdp} tensor={cfg.mesh.tensor}), "
          f"param {model_cfg.param_dtype} / compute {model_cfg.dtype}, remat={model_cfg.remat}, "
          f"scan_layers={model_cfg.scan_layers}; compiled in {result.compile_seconds:.1f} s")
  return "\n".join([head, "per device:", result.table(), f"peak_gib_per_device={result.peak / GIB:.3f}"])
