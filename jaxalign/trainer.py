"""Builds a run from a TrainConfig and runs the loop: data -> step -> log -> eval -> checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import sharding
from jaxalign.algorithms import lora as lora_lib
from jaxalign.algorithms import online
from jaxalign.algorithms.forward import rows, sequence_logps
from jaxalign.algorithms.objectives import Objective, objective_for
from jaxalign.algorithms.step import (StepFns, TrainState, init_opt_state, make_eval_step, make_optimizer,
                                      make_train_step)
from jaxalign.checkpoint import Checkpointer
from jaxalign.config import ConfigError, TrainConfig, to_dict
from jaxalign.data import batching, synthetic
from jaxalign.data.pipeline import Batches, build_datasets
from jaxalign.data.tokenize import check_vocab
from jaxalign.logging import MetricsLogger
from jaxalign.models import CausalLM, ScalarModel, load_hf, load_tokenizer, save_hf
from jaxalign.rollout.rewards import RuleRewards

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
  """[A, ...] arrays from A micro-batches, padding the token axis to their longest."""
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


def put_batch(batch: dict, mesh, rules, leading: int) -> dict:
  """Device-put a batch in its `batch_shardings`."""
  return jax.device_put(batch, batch_shardings(batch, mesh, rules, leading))


def precompute_reference(run: "Run", data: Batches) -> None:
  """Cache each response's reference log-prob with the data (reference.mode=precomputed)."""
  if run.objective.data_format == "unpaired":
    raise ConfigError("reference.mode=precomputed does not apply to unpaired (KTO) data: its mismatched pairs "
                      "depend on the batch; use reference.mode=model")
  model = nnx.merge(run.fns.graphdef, run.frozen.get("reference", run.frozen.get("base", run.state.trainable)))
  forward = nnx.jit(lambda m, b: sequence_logps(m, rows(b), impl=run.cfg.logprob_impl)[0])
  size, examples = data.cfg.batch_size, data.examples
  cached = []
  for start in range(0, len(examples), size):
    chunk = examples[start:start + size]
    padded = chunk + [chunk[-1]] * (size - len(chunk))
    batch = batching.collate_multi(padded, data.cfg.bucket_lengths)
    values = np.asarray(forward(model, put_batch(batch, run.mesh, run.cfg.mesh.rules, 0)))
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

  @property
  def online(self) -> bool:
    return self.cfg.algorithm in online.ALGORITHMS

  def next_batch(self) -> dict:
    """The next training batch on the mesh: prompts (online) or [A, ...] stacked micro-batches."""
    if self.online:
      return put_batch(next(self.train_data), self.mesh, self.cfg.mesh.rules, 0)
    micro = stack_micro_batches([next(self.train_data) for _ in range(self.cfg.optim.grad_accum)])
    return put_batch(micro, self.mesh, self.cfg.mesh.rules, 1)


def objective_of(cfg: TrainConfig) -> Objective:
  """The Objective that `cfg.algorithm` (offline or online) trains."""
  if cfg.algorithm in online.ALGORITHMS:
    spec = online.ALGORITHMS[cfg.algorithm]
    uses_reference = online.needs_reference(spec, cfg.rl, dict(cfg.loss.params))
    return Objective(spec.loss, "prompt", False, uses_reference, stats=None, step_counts=None)
  return objective_for(cfg.algorithm, cfg.loss.name)


def check_combination(cfg: TrainConfig, objective: Objective) -> None:
  """Config keys that are valid alone but not together (checked by `build_run` and by `--plan`)."""
  online_run = cfg.algorithm in online.ALGORITHMS
  if objective.data_format != cfg.data.format:
    raise ConfigError(f"loss '{cfg.loss.name}' ({cfg.algorithm}) trains on data.format={objective.data_format}, "
                      f"but data.format={cfg.data.format}")
  if cfg.algorithm == "ppo" and cfg.lora.enabled:
    raise ConfigError("algorithm=ppo trains a critic beside the policy; lora is not supported with it")
  if online_run and cfg.optim.grad_accum != 1:
    raise ConfigError("optim.grad_accum applies to offline algorithms; online ones use rl.minibatches")
  if cfg.model.attention_impl == "cudnn" and (cfg.data.packing or online_run):
    raise ConfigError("model.attention_impl=cudnn masks padding as per-row lengths (one right-padded document "
                      "per row): it cannot serve data.packing or an online algorithm's left-padded rollouts")


