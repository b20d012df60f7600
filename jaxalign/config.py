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

from jaxalign.algorithms.lora import LoraConfig  # noqa: E402
from jaxalign.algorithms.online import ALGORITHMS as ONLINE_ALGORITHMS  # noqa: E402
from jaxalign.algorithms.online import RLConfig  # noqa: E402
from jaxalign.algorithms.step import OptimConfig  # noqa: E402
from jaxalign.data.pipeline import DataConfig  # noqa: E402
from jaxalign.models.config import ModelConfig  # noqa: E402
from jaxalign.sharding import MeshConfig  # noqa: E402

OFFLINE_ALGORITHMS = ("sft", "reward", "preference")


def algorithm_names() -> tuple[str, ...]:
  """Every algorithm a config may name (online ones as registered now: a notebook may add one)."""
  return (*OFFLINE_ALGORITHMS, *ONLINE_ALGORITHMS)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """A registered loss (`jaxalign.losses.available()`) and its keyword hyper-parameters."""

  name: str = "sft"
  params: dict = dataclasses.field(default_factory=dict)


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

  def __post_init__(self):
    if self.every < 1:
      raise ValueError("log.every must be >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training stage. `python -m jaxalign.train --help` lists every key."""

  name: str = "train"
  # sft | reward | preference (the direct family, chosen by loss.name) | an online algorithm (ppo, grpo,
  # dr_grpo, dapo, gspo, cispo, rloo, remax, reinforce, reinforce_pp, online_dpo, rft: the loss follows
  # from the algorithm; loss.params still apply)
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
  seed: int = 0
  run_dir: str = "runs/default"
  checkpoint: CheckpointConfig = CheckpointConfig()
  log: LogConfig = LogConfig()
  # token_logprobs implementation: auto | xla | pallas | naive
  logprob_impl: str = "auto"

  def __post_init__(self):
    if self.algorithm not in algorithm_names():
      raise ValueError(f"algorithm={self.algorithm!r}; choose one of {algorithm_names()}")
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
