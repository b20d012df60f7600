"""Builds a run from a TrainConfig and runs the loop: data -> step -> log -> eval -> checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import math
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import behaviour, losses, resume, sharding
from jaxalign.algorithms import lora as lora_lib
from jaxalign.algorithms import online
from jaxalign.algorithms.forward import example_logps
from jaxalign.algorithms.objectives import OFFLINE_ALGORITHMS, Objective, combine_metrics, objective_for
from jaxalign.algorithms.step import (StepFns, TrainState, init_loss_state, init_opt_state, make_eval_step,
                                      make_optimizer, make_schedule, make_train_step, skipped_updates)
from jaxalign.checkpoint import Checkpointer, CheckpointError
from jaxalign.config import ConfigError, TrainConfig, coerce, to_dict
from jaxalign.data import batching, synthetic
from jaxalign.data.pipeline import Batches, build_datasets
from jaxalign.data.tokenize import check_same_tokenizer, check_vocab
from jaxalign.logging import MetricsLogger
from jaxalign.models import CausalLM, ScalarModel, load_hf, load_tokenizer, save_hf
from jaxalign.rollout.rewards import RuleRewards, uses_verifiers
from jaxalign.run_lock import RunLock
from jaxalign.verifiers import VerifierPool, registry

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
  """A run that cannot go on (NaN loss, ...); the last good checkpoint is kept."""


def build_tokenizer(cfg: TrainConfig):
  source = cfg.tokenizer or cfg.init_from
  if source in (None, "builtin:digits"):
    return synthetic.digits_tokenizer()
  path = pathlib.Path(source)
  if path.suffix != ".json":
    return load_tokenizer(path)
  if not path.exists():
    raise ConfigError(f"tokenizer {path} does not exist")
  from transformers import PreTrainedTokenizerFast
  special = [t["content"] for t in json.loads(path.read_text())["added_tokens"] if t.get("special")]
  if len(special) != 1:
    raise ConfigError(f"tokenizer {path}: a bare tokenizer.json must have exactly one special token (its "
                      f"end-of-text), found {special}; use an HF directory with tokenizer_config.json")
  return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=special[0], pad_token=special[0])


def build_params(cfg: TrainConfig, objective: Objective, mesh):
  """(graphdef, params as a pure dict, their shardings, model config) for the policy being trained."""
  model_cls = ScalarModel if objective.scalar_head else CausalLM
  if cfg.init_from:
    loaded, mcfg = load_hf(cfg.init_from, dtype=cfg.model.param_dtype, mesh=mesh, rules=cfg.mesh.rules,
                           scan_layers=cfg.model.scan_layers)
    mcfg = mcfg.with_execution_of(cfg.model)
    params = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
    if model_cls is ScalarModel and isinstance(loaded, CausalLM):  # reward model from an LM: fresh score head
      head = sharding.create_sharded(lambda: ScalarModel(mcfg, rngs=nnx.Rngs(cfg.seed)), mesh, cfg.mesh.rules)
      params = {"model": params["model"], "score": nnx.to_pure_dict(nnx.state(head, nnx.Param))["score"]}
  else:
    mcfg = cfg.model
    model = sharding.create_sharded(lambda: model_cls(mcfg, rngs=nnx.Rngs(cfg.seed)), mesh, cfg.mesh.rules)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_cls(mcfg, rngs=nnx.Rngs(0))))
  shardings = nnx.to_pure_dict(sharding.param_shardings(abstract, mesh, cfg.mesh.rules))
  return graphdef, params, shardings, mcfg


def frozen_copy(params, dtype, *, copy: bool = True):
  """Frozen weights (a reference copy, the LoRA base, a reward model) held as `frozen_dtype` says, each
  in its own sharding. Returned as they are when nothing needs a cast and `copy` is false (for a tree
  nothing else holds, such as the LoRA base: a copy would only double its memory).
  """
  if not copy and all(frozen_dtype(x, dtype) == x.dtype for x in jax.tree.leaves(params)):
    return params

  def cast(x):  # jnp.copy, not a no-op astype: jit would forward the input, a buffer the step may donate
    target = frozen_dtype(x, dtype)
    return x.astype(target) if target != x.dtype else jnp.copy(x)

  return jax.jit(lambda tree: jax.tree.map(cast, tree), out_shardings=jax.tree.map(lambda x: x.sharding, params))(params)


def frozen_dtype(x, compute_dtype) -> jnp.dtype:
  """The dtype a frozen weight `x` is held in: float matrices narrowed to the compute dtype (the model casts
  them to it anyway, so results do not change), never widened. Vectors (norm scales, biases) keep their
  dtype: they cost nothing, and Gemma's (1 + w) norm reads its scale in float32."""
  dtype, compute_dtype = jnp.dtype(x.dtype), jnp.dtype(compute_dtype)
  narrow = jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize > compute_dtype.itemsize and len(x.shape) > 1
  return compute_dtype if narrow else dtype


