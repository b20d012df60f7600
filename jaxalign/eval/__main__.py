"""Command line: `python -m jaxalign.eval [--config eval.yaml] [key.path=value ...]`.

Evaluates `policy` (an HF model directory, or a training run directory: its newest export) on `tasks` and writes
results.json, report.md, one <task>.jsonl with every example and one <task>.png per task into `output_dir`.
Verifiers (math, IFEval) run in a pool of `verifier_workers` processes with a per-call limit of
`verifier_timeout_s`: a hung or crashing check scores 0.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys

from jaxalign import sharding
from jaxalign.config import ConfigError, apply_override, from_dict, key_lines, load_yaml
from jaxalign.data.readers import DataError
from jaxalign.eval.config import EvalConfig
from jaxalign.models.hf import CheckpointError


def parse(config: str | None, overrides: list[str]) -> EvalConfig:
  """The config file's keys with the command line's `key=value` overrides applied over them."""
  data = load_yaml(config) if config else {}
  for override in overrides:
    apply_override(data, override)
  return from_dict(EvalConfig, data)


def evaluate(cfg: EvalConfig) -> dict:
  """Runs every task of `cfg`; returns {task: tasks.Result} and writes the outputs (`report.write`)."""
  from jaxalign.eval import policy as models
  from jaxalign.eval import report, tasks
  from jaxalign.verifiers import registry
  from jaxalign.verifiers.pool import VerifierPool

  mesh = sharding.make_mesh(cfg.mesh)
  with sharding.use_mesh(mesh, cfg.mesh.rules), VerifierPool(cfg.verifier_workers, cfg.verifier_timeout_s,
                                                              preload=registry.PRELOAD) as pool:
    load = lambda path: models.load(path, mesh) if path else None  # noqa: E731
    ctx = tasks.Context(cfg, load(cfg.policy), pool, load(cfg.baseline), load(cfg.reward_model),
                        load(cfg.judge_model))
    results = {task: tasks.TASK_FNS[task](ctx) for task in cfg.tasks}
  report.write(results, cfg, pathlib.Path(cfg.output_dir))
  return results


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxalign.eval", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=EvalConfig.__doc__ + "\n\nconfig keys (with defaults):\n" +
                                   "\n".join(key_lines(EvalConfig)))
  parser.add_argument("--config", help="a YAML file of config keys")
  parser.add_argument("overrides", nargs="*", metavar="key.path=value")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    cfg = parse(args.config, args.overrides)
    results = evaluate(cfg)
  except (ConfigError, DataError, CheckpointError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  from jaxalign.eval.report import markdown

  print(markdown(results, cfg.confidence), end="")
  print(f"written to {cfg.output_dir}/ (results.json, report.md, <task>.jsonl, <task>.png)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
