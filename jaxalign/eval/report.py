"""What an evaluation writes: results.json, report.md (one table), <task>.jsonl (every example) and <task>.png
(its metrics with their confidence intervals)."""

from __future__ import annotations

import dataclasses
import json
import pathlib

from jaxalign.eval.metrics import Interval


def as_json(value) -> dict | float:
  """A metric for results.json: {"estimate", "low", "high"} for an interval, else the number."""
  if isinstance(value, Interval):
    return {k: float(v) for k, v in value._asdict().items()}
  return float(value)


def markdown(results: dict, confidence: float) -> str:
  """One table: task, metric, estimate, and its bootstrap interval."""
  lines = [f"| task | metric | estimate | {confidence:.0%} CI |", "|---|---|---|---|"]
  for task, result in results.items():
    for name, value in result.metrics.items():
      if isinstance(value, Interval):
        lines.append(f"| {task} | {name} | {value.estimate:.4f} | [{value.low:.4f}, {value.high:.4f}] |")
      else:
        lines.append(f"| {task} | {name} | {value:.4f} | |")
  return "\n".join(lines) + "\n"


def plot(task: str, metrics: dict, path: pathlib.Path, confidence: float) -> None:
  """A bar per interval metric with its confidence interval as an error bar."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  intervals = {k: v for k, v in metrics.items() if isinstance(v, Interval)}
  fig, ax = plt.subplots(figsize=(max(3.0, 1.2 * len(intervals) + 1), 3.2))
  names = list(intervals)
  estimates = [intervals[k].estimate for k in names]
  errors = [[e - intervals[k].low for k, e in zip(names, estimates)],
            [intervals[k].high - e for k, e in zip(names, estimates)]]
  ax.bar(range(len(names)), estimates, yerr=errors, capsize=4, color="tab:blue")
  ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
  ax.set_title(f"{task} ({confidence:.0%} bootstrap CI)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(results: dict, cfg, out_dir: pathlib.Path) -> pathlib.Path:
  """Writes every output of `results` ({task: tasks.Result}) into out_dir; returns results.json's path."""
  out_dir.mkdir(parents=True, exist_ok=True)
  summary = {"config": dataclasses.asdict(cfg),
             "metrics": {task: {k: as_json(v) for k, v in r.metrics.items()} for task, r in results.items()}}
  for task, result in results.items():
    with open(out_dir / f"{task}.jsonl", "w") as f:
      for record in result.records:
        f.write(json.dumps(record, default=str) + "\n")
    plot(task, result.metrics, out_dir / f"{task}.png", cfg.confidence)
  (out_dir / "report.md").write_text(markdown(results, cfg.confidence))
  path = out_dir / "results.json"
  path.write_text(json.dumps(summary, indent=2, default=str))
  return path