# Keys that change the checkpointed state's layout: a resume with other values is a different run.
LAYOUT_KEYS = ("algorithm", "model.scan_layers", "model.param_dtype", "optim.mu_dtype", "lora.rank")


def check_resumable(cfg: TrainConfig, saved_config: dict, directory) -> None:
  """One-line error when the checkpoint in `directory` was written by a run of another state layout."""
  now = to_dict(cfg)
  for key in LAYOUT_KEYS:
    section, _, leaf = key.rpartition(".")
    was, is_ = ((c.get(section, {}) if section else c).get(leaf) for c in (saved_config, now))
    if was != is_:
      raise ConfigError(f"{directory} holds a run with {key}={was!r}, this config has {key}={is_!r}: resume "
                        f"with the same {key}, or use another run_dir")


def _scalar_model(path: str, cfg: TrainConfig, mesh):
  """(graphdef computing in model.dtype, params in model.param_dtype) of a reward model directory
  (*ForSequenceClassification)."""
  model, mcfg = load_hf(path, dtype=cfg.model.param_dtype, mesh=mesh, rules=cfg.mesh.rules,
                        scan_layers=cfg.model.scan_layers)
  if not isinstance(model, ScalarModel):
    raise ConfigError(f"rl.reward_model={path} is not a reward model (*ForSequenceClassification)")
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: ScalarModel(mcfg.with_execution_of(cfg.model), rngs=nnx.Rngs(0))))
  return graphdef, nnx.to_pure_dict(nnx.state(model))


def _attach_online(run: Run) -> None:
  """Online algorithms: rewards (rules over each split's gold answers, a reward model), PPO's critic, and the
  RL step / eval."""
  cfg = run.cfg
  reward_graphdef = critic_graphdef = reward_params = None
  if cfg.rl.reward_model:
    reward_graphdef, reward_params = _scalar_model(cfg.rl.reward_model, cfg, run.mesh)
    # A copy only when PPO's critic trains from the originals (the step donates the trainable).
    run.frozen["reward_model"] = frozen_copy(reward_params, run.model_config.compute_dtype,
                                             copy=cfg.algorithm == "ppo")
  if cfg.algorithm == "ppo":
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

  run.train_fn = online.make_rl_step(online_fns(run, run.train_data.examples, critic_graphdef, reward_graphdef))
  run.eval_fn = online.make_rl_eval(online_fns(run, run.eval_data.examples, critic_graphdef, reward_graphdef))


def online_fns(run: Run, examples, critic_graphdef, reward_graphdef) -> online.OnlineFns:
  """The online step's static pieces; rule rewards look up the gold answers of `examples`."""
  reward = RuleRewards(run.tokenizer, {e.uid: e.answer for e in examples}, run.cfg.rl.rewards)
  return online.OnlineFns(run.fns, online.ALGORITHMS[run.cfg.algorithm], run.cfg.rl, run.cfg.rl.sampling(run.tokenizer),
                          reward, run.objective.uses_reference, critic_graphdef, reward_graphdef)


def build_run(cfg: TrainConfig) -> Run:
  sharding.initialize_distributed(cfg.mesh.distributed)
  mesh = sharding.make_mesh(cfg.mesh)
  objective = objective_of(cfg)
  check_combination(cfg, objective)
  tokenizer = build_tokenizer(cfg)
  graphdef, params, param_shardings, mcfg = build_params(cfg, objective, mesh)
  check_vocab(tokenizer, mcfg.vocab_size, f"tokenizer {cfg.tokenizer or cfg.init_from or 'builtin:digits'}")
  train_data, eval_data = build_datasets(cfg.data, tokenizer, cfg.seed)[:2]

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
                     jax.device_put(key, replicated))
  op = {"impl": cfg.logprob_impl}
  fns = StepFns(graphdef, objective, tx, dict(cfg.loss.params), cfg.lora, op)
  run = Run(cfg, mesh, tokenizer, mcfg, objective, fns, state, frozen, train_data, eval_data,
            make_train_step(fns), make_eval_step(fns))
  if run.online:
    _attach_online(run)
  elif objective.uses_reference and cfg.reference.mode == "precomputed":
    for data in (train_data, eval_data):
      precompute_reference(run, data)
  return run


