"""Typed, validated configs: nested frozen dataclasses from YAML plus `a.b.c=value` overrides.

Every error is one line naming the file, line or dotted key at fault, e.g.
``config key 'optim.lrr' is unknown (did you mean 'optim.lr'?)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import pathlib
import types
import typing
from typing import Any, Literal

import yaml

from jaxalign.data.pipeline import DataConfig
from jaxalign.models.config import ModelConfig
from jaxalign.sharding import MeshConfig


class ConfigError(ValueError):
  """A config file, key or value that cannot be used; the message names it."""


def _type_name(tp) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp, key: str) -> Any:
  """Check (and gently convert) `value` against the annotation `tp`."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if tp is Any:
    return value
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for option in (a for a in args if a is not type(None)):
      try:
        return coerce(value, option, key)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(errors[0] if len(errors) == 1 else f"config key '{key}': {value!r} matches none of "
                      f"{' | '.join(_type_name(a) for a in args)}")
  if origin is Literal:
    if value not in args:
      raise ConfigError(f"config key '{key}': {value!r} is not one of {list(args)}")
    return value
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if not isinstance(value, dict):
      raise ConfigError(f"config key '{key}': expected a mapping of {tp.__name__} fields, got {value!r}")
    return from_dict(tp, value, key)
  if origin in (tuple, list):
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
      args = (args[0],) * len(value)
    elif origin is list:
      args = (args[0] if args else Any,) * len(value)
    if len(args) != len(value):
      raise ConfigError(f"config key '{key}': expected {len(args)} items, got {len(value)}")
    return tuple(coerce(v, a, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
  if origin is dict or tp is dict:
    if not isinstance(value, dict):
      raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
    return dict(value)
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if tp is float and isinstance(value, str):
    try:
      value = float(value)  # YAML reads 1e-4 (no dot) as a string
    except ValueError:
      pass
  if tp is float and isinstance(value, float) and math.isnan(value):
    raise ConfigError(f"config key '{key}': expected a number, got nan")
  if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
    return value
  raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def from_dict(cls, data: dict, prefix: str = ""):
  """Build dataclass `cls` from a (nested) dict, rejecting unknown keys and ill-typed values."""
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls) if f.init}
  kwargs = {}
  for name, value in data.items():
    key = f"{prefix}.{name}" if prefix else name
    if name not in fields:
      close = difflib.get_close_matches(name, fields, n=1)
      hint = f" (did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?)" if close else ""
      raise ConfigError(f"config key '{key}' is unknown{hint}")
    kwargs[name] = coerce(value, hints[name], key)
  try:
    return cls(**kwargs)
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config section '{prefix or cls.__name__}': {e}") from None


def key_lines(cls, prefix: str = "") -> list[str]:
  """`  key.path = default` for every key of dataclass `cls` (for --help)."""
  lines = []
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    tp = hints[f.name]
    if dataclasses.is_dataclass(tp):
      lines += key_lines(tp, f"{prefix}{f.name}.")
    else:
      default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
      lines.append(f"  {prefix}{f.name} = {default!r}")
  return lines


def to_dict(config) -> dict:
  """Plain nested dict (tuples become lists), suitable for YAML / JSON."""

  def plain(v):
    if dataclasses.is_dataclass(v):
      return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (tuple, list)):
      return [plain(x) for x in v]
    if isinstance(v, dict):
      return {k: plain(x) for k, x in v.items()}
    return v

  return plain(config)


def load_yaml(path: str | pathlib.Path) -> dict:
  """Parse a YAML mapping; syntax errors name the file and line."""
  path = pathlib.Path(path)
  if not path.exists():
    raise ConfigError(f"config file {path} does not exist")
  try:
    data = yaml.safe_load(path.read_text())
  except yaml.MarkedYAMLError as e:
    mark = e.problem_mark
    raise ConfigError(f"{path}:{mark.line + 1}:{mark.column + 1}: {e.problem}") from None
  if data is None:
    return {}
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: the top level must be a mapping of config keys")
  return data


def set_key(data: dict, key: str, value) -> dict:
  """Set the dotted `key` (a.b.c) in a nested dict, creating sections on the way."""
  node = data
  *parents, leaf = key.strip().split(".")
  for part in parents:
    child = node.setdefault(part, {})
    if not isinstance(child, dict):
      raise ConfigError(f"config key {key!r}: '{part}' is not a section")
    node = child
  node[leaf] = value
  return data


def apply_override(data: dict, override: str) -> dict:
  """Set `a.b.c=value` in a nested dict (value parsed as YAML: numbers, bools, lists, null)."""
  if "=" not in override:
    raise ConfigError(f"override {override!r} must look like key.path=value")
  key, raw = override.split("=", 1)
  try:
    value = yaml.safe_load(raw) if raw else ""
  except yaml.YAMLError:
    value = raw
  return set_key(data, key, value)


