"""Training metrics to the console (progress bar with ETA), a JSONL file, TensorBoard events and (optionally)
Weights & Biases."""

from __future__ import annotations

import json
import math
import os
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


def _json_row(row: dict) -> str:
  """One strict-JSON line: NaN and +-inf are written as null."""
  row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
  return json.dumps(row, allow_nan=False) + "\n"


def _drop_replayed_rows(path: pathlib.Path, start_step: int) -> None:
  """Keep the rows of steps <= start_step (a resumed run redoes the later ones) and drop a torn last line.

  The file is rewritten atomically (a temporary file in the same folder, then os.replace), and only if it changes.
  """
  if not path.exists():
    return
  text = path.read_text(encoding="utf-8", errors="replace")
  lines = text.split("\n")
  if lines[-1] == "":
    lines.pop()
  kept = []
  for i, line in enumerate(lines):
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      if i == len(lines) - 1:  # torn by a crash mid-write
        continue
      row = None
    if isinstance(row, dict) and isinstance(row.get("step"), int):
      if row["step"] <= start_step:
        kept.append(_json_row(row))
    else:
      kept.append(line + "\n")  # not a metrics row: kept as it is
  new = "".join(kept)
  if new == text:
    return
  temporary = path.with_name(path.name + ".tmp")
  with open(temporary, "w", encoding="utf-8") as f:
    f.write(new)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, path)


def _wandb_run(run_dir: pathlib.Path, project: str, name: str, config: dict | None):
  """A W&B run for run_dir: the one whose id run_dir/wandb_id keeps (resumed), else a new one (its id kept)."""
  try:
    import wandb
  except ImportError:
    raise ImportError("log.wandb needs Weights & Biases: pip install 'jaxalign[wandb]'") from None
  id_file = run_dir / "wandb_id"
  run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
  id_file.write_text(run_id)
  return wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(run_dir), config=config)


class MetricsLogger:
  """One writer for every sink; `log(step, metrics, prefix)` writes a row to each.

  Resuming at `start_step` drops the metrics.jsonl rows and TensorBoard events of later steps, which the resumed
  run logs again (all of them at step 0: an attempt that crashed before its first checkpoint). With `write=False` (processes other than the first of a multi-process job) nothing is written or
  shown, but `log` still returns the scalars.
  """

  def __init__(self, run_dir: str | pathlib.Path, total_steps: int, *, start_step: int = 0, progress: bool = True,
               tensorboard: bool = True, description: str = "train", write: bool = True,
               wandb_project: str | None = None, config: dict | None = None):
    self.run_dir = pathlib.Path(run_dir)
    self.write = write
    self.jsonl = None
    self.writer = None
    self.wandb = None
    if write:
      self.run_dir.mkdir(parents=True, exist_ok=True)
      # A run starting at step 0 redoes everything an earlier attempt (one that crashed before its first
      # checkpoint) logged.
      _drop_replayed_rows(self.run_dir / "metrics.jsonl", start_step if start_step > 0 else -1)
      self.jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
      if tensorboard:
        from tensorboardX import SummaryWriter
        # TensorBoard discards earlier events of steps >= purge_step when it reads this run's new event file.
        purge_step = start_step + 1 if start_step > 0 else 0 if (self.run_dir / "tensorboard").exists() else None
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)
      if wandb_project:
        self.wandb = _wandb_run(self.run_dir, wandb_project, description, config)
    self.bar = tqdm(total=total_steps, initial=start_step, desc=description, disable=not (progress and write),
                    dynamic_ncols=True, mininterval=1.0)
    self.start = time.time()

  def log(self, step: int, metrics: dict, prefix: str = "train") -> dict[str, float]:
    values = _scalars(metrics)
    if not self.write:
      return values
    row = {"step": step, "time": round(time.time() - self.start, 3)}
    row.update({f"{prefix}/{k}": v for k, v in values.items()})
    self.jsonl.write(_json_row(row))
    self.jsonl.flush()
    if self.writer is not None:
      for key, value in values.items():
        if math.isfinite(value):
          self.writer.add_scalar(f"{prefix}/{key}", value, step)
    if self.wandb is not None:
      self.wandb.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)
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
    if self.jsonl is not None:
      self.jsonl.close()
    if self.writer is not None:
      self.writer.close()
    if self.wandb is not None:
      self.wandb.finish()
