"""Command line: `python -m jaxalign.train [--config recipe.yaml] [key.path=value ...]`.

With no config it runs the embedded default: a tiny model learns the built-in digit-sorting task
with SFT, then DPO on near-miss preference pairs, on a laptop CPU in a few minutes, and prints how
the held-out metrics moved. `algorithm=<online algorithm>` alone (e.g. `algorithm=grpo`) runs the
embedded RL default instead: the same tiny model learns the "largest digit" task from a rule reward.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import logging
import pathlib
import sys

from jaxalign import losses
from jaxalign.algorithms.online import ALGORITHMS as ONLINE_ALGORITHMS
from jaxalign.config import ConfigError, TrainConfig, apply_override, key_lines, load_stages, load_yaml
from jaxalign.data.readers import DataError

DEFAULT_RECIPE = importlib.resources.files("jaxalign") / "recipes" / "default.yaml"
RL_DEFAULT_RECIPE = importlib.resources.files("jaxalign") / "recipes" / "rl_default.yaml"
HEADLINE = ("reward", "loss", "nll_per_token", "policy_prefers_chosen", "rewards/accuracies", "accuracy", "rewards/margins")


STAGES_HELP = """\
stages: a recipe may list `stages: [...]`, each a mapping of the keys below merged over the recipe's shared
keys; they run in order, and `init_from: "@previous"` starts a stage from the model the stage before exported.
The embedded default has two: 0 = sft, 1 = dpo.
overrides: `key.path=value` applies to every stage (it wins over the recipe's stage values); `stages.N.key=value`
applies to stage N alone and wins over both. A stage that names another loss (loss.name) does not inherit the
shared loss.params.
resume: a run_dir's newest readable checkpoint is continued when the config is the same; a change to a key that
alters the run (model, data, optim, loss, steps, seed, ...) is refused unless checkpoint.allow_changes lists it.
checkpoint.overwrite=true deletes a run_dir's checkpoints, metrics and export and starts over.
multi-process (one process per host): mesh.coordinator_address=host:port mesh.num_processes=N mesh.process_id=I,
or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or a SLURM / Open MPI / Cloud TPU launch."""


def help_text() -> str:
  from jaxalign.trainer import algorithm_names

  return "\n".join([
    __doc__.strip(), "", STAGES_HELP, "", "algorithms: " + ", ".join(algorithm_names()),
    "losses (loss.name [input; reference]: loss.params with defaults; or a weighted sum of losses of one input, "
    "sharing loss.params, e.g. loss.name='0.8*dpo + 0.2*bco + chosen_nll'):", *losses.help_lines(), "",
    "config keys (with defaults):",
    *key_lines(TrainConfig)])


def parse_stages(config: str | None, overrides: list[str]) -> list[TrainConfig]:
  """The recipe's stages with the command line's overrides: `key=value` on every stage (over the recipe's
  stage values), `stages.N.key=value` on stage N (over both)."""
  online = any(o.partition("=")[0] == "algorithm" and o.partition("=")[2] in ONLINE_ALGORITHMS for o in overrides)
  data = load_yaml(config or (RL_DEFAULT_RECIPE if online else DEFAULT_RECIPE))
  stages = data.pop("stages", None)
  shared, per_stage = [], {}
  for override in overrides:
    head, _, rest = override.partition(".")
    if head != "stages":
      shared.append(override)
      continue
    index, _, rest = rest.partition(".")
    count = len(stages or [])
    if not index.isdigit() or int(index) >= count:
      raise ConfigError(f"override {override!r}: the recipe has {count} stages" + (f" (0..{count - 1})" if count else ""))
    per_stage.setdefault(int(index), []).append(rest)
  apply_overrides(data, shared)
  for index, stage in enumerate(stages or []):
    if not isinstance(stage, dict):
      raise ConfigError(f"{config or 'default recipe'}: stage {index} is not a mapping of config keys")
    apply_overrides(stage, shared + per_stage.get(index, []))
  if stages is not None:
    data["stages"] = stages
  return load_stages(data, config or "default recipe")


def apply_overrides(target: dict, overrides: list[str]) -> None:
  """Apply `key=value` overrides in order. Naming another loss first drops the old loss's parameters (those
  the overrides set are kept, in whatever order they come)."""
  names = [apply_override({}, o)["loss"]["name"] for o in overrides if o.partition("=")[0].strip() == "loss.name"]
  loss = target.get("loss")
  if names and isinstance(loss, dict) and loss.get("name") != names[-1]:
    loss.pop("params", None)
  for override in overrides:
    apply_override(target, override)


def check_stages(stages: list[TrainConfig]) -> None:
  """Every stage's key combinations and loss parameters, before the first stage builds anything."""
  from jaxalign.trainer import check_combination, objective_of

  for cfg in stages:
    try:
      check_combination(cfg, objective_of(cfg))
    except ConfigError as error:
      raise ConfigError(f"stage '{cfg.name}': {error}" if len(stages) > 1 else str(error)) from None