def evaluate(run: Run, eval_fn) -> dict[str, float]:
  batches = run.eval_data.epoch_batches()[:run.cfg.eval_batches]
  with sharding.use_mesh(run.mesh, run.cfg.mesh.rules):
    rows_ = [jax.device_get(eval_fn(run.state, put_batch(b, run.mesh, run.cfg.mesh.rules, 0), run.frozen))
             for b in batches]
  return {k: float(np.mean([r[k] for r in rows_])) for k in rows_[0]}


def export(run: Run, path: pathlib.Path) -> pathlib.Path:
  params = run.state.trainable["policy"] if run.cfg.algorithm == "ppo" else run.state.trainable
  if run.cfg.lora.enabled:  # merged in the master dtype (the base is held in the compute dtype)
    params = lora_lib.merge(run.frozen["base"], params, run.cfg.lora, dtype=run.model_config.weight_dtype)
  return save_hf(nnx.merge(run.fns.graphdef, params), run.model_config, path, tokenizer=run.tokenizer)


def train(cfg: TrainConfig) -> dict:
  """Run one stage to cfg.steps; returns {"eval_before", "eval_after", "export"} (and resumes if asked)."""
  run = build_run(cfg)
  run_dir = pathlib.Path(cfg.run_dir)
  ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep, every=cfg.checkpoint.every)
  state_shardings = jax.tree.map(lambda x: x.sharding, run.state)
  with sharding.use_mesh(run.mesh, cfg.mesh.rules):
    train_step = jax.jit(run.train_fn, out_shardings=(state_shardings, None), donate_argnums=0)
    eval_fn = jax.jit(run.eval_fn)
  if cfg.checkpoint.resume and ckpt.latest_step() is not None:
    check_resumable(cfg, ckpt.metadata()["config"], ckpt.directory)
    run.state, meta = ckpt.restore(run.state)
    run.train_data.restore(meta["data"])
  start = int(run.state.step)
  logger = MetricsLogger(run_dir, cfg.steps, start_step=start, progress=cfg.log.progress,
                         tensorboard=cfg.log.tensorboard, description=cfg.name)
  result = {"eval_before": evaluate(run, eval_fn) if start == 0 else None}
  if result["eval_before"]:
    logger.log(start, result["eval_before"], "eval")
  stop = {"signal": None}
  previous = signal.signal(signal.SIGTERM, lambda signum, _: stop.update(signal=signum))

  def meta():
    return {"data": run.train_data.state(), "config": to_dict(cfg)}

  step = start
  try:
    for step in range(start + 1, cfg.steps + 1):
      batch = run.next_batch()
      with sharding.use_mesh(run.mesh, cfg.mesh.rules):
        run.state, metrics = train_step(run.state, batch, run.frozen)
      logger.advance()
      if step % cfg.log.every == 0 or step == cfg.steps or ckpt.due(step):  # never save past a NaN loss
        values = logger.log(step, metrics)
        if not math.isfinite(values["loss"]):
          raise TrainingError(f"step {step}: loss is {values['loss']}; last good checkpoint kept in {ckpt.directory}")
      if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
        logger.log(step, evaluate(run, eval_fn), "eval")
      ckpt.save(step, run.state, meta())
      if stop["signal"] is not None:
        ckpt.save(step, run.state, meta(), force=True)
        raise SystemExit(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved in {ckpt.directory}")
    ckpt.save(step, run.state, meta(), force=True)
    result["eval_after"] = logger.log(step, evaluate(run, eval_fn), "eval")
  except (KeyboardInterrupt, Exception) as error:
    if not isinstance(error, TrainingError) and not any(x.is_deleted() for x in jax.tree.leaves(run.state)):
      ckpt.save(int(run.state.step), run.state, meta(), force=True)
    raise
  finally:
    signal.signal(signal.SIGTERM, previous)
    logger.close()
    ckpt.close()
  result["export"] = str(export(run, run_dir / "hf")) if cfg.checkpoint.export_hf else None
  return result