def stack_micro_batches(batches: list[dict]) -> dict:
  """[A, ...] arrays from A micro-batches, padding the token axis to their longest (and packed pair / list
  micro-batches to the same number of rows)."""
  batches = batching.equal_prompt_layouts(batching.equal_packed_rows(batches))
  length = max(b["input_ids"].shape[-1] for b in batches)

  def pad(key, x):
    if not key.endswith(("input_ids", "loss_mask", "segment_ids")):
      return x
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, length - x.shape[-1])])

  return {k: np.stack([pad(k, b[k]) for b in batches]) for k in batches[0]}


def batch_shardings(batch: dict, mesh, rules, leading: int) -> dict:
  """Each batch array's sharding: its example axis (after `leading` axes) over the batch mesh axes."""
  def spec(x):
    names = (None,) * leading + ("batch",) + (None,) * (x.ndim - leading - 1)
    return jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(names, x.shape, mesh, rules))
  return {k: spec(v) for k, v in batch.items()}


def put_batch(batch: dict, mesh, rules, leading: int, batch_size: int | None = None) -> dict:
  """A batch on the mesh in its `batch_shardings`. In a multi-process job `batch` holds only this process's
  rows (`sharding.process_rows`) of a global batch of `batch_size` examples; packed pair / list rows are
  split over the processes in equal blocks."""
  def global_shape(key, x):
    if batch_size is None:
      return x.shape
    size = batch_size
    if "pack_row" in batch and key in batching.ROW_KEYS:
      size = x.shape[leading] * batch_size // batch["pack_row"].shape[leading]
    return x.shape[:leading] + (size,) + x.shape[leading + 1:]

  shapes = {k: jax.ShapeDtypeStruct(global_shape(k, v), v.dtype) for k, v in batch.items()}
  shardings = batch_shardings(shapes, mesh, rules, leading)
  return {k: sharding.global_array(v, shardings[k], shapes[k].shape) for k, v in batch.items()}


def precompute_reference(run: "Run", data: Batches) -> None:
  """Cache each response's reference log-prob with the data (reference.mode=precomputed)."""
  if run.objective.data_format == "unpaired":
    raise ConfigError("reference.mode=precomputed does not apply to unpaired (KTO) data: its mismatched pairs "
                      "depend on the batch; use reference.mode=model")
  model = nnx.merge(run.fns.graphdef, run.frozen.get("reference", run.frozen.get("base", run.state.trainable)))
  ld_alpha = run.cfg.loss.ld_alpha
  forward = nnx.jit(lambda m, b: example_logps(m, b, impl=run.cfg.logprob_impl, ld_alpha=ld_alpha)[0])
  size, examples = data.cfg.batch_size, data.examples
  cached = []
  for start in range(0, len(examples), size):
    chunk = examples[start:start + size]
    padded = chunk + [chunk[-1]] * (size - len(chunk))
    batch = batching.collate_multi(padded, data.cfg.bucket_lengths, data.rows)
    values = sharding.to_host(forward(model, put_batch(batch, run.mesh, run.cfg.mesh.rules, 0, size)))
    cached.extend(values.reshape(size, -1)[:len(chunk)])
  data.examples = [dataclasses.replace(e, ref_logps=tuple(map(float, v))) for e, v in zip(examples, cached)]