def run_stages(stages: list[TrainConfig]) -> list[dict]:
  from jaxalign.trainer import train

  results, previous_export = [], None
  for cfg in stages:
    if cfg.init_from == "@previous":
      if previous_export is None:
        raise ConfigError(f"stage '{cfg.name}': init_from=@previous but no earlier stage exported a model")
      cfg = dataclasses.replace(cfg, init_from=previous_export)
    result = train(cfg)
    previous_export = result["export"]
    results.append(result)
  return results


def summary(stages: list[TrainConfig], results: list[dict]) -> str:
  lines = ["", "| stage | held-out metric | before | after |", "|---|---|---|---|"]
  for cfg, result in zip(stages, results):
    before, after = result["eval_before"] or {}, result["eval_after"] or {}
    for key in sorted(k for k in after if k.startswith("behaviour/")) + list(HEADLINE):
      if key in after:
        start = f"{before[key]:.4f}" if key in before else "-"
        lines.append(f"| {cfg.name} | {key} | {start} | {after[key]:.4f} |")
  return "\n".join(lines)


def plan_main(stages: list[TrainConfig], devices: int | None) -> int:
  """--plan: the projected per-device memory of every stage's step; nothing allocated, no data read."""
  from jaxalign import plan

  sizes = {plan.mesh_size(cfg) for cfg in stages}
  if devices is None and (None in sizes or len(sizes) > 1):
    raise ConfigError("--plan: the mesh has a -1 axis (or stages differ); pass --devices N")
  plan.use_fake_devices(devices or sizes.pop())
  peaks, model_cfg = [], None
  for cfg in stages:
    previous = cfg.init_from == "@previous" and model_cfg is not None
    model_cfg = model_cfg.with_execution_of(cfg.model) if previous else plan.model_config(cfg)
    result = plan.plan(dataclasses.replace(cfg, model=model_cfg, init_from=None))
    print(plan.report(cfg, result, model_cfg))
    peaks.append(result.peak / plan.GIB)
  if len(peaks) > 1:
    print(f"peak_gib_per_device={max(peaks):.3f}")
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxalign.train", add_help=False)
  parser.add_argument("--config")
  parser.add_argument("--help", "-h", action="store_true")
  parser.add_argument("--print-config", action="store_true", help="print the resolved stages and exit")
  parser.add_argument("--plan", action="store_true",
                      help="compile each stage's step on fake CPU devices and print its per-device memory")
  parser.add_argument("--devices", type=int, help="with --plan: fake devices (default: the mesh size)")
  args, overrides = parser.parse_known_args(argv)
  if args.help:
    print(help_text())
    return 0
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax", "orbax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    stages = parse_stages(args.config, overrides)
    check_stages(stages)
    if args.plan:
      return plan_main(stages, args.devices)
    if args.print_config:
      from jaxalign.config import to_dict
      import yaml
      print(yaml.safe_dump([to_dict(s) for s in stages], sort_keys=False))
      return 0
    from jaxalign import sharding
    sharding.initialize_distributed(stages[0].mesh)  # once, for every stage
    results = run_stages(stages)
  except (ConfigError, DataError, OSError, ValueError, RuntimeError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted; the last checkpoint saved in the run_dir is kept (run the same command to resume)",
          file=sys.stderr)
    return 130
  print(summary(stages, results))
  for cfg, result in zip(stages, results):
    if result["export"]:
      print(f"{cfg.name}: model exported to {pathlib.Path(result['export'])}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
