"""Checkpoints through orbax's CheckpointManager: train state (params or adapters, optimiser, step,
RNG), data position and config; keep-N; resume from the latest.

Orbax writes each step into a temporary directory and renames it when complete, so a crash while
saving leaves the previous checkpoint as the latest good one.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import orbax.checkpoint as ocp

from jaxalign.algorithms.step import TrainState

log = logging.getLogger(__name__)


class Checkpointer:
  """Save / restore `TrainState` plus JSON metadata under `directory`."""

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 2, every: int = 0):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=max(every, 1),
                                           enable_async_checkpointing=False, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
    self.every = every

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    return bool(self.every) and step % self.every == 0

  def save(self, step: int, state: TrainState, meta: dict, *, force: bool = False) -> bool:
    """Save when the interval says so (or `force`); returns whether it saved."""
    if (not force and not self.due(step)) or step in self.manager.all_steps():
      return False
    saved = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state._asdict()),
                                                            meta=ocp.args.JsonSave(meta)), force=force)
    self.manager.wait_until_finished()
    if saved:
      log.info("checkpoint: saved step %d to %s", step, self.directory)
    return saved

  def metadata(self, step: int | None = None) -> dict:
    """The JSON metadata (data position, config) saved with `step` (default: latest), without the state."""
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, abstract: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
    """Restore `step` (default: latest) into the shapes, dtypes and shardings of `abstract`."""
    step = self.latest_step() if step is None else step
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract._asdict())
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                  meta=ocp.args.JsonRestore()))
    log.info("checkpoint: resumed from step %d in %s", step, self.directory)
    return TrainState(**restored["state"]), restored["meta"]

  def close(self) -> None:
    self.manager.close()