@dataclasses.dataclass
class Run:
  cfg: TrainConfig
  mesh: jax.sharding.Mesh
  tokenizer: object
  model_config: object
  objective: Objective
  fns: StepFns
  state: TrainState
  frozen: dict
  train_data: Batches
  eval_data: Batches
  # Unjitted step(state, batch, frozen) and eval(state, batch, frozen); offline by default.
  train_fn: object = None
  eval_fn: object = None
  # Online runs with verifier rewards: the worker processes the train and eval rewards share (`verifier_pool`;
  # workers start at the first reward call, the training loop closes it).
  verifier_pool: VerifierPool | None = None
  # eval_reward: the held-out prompts whose greedy completions every eval scores (`behaviour`).
  behaviour: object = None

  @property
  def online(self) -> bool:
    return self.cfg.algorithm in online.ALGORITHMS

  def policy_params(self):
    """The policy's trainable parameters (an online algorithm with a critic trains both)."""
    trainable = self.state.trainable
    return online.ALGORITHMS[self.cfg.algorithm].policy_params(trainable) if self.online else trainable

  def next_batch(self) -> dict:
    """The next training batch on the mesh: prompts (online) or [A, ...] stacked micro-batches."""
    size = self.cfg.data.batch_size
    if self.online:
      return put_batch(next(self.train_data), self.mesh, self.cfg.mesh.rules, 0, size)
    micro = stack_micro_batches([next(self.train_data) for _ in range(self.cfg.optim.grad_accum)])
    return put_batch(micro, self.mesh, self.cfg.mesh.rules, 1, size)


def algorithm_names() -> tuple[str, ...]:
  """Every algorithm a config may name (online ones as registered now: a notebook may add one)."""
  return (*OFFLINE_ALGORITHMS, *online.ALGORITHMS)


def objective_of(cfg: TrainConfig) -> Objective:
  """The Objective that `cfg.algorithm` (offline or online) trains."""
  if cfg.algorithm not in algorithm_names():
    raise ConfigError(f"algorithm={cfg.algorithm!r}; choose one of {', '.join(algorithm_names())}")
  if cfg.algorithm in online.ALGORITHMS:
    algorithm = online.ALGORITHMS[cfg.algorithm]
    uses_reference = algorithm.uses_reference(cfg.rl, loss_params(algorithm.loss, cfg.loss.params))
    return Objective(algorithm.loss, algorithm.data_format, False, uses_reference, stats=None, step_counts=None)
  try:
    params = loss_params(cfg.loss.name, cfg.loss.params)
    return objective_for(cfg.algorithm, cfg.loss.name, params, cfg.loss.ld_alpha, cfg.loss.wpo)
  except KeyError as error:  # an unknown loss name
    raise ConfigError(f"loss.name: {error.args[0]}") from None
  except ValueError as error:
    raise ConfigError(str(error)) from None


def step_fns(cfg: TrainConfig, graphdef, objective: Objective, tx) -> StepFns:
  """The static pieces of the run's step (`StepFns`) as the config says."""
  return StepFns(graphdef, objective, tx, loss_params(objective.loss_name, cfg.loss.params), cfg.lora,
                 {"impl": cfg.logprob_impl}, (cfg.loss.router_aux_coef, cfg.loss.router_z_coef))


def loss_params(loss_name: str, params: dict) -> dict:
  """`loss.params` checked against the loss's signature and converted to its types (YAML reads 1e-4 as a
  string); one line naming a key the loss does not take (and those it does), or an ill-typed value."""
  accepted = losses.hyperparameters(loss_name)
  out = {}
  for key, value in params.items():
    if key not in accepted:
      close = difflib.get_close_matches(key, accepted, n=1)
      hint = f" (did you mean '{close[0]}'?)" if close else ""
      raise ConfigError(f"loss.params.{key}: loss '{loss_name}' has no parameter '{key}'{hint}; it takes "
                        f"{', '.join(accepted) or 'none'}")
    out[key] = coerce(value, accepted[key], f"loss.params.{key}")
  return out