def merge(base: dict, update: dict) -> dict:
  """Recursive dict merge; `update` wins."""
  out = dict(base)
  for k, v in update.items():
    out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


# ------------------------------------------------------------------------------------------ train config
# The algorithms' own settings live here, beside the rest of the schema: parsing a recipe imports no algorithm
# (`trainer.objective_of` checks the algorithm's name against the registered ones).


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


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters; rank 0 turns them off (full fine-tuning)."""

  rank: int = 0
  alpha: float = 16.0
  # Projections (module names) that get an adapter.
  targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f"lora.rank must be >= 0, got {self.rank}")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / max(self.rank, 1)


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """Rollout and update settings of the online algorithms."""

  group_size: int = 8  # G completions per prompt
  max_new_tokens: int = 16
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  # Log-probs under the distribution sampled from (renormalised over the kept top-k / top-p set, on the
  # sampler's and on the training path); false: the full tempered distribution (biased ratios when truncating).
  renormalize_sampling: bool = True
  epochs: int = 1  # passes over each rollout (PPO epochs)
  minibatches: int = 1  # optimiser steps per pass
  kl_coef: float = 0.0  # beta of the KL-in-reward algorithms (ppo, rloo, remax, reinforce, reinforce_pp)
  # KL to the reference as a loss term instead (or as well): coefficient x the mean over rows of each row's summed
  # per-token estimate (k3 as in GRPO, k2, k1).
  kl_loss_coef: float = 0.0
  kl_loss_estimator: str = "k3"
  entropy_coef: float = 0.0  # entropy bonus: the loss minus this times the token-mean entropy
  rewards: dict = dataclasses.field(default_factory=lambda: {"max_digit": 1.0})  # rule reward -> weight
  # Verifier rewards (math_verify, ifeval_strict, ifeval_loose, answer_format: `jaxalign.verifiers`) run in this
  # many worker processes, each call limited to verifier_timeout_s seconds of wall-clock time: a call that runs
  # longer or crashes scores 0 and its worker is replaced (reward/verifier_timeouts, reward/verifier_errors).
  verifier_workers: int = 4
  verifier_timeout_s: float = 10.0
  oversample: int = 1  # DAPO dynamic sampling: generate this many times the groups, keep those with signal
  # DAPO overlong reward shaping: completions longer than max_new_tokens - overlong_buffer lose up to 1 (0: off).
  overlong_buffer: int = 0
  mask_truncated_completions: bool = False  # completions without EOS give no loss (DAPO, TRL)
  # Packed training passes (`online.packing`): the old-policy, reference and update passes run on packed rows of
  # pack_length tokens (0: the rollout rows' P + N) holding pack_ratio x the padded rows' slots per batch shard;
  # a batch that does not fit runs padded (pack_ratio 0: always padded). Rows longer than P + N let two
  # completions longer than half of it share a row, at the cost of attention over the longer rows.
  pack_ratio: float = 0.0
  pack_length: int = 0
  # Each prompt of a group runs through the model once in the old-policy, reference and (one minibatch per
  # pass, policy-gradient algorithms) update passes, its completions attending to it (`Decoder.shared_prefix`):
  # exact, and (G - 1) / G of the prompt tokens' compute saved. Off, or packed passes: every row runs whole.
  share_prompt: bool = True
  # RLOO: advantages normalised over the step's rows to mean 0, divided by their std + 1e-4 (TRL's
  # RLOOTrainer normalize_advantages).
  normalize_advantages: bool = False
  is_cap: float = 0.0  # truncated importance weight on sampler / trainer log-prob mismatch (0: off)
  rft_threshold: float = 0.5  # rejection sampling keeps the best sample when its reward reaches this
  gamma: float = 1.0  # PPO: GAE discount
  lam: float = 0.95  # PPO: GAE lambda
  # HF directory of a reward model (*ForSequenceClassification) scored inside the step, added to the rule
  # rewards with this weight; PPO's critic starts from it (else from the policy's backbone, zero head).
  reward_model: str | None = None
  reward_model_weight: float = 1.0
  # Iterated reference (SPIN's pi_t, iterative DPO's pi_ref = pi_t): every this many steps the reference becomes
  # the current policy (0: the frozen initial policy throughout). It is held in the train state, so a checkpoint
  # saved anywhere inside an iteration resumes with the same reference.
  reference_update_steps: int = 0
  # Mixture-of-experts policies: the training passes route each token to the experts the sampler chose for it
  # (`models.routing`): "all" (old-policy, reference and update passes), "scoring" (old-policy and reference
  # passes only) or "none". With an old-policy pass, rollout/logprob_mismatch_* is also reported without
  # replay (*_no_replay; one more forward pass).
  routing_replay: str = "all"

  def __post_init__(self):
    if self.group_size < 1 or self.max_new_tokens < 1 or self.epochs < 1 or self.minibatches < 1:
      raise ValueError("rl.group_size, rl.max_new_tokens, rl.epochs and rl.minibatches must be >= 1")
    if self.reference_update_steps < 0:
      raise ValueError(f"rl.reference_update_steps={self.reference_update_steps} must be >= 0 (0: a frozen reference)")
    if not (self.temperature > 0 and 0 < self.top_p <= 1 and self.top_k >= 0 and self.oversample >= 1):
      raise ValueError("rl.temperature must be > 0, rl.top_p in (0, 1], rl.top_k >= 0 and rl.oversample >= 1")
    if 0 < self.is_cap < 1:
      raise ValueError(f"rl.is_cap={self.is_cap} must be 0 (off) or >= 1 (a cap on the importance weight)")
    if min(self.kl_coef, self.kl_loss_coef, self.is_cap, self.entropy_coef) < 0 or not (
        0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
      raise ValueError("rl.kl_coef, rl.kl_loss_coef, rl.entropy_coef and rl.is_cap must be >= 0, rl.gamma and "
                       "rl.lam in [0, 1]")
    if not 0 <= self.overlong_buffer < self.max_new_tokens:
      raise ValueError(f"rl.overlong_buffer={self.overlong_buffer} must be in [0, rl.max_new_tokens="
                       f"{self.max_new_tokens})")
    if not 0 <= self.pack_ratio <= 1 or self.pack_length < 0:
      raise ValueError(f"rl.pack_ratio={self.pack_ratio} must be in [0, 1] (0: padded rows) and rl.pack_length="
                       f"{self.pack_length} >= 0")
    if self.routing_replay not in ("all", "scoring", "none"):
      raise ValueError(f"rl.routing_replay={self.routing_replay!r}; choose one of all, scoring, none")
    if self.kl_loss_estimator not in ("k1", "k2", "k3"):
      raise ValueError(f"rl.kl_loss_estimator={self.kl_loss_estimator!r}; choose one of k1, k2, k3")
    if self.verifier_workers < 1 or not self.verifier_timeout_s > 0:
      raise ValueError(f"rl.verifier_workers={self.verifier_workers} must be >= 1 and rl.verifier_timeout_s="
                       f"{self.verifier_timeout_s} > 0")

  @property
  def truncates(self) -> bool:
    """Whether sampling keeps only part of the vocabulary (top-k / top-p) and log-probs are renormalised."""
    return self.renormalize_sampling and (self.top_k > 0 or self.top_p < 1)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """A registered loss (`jaxalign.losses.available()`) and its keyword hyper-parameters."""

  name: str = "sft"
  params: dict = dataclasses.field(default_factory=dict)
  # LD-DPO (Liu et al. 2024, arXiv:2409.06411; TRL's ld_alpha): a pair's summed log-probs (policy and reference)
  # weight the tokens past the shorter response's length by this, in [0, 1] (null: plain sums).
  ld_alpha: float | None = None
  # WPO (Zhou et al. 2024, arXiv:2406.11827; TRL's use_weighting): each pair's loss term weighted by
  # exp(mean_t [log p(y_t) - log sum_v p_v^2]) of both responses under the policy, without gradient.
  wpo: bool = False
  # Mixture-of-experts policies, any objective: + router_aux_coef x the load-balancing loss (transformers'
  # `router_aux_loss_coef`: Mixtral 0.02, Qwen-MoE 0.001) + router_z_coef x the router z-loss (ST-MoE: 0.001).
  router_aux_coef: float = 0.0
  router_z_coef: float = 0.0

  def __post_init__(self):
    if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
      raise ValueError(f"loss.ld_alpha={self.ld_alpha} must be in [0, 1] (null: off)")
    if min(self.router_aux_coef, self.router_z_coef) < 0:
      raise ValueError(f"loss.router_aux_coef={self.router_aux_coef} and loss.router_z_coef={self.router_z_coef} "
                       "must be >= 0")


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
  """The frozen reference policy of reference-based losses."""

  # "model": a frozen copy runs inside the step (the base weights under LoRA, so no copy);
  # "precomputed": reference log-probs are computed once before training and cached with the data.
  mode: Literal["model", "precomputed"] = "model"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 0  # steps between checkpoints (0: only at the end / on SIGTERM)
  keep: int = 2  # checkpoints kept
  resume: bool = True  # continue from the latest checkpoint in run_dir (refused if the config changed)
  # Config keys (or sections, e.g. "optim") a resume may change; any other change is refused.
  allow_changes: tuple[str, ...] = ()
  # Delete run_dir's checkpoints, metrics and export and start over (needed for resume=false in a used run_dir).
  overwrite: bool = False
  export_hf: bool = True  # write the final model as an HF directory (run_dir/hf)

  def __post_init__(self):
    if self.every < 0 or self.keep < 1:
      raise ValueError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")


@dataclasses.dataclass(frozen=True)
class LogConfig:
  every: int = 10  # steps between metric rows
  progress: bool = True  # console progress bar
  tensorboard: bool = True  # TensorBoard events in run_dir/tensorboard
  # Weights & Biases project to log to as well (the `wandb` extra; null: off). The run's W&B id is kept in
  # run_dir/wandb_id, so a resumed run continues the same W&B run; WANDB_MODE=offline logs without a network.
  wandb: str | None = None

  def __post_init__(self):
    if self.every < 1:
      raise ValueError("log.every must be >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training stage. `python -m jaxalign.train --help` lists every key."""

  name: str = "train"
  # sft | reward | preference (the direct family, chosen by loss.name) | an online algorithm (ppo, grpo,
  # dr_grpo, dapo, gspo, cispo, luspo, sapo, vespo, rloo, remax, reinforce, reinforce_pp, online_dpo, rft, rkl,
  # spin, pmle, preference_distillation: the loss follows from the algorithm; loss.params still apply)
  algorithm: str = "sft"
  loss: LossConfig = LossConfig()
  # Architecture when training from scratch; with init_from only param_dtype / dtype apply.
  model: ModelConfig = ModelConfig()
  # HF model directory to start from ("@previous": the export of the previous stage).
  init_from: str | None = None
  # "builtin:digits", an HF directory, or a tokenizer.json; default: init_from's tokenizer.
  tokenizer: str | None = None
  mesh: MeshConfig = MeshConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  lora: LoraConfig = LoraConfig()
  reference: ReferenceConfig = ReferenceConfig()
  rl: RLConfig = RLConfig()
  steps: int = 100
  eval_every: int = 0  # 0: evaluate only before and after training
  eval_batches: int = 8
  # A rule reward (sort_exact, max_digit, gsm8k_exact, ...) of the policy's greedy completions of the first
  # eval_reward_prompts held-out prompts, at every eval: `behaviour/<reward>` (what the policy does, beside its
  # losses). The held-out data must carry answers (data.eval, or a synthetic task).
  eval_reward: str | None = None
  eval_reward_prompts: int = 64
  seed: int = 0
  run_dir: str = "runs/default"
  checkpoint: CheckpointConfig = CheckpointConfig()
  log: LogConfig = LogConfig()
  # token_logprobs implementation: auto | xla | pallas | naive
  logprob_impl: str = "auto"

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError("steps must be >= 1")
    if self.eval_every < 0 or self.eval_batches < 1:
      raise ValueError("eval_every must be >= 0 and eval_batches >= 1")


