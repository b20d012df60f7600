"""Training metrics to the console (progress bar with ETA), a JSONL file and TensorBoard events."""

from __future__ import annotations

import json
import math
import pathlib
import time

import numpy as np
from tqdm.auto import tqdm

SHOWN = ("reward", "loss", "rewards/accuracies", "accuracy", "rewards/margins", "grad_norm")


def _scalars(metrics: dict) -> dict[str, float]:
  out = {}
  for key, value in metrics.items():
    value = np.asarray(value)
    if value.size == 1:
      out[key] = float(value)
  return out


class MetricsLogger:
  """One writer for every sink; `log(step, metrics, prefix)` writes a row to each."""

  def __init__(self, run_dir: str | pathlib.Path, total_steps: int, *, start_step: int = 0, progress: bool = True,
               tensorboard: bool = True, description: str = "train"):
    self.run_dir = pathlib.Path(run_dir)
    self.run_dir.mkdir(parents=True, exist_ok=True)
    self.jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
    self.writer = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
    self.bar = tqdm(total=total_steps, initial=start_step, desc=description, disable=not progress,
                    dynamic_ncols=True, mininterval=1.0)
    self.start = time.time()

  def log(self, step: int, metrics: dict, prefix: str = "train") -> dict[str, float]:
    values = _scalars(metrics)
    row = {"step": step, "time": round(time.time() - self.start, 3)}
    row.update({f"{prefix}/{k}": v for k, v in values.items()})
    self.jsonl.write(json.dumps(row) + "\n")
    self.jsonl.flush()
    if self.writer is not None:
      for key, value in values.items():
        if math.isfinite(value):
          self.writer.add_scalar(f"{prefix}/{key}", value, step)
    if prefix == "train":
      self.bar.set_postfix({k: f"{values[k]:.4g}" for k in SHOWN if k in values}, refresh=False)
    else:
      self.bar.write(f"step {step} {prefix}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())
                                                            if not k.startswith(("numerator", "denominator"))))
    return values

  def advance(self, n: int = 1) -> None:
    self.bar.update(n)

  def close(self) -> None:
    self.bar.close()
    self.jsonl.close()
    if self.writer is not None:
      self.writer.close()