def check_combination(cfg: TrainConfig, objective: Objective) -> None:
  """Config keys that are valid alone but not together (checked by `build_run` and by `--plan`)."""
  online_run = cfg.algorithm in online.ALGORITHMS
  loss_params(objective.loss_name, cfg.loss.params)
  if objective.data_format != cfg.data.format:
    raise ConfigError(f"loss '{cfg.loss.name}' ({cfg.algorithm}) trains on data.format={objective.data_format}, "
                      f"but data.format={cfg.data.format}")
  if online_run:
    try:
      online.ALGORITHMS[cfg.algorithm].check(cfg.rl, loss_params(objective.loss_name, cfg.loss.params),
                                             cfg.data.batch_size)
    except ValueError as error:
      raise ConfigError(f"algorithm={cfg.algorithm}: {error}") from None
    if cfg.data.packing:
      raise ConfigError(f"algorithm={cfg.algorithm}: data.packing applies to offline algorithms; online ones take "
                        "each prompt's rows padded")
  if online_run and online.ALGORITHMS[cfg.algorithm].critic and cfg.lora.enabled:
    raise ConfigError(f"algorithm={cfg.algorithm} trains a critic beside the policy; lora is not supported with it")
  if cfg.optim.grad_accum != 1 and not losses.spec(objective.loss_name).exact_accumulation:
    raise ConfigError(f"loss '{objective.loss_name}' is not a sum over micro-batches (it reads the whole batch); "
                      f"optim.grad_accum={cfg.optim.grad_accum} must be 1 with it")
  if online_run and cfg.loss.ld_alpha is not None:
    raise ConfigError(f"loss.ld_alpha (LD-DPO) applies to offline pairwise losses, not algorithm={cfg.algorithm}")
  if online_run and cfg.loss.wpo:
    raise ConfigError(f"loss.wpo (WPO) applies to offline pairwise losses, not algorithm={cfg.algorithm}")
  if online_run and cfg.optim.grad_accum != 1:
    raise ConfigError("optim.grad_accum applies to offline algorithms; online ones use rl.minibatches")
  if cfg.model.attention_impl == "cudnn" and (cfg.data.packing or online_run):
    raise ConfigError("model.attention_impl=cudnn masks padding as per-row lengths (one right-padded document "
                      "per row): it cannot serve data.packing or an online algorithm's left-padded rollouts")


def _scalar_model(path: str, cfg: TrainConfig, mesh, tokenizer, policy_vocab: int):
  """(graphdef computing in model.dtype, params in model.param_dtype) of a reward model directory
  (*ForSequenceClassification) that reads the policy's token ids."""
  model, mcfg = load_hf(path, dtype=cfg.model.param_dtype, mesh=mesh, rules=cfg.mesh.rules,
                        scan_layers=cfg.model.scan_layers)
  if not isinstance(model, ScalarModel):
    raise ConfigError(f"rl.reward_model={path} is not a reward model (*ForSequenceClassification)")
  check_reader_tokenizer(path, tokenizer, mcfg.vocab_size, policy_vocab, "rl.reward_model")
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: ScalarModel(mcfg.with_execution_of(cfg.model), rngs=nnx.Rngs(0))))
  return graphdef, nnx.to_pure_dict(nnx.state(model))