def load_stages(data: dict, where: str = "config") -> list[TrainConfig]:
  """TrainConfigs from a config mapping: either one stage, or `stages: [...]` merged over the rest."""
  stages = data.pop("stages", None)
  if stages is None:
    return [from_dict(TrainConfig, data)]
  if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
    raise ConfigError(f"{where}: 'stages' must be a non-empty list of stage mappings")
  configs = [from_dict(TrainConfig, merge_stage(data, stage)) for stage in stages]
  shared = [c.run_dir for c in configs]
  clashing = [c.name for c in configs if shared.count(c.run_dir) > 1]
  if len(set(clashing)) < len(clashing):
    raise ConfigError(f"{where}: stages sharing a run_dir get run_dir/<name>, so their names must differ: {clashing}")
  # Stages sharing a run_dir (e.g. one run_dir=... override for all) each get their own subdirectory.
  return [dataclasses.replace(c, run_dir=str(pathlib.Path(c.run_dir) / c.name)) if shared.count(c.run_dir) > 1
          else c for c in configs]


def merge_stage(base: dict, stage: dict) -> dict:
  """A stage over the shared keys. A stage that names another loss does not inherit the shared loss's
  parameters (DPO's beta means nothing to IPO)."""
  merged = merge(base, stage)
  base_loss, stage_loss = base.get("loss") or {}, stage.get("loss") or {}
  if "name" in stage_loss and stage_loss["name"] != base_loss.get("name"):
    merged["loss"] = {**merged["loss"], "params": dict(stage_loss.get("params") or {})}
  return merged
