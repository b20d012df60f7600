"""What a run directory may be resumed by: the config a checkpoint was written with, against the new one.

A checkpoint stores the config of its run. A resume whose config differs in a key that changes the run
(model, data, optimiser, loss, steps, seed, ...) is refused with one line listing the keys, unless
`checkpoint.allow_changes` names them. Keys that only change how the run executes or reports (logging,
checkpoint cadence, mesh, rematerialisation, kernels) may change freely. Keys that change the layout of the
saved state can never change: the checkpoint would not fit.
"""

from __future__ import annotations

import pathlib
import shutil

from jaxalign.config import ConfigError, TrainConfig, to_dict

# May differ between the run that wrote a checkpoint and the one resuming it (dotted keys or whole sections).
EXECUTION_KEYS = ("name", "run_dir", "log", "checkpoint", "mesh", "eval_every", "eval_batches", "logprob_impl",
                  "model.remat", "model.attention_impl", "model.dtype", "rl.verifier_workers")
# Change the shapes or dtypes of the saved state: never allowed.
LAYOUT_KEYS = ("algorithm", "model", "optim.mu_dtype", "lora.rank", "lora.targets")
# What a run directory holds besides the lock; `checkpoint.overwrite` removes these.
RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "hf")


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
  """{"a.b.c": leaf} of a nested config dict."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):  # an empty mapping (no loss.params) contributes no key
      out.update(flatten(value, f"{name}."))
    else:
      out[name] = value
  return out


def _within(key: str, names) -> bool:
  return any(key == n or key.startswith(f"{n}.") for n in names)


def changed_keys(saved: dict, now: dict) -> list[str]:
  """Dotted keys whose values differ between a saved config and the new one. A key the saved config lacks
  entirely (written before the key existed) is not a change; a free-form entry (a loss parameter) set now but
  not then is."""
  a, b = flatten(saved), flatten(now)
  schema = flatten(to_dict(TrainConfig()))
  return sorted(k for k in a.keys() | b.keys()
                if a.get(k, "<unset>") != b.get(k, "<unset>") and (k in a or k not in schema))


def check_resumable(cfg: TrainConfig, saved: dict, directory) -> None:
  """One-line ConfigError when the run saved in `directory` (config `saved`) may not be continued by `cfg`."""
  now = to_dict(cfg)
  changes = [k for k in changed_keys(saved, now) if not _within(k, EXECUTION_KEYS)]
  layout = [k for k in changes if _within(k, LAYOUT_KEYS)]
  a, b = flatten(saved), flatten(now)
  listed = ", ".join(f"{k} ({a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r})" for k in (layout or changes))
  if layout:
    raise ConfigError(f"{directory} holds a run whose saved state has another layout: {listed}; resume with the "
                      "same values, or use another run_dir (or checkpoint.overwrite=true to start over)")
  refused = [k for k in changes if not _within(k, cfg.checkpoint.allow_changes)]
  if refused:
    raise ConfigError(f"{directory} holds a run with another config: {listed}; resume with the same values, "
                      f"allow them with checkpoint.allow_changes=[{','.join(refused)}], or use another run_dir "
                      "(or checkpoint.overwrite=true to start over)")


def used(run_dir: pathlib.Path) -> list[str]:
  """The run files `run_dir` already holds."""
  return [name for name in RUN_FILES if (run_dir / name).exists() and not _empty_dir(run_dir / name)]


def _empty_dir(path: pathlib.Path) -> bool:
  return path.is_dir() and not any(path.iterdir())


def prepare_run_dir(cfg: TrainConfig) -> None:
  """Clear run_dir when asked (`checkpoint.overwrite`); refuse `checkpoint.resume=false` in a used one, which
  would leave two runs' checkpoints side by side (a later resume would pick whichever step is newest)."""
  run_dir = pathlib.Path(cfg.run_dir)
  found = used(run_dir)
  if found and cfg.checkpoint.overwrite:
    for name in found:
      path = run_dir / name
      shutil.rmtree(path) if path.is_dir() else path.unlink()
  elif found and not cfg.checkpoint.resume:
    raise ConfigError(f"{run_dir} already holds a run ({', '.join(found)}) and checkpoint.resume=false: set "
                      "checkpoint.overwrite=true to delete it and start over, or use another run_dir")