def check_reader_tokenizer(path: str, tokenizer, vocab_size: int, policy_vocab: int, key: str) -> None:
  """A second model that reads the policy's tokens (a reward model) must share its tokenizer: compared token
  by token when `path` holds one, else by vocabulary size."""
  if any((pathlib.Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
    check_same_tokenizer(tokenizer, load_tokenizer(path), f"{key}={path}")
  elif vocab_size != policy_vocab:
    raise ConfigError(f"{key}={path}: its vocab_size is {vocab_size}, the policy's is {policy_vocab}: it would read "
                      "other tokens; use a model trained with the policy's tokenizer")


def _attach_online(run: Run) -> None:
  """Online algorithms: rewards (rules over each split's gold answers, a reward model), a critic for the
  algorithms that train one, and the RL step / eval."""
  cfg = run.cfg
  algorithm = online.ALGORITHMS[cfg.algorithm]
  reward_graphdef = critic_graphdef = reward_params = None
  if cfg.rl.reward_model:
    reward_graphdef, reward_params = _scalar_model(cfg.rl.reward_model, cfg, run.mesh, run.tokenizer,
                                                   run.model_config.vocab_size)
    # A copy only when a critic trains from the originals (the step donates the trainable).
    run.frozen["reward_model"] = frozen_copy(reward_params, run.model_config.compute_dtype, copy=algorithm.critic)
  if algorithm.critic:
    if reward_graphdef is not None:  # critic initialised from the reward model (its param_dtype weights)
      critic_graphdef, value = reward_graphdef, reward_params
    else:  # from the policy's backbone with a zero value head (created in its sharding; nothing else is built)
      critic_graphdef, abstract = nnx.split(nnx.eval_shape(lambda: ScalarModel(run.model_config, rngs=nnx.Rngs(0))))
      head = nnx.to_pure_dict(abstract)["score"]
      head_shardings = nnx.to_pure_dict(sharding.param_shardings(abstract, run.mesh, cfg.mesh.rules))["score"]
      score = jax.tree.map(lambda x, s: jnp.zeros(x.shape, x.dtype, device=s), head, head_shardings)
      value = {"model": jax.tree.map(jnp.copy, run.state.trainable["model"]), "score": score}
    trainable = {"policy": run.state.trainable, "value": value}
    shardings = jax.tree.map(lambda x: x.sharding, trainable)
    with sharding.use_mesh(run.mesh, cfg.mesh.rules):
      run.state = run.state._replace(trainable=trainable,
                                     opt_state=init_opt_state(run.fns.tx, trainable, shardings, run.mesh))

  try:
    algorithm.check_data(cfg.rl, run.train_data.examples)
  except ValueError as error:
    raise ConfigError(f"algorithm={cfg.algorithm}: {error}") from None
  run.train_data.prompts = run.eval_data.prompts = True  # data rows (sft / preference formats) beside prompts
  reference_in_state(run)
  run.train_fn = online.make_rl_step(online_fns(run, run.train_data.examples, critic_graphdef, reward_graphdef))
  run.eval_fn = online.make_rl_eval(online_fns(run, run.eval_data.examples, critic_graphdef, reward_graphdef))


def reference_in_state(run: Run, copy=frozen_copy) -> None:
  """rl.reference_update_steps > 0: the reference is the policy of the last iteration boundary (SPIN's pi_t),
  replaced by the step (`online.step.next_reference`), so it moves from `run.frozen` into the train state
  (`loss_state["reference"]`): checkpointed with the policy, a resume from any step uses the reference the
  uninterrupted run had. Held as the frozen reference is (`copy`: `frozen_copy`, each leaf in its parameter's
  sharding, floats narrowed to the compute dtype); under LoRA it is a copy of the adapters (the base is shared)."""
  if not run.cfg.rl.reference_update_steps:
    return
  reference = run.frozen.pop("reference", None)
  if reference is None:
    reference = copy(run.policy_params(), run.model_config.compute_dtype)
  run.state = run.state._replace(loss_state={**run.state.loss_state, "reference": reference})


def verifier_pool(run: Run) -> VerifierPool | None:
  """The run's one `VerifierPool` (rl.verifier_workers x rl.verifier_timeout_s), made at the first call, when
  rl.rewards names a verifier reward; None otherwise."""
  rl = run.cfg.rl
  if run.verifier_pool is None and uses_verifiers(rl.rewards):
    run.verifier_pool = VerifierPool(rl.verifier_workers, rl.verifier_timeout_s, preload=registry.PRELOAD)
  return run.verifier_pool


def online_fns(run: Run, examples, critic_graphdef, reward_graphdef) -> online.OnlineFns:
  """The online step's static pieces; rule rewards look up the gold answers of `examples`."""
  reward = RuleRewards(run.tokenizer, {e.uid: e.answer for e in examples}, run.cfg.rl.rewards, verifier_pool(run))
  reference = run.state.loss_state.get("reference")
  shardings = None if reference is None else jax.tree.map(lambda x: x.sharding, reference)
  return online.OnlineFns(run.fns, online.ALGORITHMS[run.cfg.algorithm], run.cfg.rl,
                          online.sampling_config(run.cfg.rl, run.tokenizer), reward, run.objective.uses_reference,
                          critic_graphdef, reward_graphdef, reference_shardings=shardings)


def build_run(cfg: TrainConfig) -> Run:
  sharding.initialize_distributed(cfg.mesh)
  mesh = sharding.make_mesh(cfg.mesh)
  objective = objective_of(cfg)
  check_combination(cfg, objective)
  tokenizer = build_tokenizer(cfg)
  graphdef, params, param_shardings, mcfg = build_params(cfg, objective, mesh)
  check_vocab(tokenizer, mcfg.vocab_size, f"tokenizer {cfg.tokenizer or cfg.init_from or 'builtin:digits'}")
  train_data, eval_data = build_datasets(cfg.data, tokenizer, cfg.seed)[:2]
  train_data.rows = eval_data.rows = sharding.process_rows(mesh, cfg.mesh.rules, cfg.data.batch_size)
  train_data.pack_multiple = eval_data.pack_multiple = sharding.local_batch_shards(mesh, cfg.mesh.rules,
                                                                                  cfg.data.batch_size)

  key = jax.random.PRNGKey(cfg.seed)
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  frozen = {}
  if cfg.lora.enabled:  # float32 master weights only for what trains: the base is held in the compute dtype
    trainable_shardings = lora_lib.adapter_shardings(param_shardings, cfg.lora)
    adapters = lora_lib.init_adapters(params, cfg.lora, jax.random.fold_in(key, 1))
    trainable = jax.device_put(adapters, trainable_shardings)
    frozen["base"] = frozen_copy(params, mcfg.compute_dtype, copy=False)
  else:
    trainable, trainable_shardings = params, param_shardings
    if objective.uses_reference and cfg.reference.mode == "model":
      frozen["reference"] = frozen_copy(params, mcfg.compute_dtype)
  del params  # under LoRA a float32 base is freed once cast
  tx = make_optimizer(cfg.optim, cfg.steps)
  with sharding.use_mesh(mesh, cfg.mesh.rules):
    opt_state = init_opt_state(tx, trainable, trainable_shardings, mesh)
  state = TrainState(trainable, opt_state, jax.device_put(jnp.zeros((), jnp.int32), replicated),
                     jax.device_put(key, replicated), jax.device_put(init_loss_state(objective), replicated))
  fns = step_fns(cfg, graphdef, objective, tx)
  run = Run(cfg, mesh, tokenizer, mcfg, objective, fns, state, frozen, train_data, eval_data,
            make_train_step(fns), make_eval_step(fns))
  if not objective.scalar_head:
    run.behaviour = behaviour.held_out(cfg)
  if run.online:
    _attach_online(run)
  elif objective.uses_reference and cfg.reference.mode == "precomputed":
    for data in (train_data, eval_data):
      precompute_reference(run, data)
  return run


def evaluate(run: Run, eval_fn) -> dict[str, float]:
  """Metrics over the eval batches as if they were one batch: offline losses take the step counts of them all, so
  that their per-batch shares (the loss, its parts, token-normalised numerators) add up to the whole set's, as in
  gradient accumulation (`combine_metrics`); per-example means over the equal batches are averaged."""
  size = run.cfg.data.batch_size
  with sharding.use_mesh(run.mesh, run.cfg.mesh.rules):
    batches = [put_batch(b, run.mesh, run.cfg.mesh.rules, 0, size)
               for b in run.eval_data.epoch_batches()[:run.cfg.eval_batches]]
    counts = () if run.online else (eval_counts(run.objective, batches),)
    rows_ = [jax.tree.map(sharding.to_host, eval_fn(run.state, b, run.frozen, *counts)) for b in batches]
    if counts:
      out = {k: float(v) for k, v in combine_metrics({k: np.stack([r[k] for r in rows_]) for k in rows_[0]}).items()}
    else:
      out = {k: float(np.mean([r[k] for r in rows_])) for k in rows_[0]}
    if run.behaviour is not None:
      out.update(behaviour.score(run.behaviour, run.fns.policy(run.policy_params(), run.frozen), run.tokenizer,
                                 run.cfg.data.batch_size))
  return out


def eval_counts(objective: Objective, batches: list[dict]) -> dict:
  """The step counts of all eval batches together (global arrays: every process's rows), summed: counts add up
  and batches may differ in length."""
  count = jax.jit(lambda b: objective.step_counts(jax.tree.map(lambda x: x[None], b)))
  return jax.jit(lambda per_batch: jax.tree.map(lambda *c: sum(c), *per_batch))([count(b) for b in batches])


def export(run: Run, path: pathlib.Path) -> pathlib.Path:
  params = run.policy_params()
  if run.cfg.lora.enabled:  # merged in the master dtype (the base is held in the compute dtype)
    params = lora_lib.merge(run.frozen["base"], params, run.cfg.lora, dtype=run.model_config.weight_dtype)
  return save_hf(nnx.merge(run.fns.graphdef, params), run.model_config, path, tokenizer=run.tokenizer)


def train(cfg: TrainConfig) -> dict:
  """Run one stage to cfg.steps; returns {"eval_before", "eval_after", "export"}.

  The run directory is locked for the run (process 0 holds the lock), cleared first only when
  `checkpoint.overwrite` asks, and resumed from its newest readable checkpoint when the config allows.
  """
  sharding.initialize_distributed(cfg.mesh)
  run_dir = pathlib.Path(cfg.run_dir)
  primary = jax.process_index() == 0
  with contextlib.ExitStack() as held:
    failure = None
    if primary:  # process 0 holds the lock and clears the run_dir; the others learn whether it could
      try:
        held.enter_context(RunLock(run_dir))
        resume.prepare_run_dir(cfg)
      except Exception as error:
        failure = error
    sharding.raise_together(failure, f"locking {run_dir}")
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep, every=cfg.checkpoint.every,
                        clean=primary)
    try:
      if cfg.checkpoint.resume and ckpt.latest_step() is not None:  # refuse before building anything
        resume.check_resumable(cfg, ckpt.metadata()["config"], ckpt.directory)
      run = build_run(cfg)
      result = _train_loop(run, ckpt, primary)
    finally:
      ckpt.close()
    result["export"] = str(export(run, run_dir / "hf")) if cfg.checkpoint.export_hf else None
  return result


def _train_loop(run: Run, ckpt: Checkpointer, primary: bool) -> dict:
  cfg = run.cfg
  state_shardings = jax.tree.map(lambda x: x.sharding, run.state)
  replicated = jax.sharding.NamedSharding(run.mesh, jax.P())

  def counted_step(state, batch, frozen):
    state, metrics = run.train_fn(state, batch, frozen)
    in_row, total = skipped_updates(state.opt_state)
    return state, {**metrics, "skipped_in_row": in_row, "skipped_updates": total}

  with sharding.use_mesh(run.mesh, cfg.mesh.rules):
    train_step = jax.jit(counted_step, out_shardings=(state_shardings, replicated), donate_argnums=0)
    eval_fn = jax.jit(run.eval_fn, out_shardings=replicated)
  restored = ckpt.restore_latest(run.state) if cfg.checkpoint.resume else None
  if restored is not None:
    run.state, meta, _ = restored
    run.train_data.restore(meta["data"])
  start = int(run.state.step)
  if start >= cfg.steps:
    log.info("%s: %s already finished (step %d of %d); nothing to train", cfg.name, cfg.run_dir, start, cfg.steps)
  logger = MetricsLogger(cfg.run_dir, cfg.steps, start_step=start, progress=cfg.log.progress,
                         tensorboard=cfg.log.tensorboard, description=cfg.name, write=primary,
                         wandb_project=cfg.log.wandb, config=to_dict(cfg))
  schedule = make_schedule(cfg.optim, cfg.steps)
  result = {"eval_before": evaluate(run, eval_fn) if start == 0 else None}
  if result["eval_before"]:
    logger.log(start, result["eval_before"], "eval")
  stop = {"signal": None}
  previous = signal.signal(signal.SIGTERM, lambda signum, _: stop.update(signal=signum))

  def meta():
    return {"data": run.train_data.state(), "config": to_dict(cfg)}

  step, pending = start, None
  try:
    for step in range(start + 1, cfg.steps + 1):
      batch = run.next_batch()
      with sharding.use_mesh(run.mesh, cfg.mesh.rules):
        run.state, metrics = train_step(run.state, batch, run.frozen)
      logger.advance()
      if pending is not None:  # the previous step's count: reading it does not wait for this step
        check_skips(cfg, step - 1, int(pending), ckpt)
      pending = metrics["skipped_in_row"]
      if step % cfg.log.every == 0 or step == cfg.steps or ckpt.due(step):
        # The schedule counts applied updates only (a skipped one leaves the optimiser's count as it was).
        applied = step - 1 - (int(metrics["skipped_updates"]) - (int(metrics["skipped_in_row"]) > 0))
        values = logger.log(step, {**metrics, "lr": schedule(applied)})
        check_skips(cfg, step, int(values["skipped_in_row"]), ckpt, values["loss"])
      if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
        logger.log(step, evaluate(run, eval_fn), "eval")
      ckpt.save(step, run.state, meta())
      if jax.process_count() > 1:  # a signal reaches each process at its own step: stop at the same one
        stop["signal"] = stop["signal"] or (signal.SIGTERM if sharding.processes_where(stop["signal"] is not None)
                                            else None)
      if stop["signal"] is not None:
        ckpt.save(step, run.state, meta(), force=True)
        raise SystemExit(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved in {ckpt.directory}")
    ckpt.save(step, run.state, meta(), force=True)
    result["eval_after"] = evaluate(run, eval_fn)
    if step > start:  # a finished run's final row is already in metrics.jsonl
      logger.log(step, result["eval_after"], "eval")
  except (KeyboardInterrupt, Exception) as error:
    saveable = not isinstance(error, (TrainingError, CheckpointError)) and jax.process_count() == 1
    if saveable and not any(x.is_deleted() for x in jax.tree.leaves(run.state)):
      ckpt.save(int(run.state.step), run.state, meta(), force=True)
    raise
  finally:
    signal.signal(signal.SIGTERM, previous)
    logger.close()
    if run.verifier_pool is not None:
      run.verifier_pool.close()
  return result


def _kept(ckpt: Checkpointer) -> str:
  kept = ckpt.latest_step()
  return (f"last good checkpoint: step {kept} in {ckpt.directory}" if kept is not None else
          "no checkpoint was saved before it (checkpoint.every=0 saves only at the end)")


def check_skips(cfg: TrainConfig, step: int, skipped_in_row: int, ckpt: Checkpointer, loss: float = 0.0) -> None:
  """Stop (TrainingError, one line) after `optim.max_consecutive_skips` updates in a row were skipped for
  non-finite gradients (a NaN loss has them too). Skipped updates leave the weights as they were, so
  checkpoints stay finite."""
  limit = cfg.optim.max_consecutive_skips
  if limit and skipped_in_row >= limit:
    nan = "" if math.isfinite(loss) else f", loss {loss}"
    raise TrainingError(f"step {step}: the last {skipped_in_row} updates were skipped for non-finite gradients"
                        f"{nan} (optim.max_consecutive_skips={limit}; is optim.lr too high?); {_kept(ckpt)}")
