"""Checkpoints through orbax's CheckpointManager: train state (params or adapters, optimiser, step,
RNG), data position and config; keep-N; resume from the latest readable step.

Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a crash while
saving leaves the previous checkpoint as the latest good one; a failed or interrupted save removes its
temporary directory, and one left by a killed run is removed when the next `Checkpointer` opens the directory
(`jaxalign.run_lock` makes sure no other run is writing there).
A step that cannot be read (truncated file, missing `state/`, bad JSON) is skipped on resume in favour of the
next older one, and moved aside to `corrupt-<step>` so that a new save of that step and keep-N rotation do not
trip over it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import orbax.checkpoint as ocp

from jaxalign import sharding
from jaxalign.models.hf import CheckpointError

log = logging.getLogger(__name__)

_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")  # how tensorstore reports an OS error inside a ValueError
_STATUS = re.compile(r"^([A-Z_]{4,}): ")  # tensorstore's absl status code, e.g. DATA_LOSS, OUT_OF_RANGE
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')
_ORBAX_NEVER_AWAITED = r"coroutine '(Store\._get_array_metadatas|_read_array_index_and_device_put)' was never awaited"


class _Unreadable(Exception):
  """A step that cannot be restored; `reason` says why in a few words."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


class Checkpointer:
  """Save / restore a train state (a NamedTuple of arrays: `algorithms.step.TrainState`) plus JSON metadata under
  `directory`."""

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 2, every: int = 0, clean: bool = False):
    """`clean`: remove what a killed run left half-written (only the run that holds the run_dir's lock may:
    anyone else could delete a live run's save in progress)."""
    self.directory = pathlib.Path(directory).absolute()
    _check_writable(self.directory)
    if clean:
      _remove_partial(self.directory, "*")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=max(every, 1),
                                           enable_async_checkpointing=False, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
    self.every = every
    self._warned: set[int] = set()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    return bool(self.every) and step % self.every == 0

  def save(self, step: int, state: NamedTuple, meta: dict, *, force: bool = False) -> bool:
    """Save when the interval says so (or `force`); returns whether it saved.

    Raises `CheckpointError` (one line) when the step cannot be written: the previous checkpoints stay as they
    were and no partial directory is left behind. An interrupt (KeyboardInterrupt) cleans up the same way and
    propagates.
    """
    if (not force and not self.due(step)) or step in self.manager.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state._asdict()), meta=ocp.args.JsonSave(meta))
    try:
      with _quiet_orbax():
        saved = self.manager.save(step, args=args, force=force)
        self.manager.wait_until_finished()
    except BaseException as error:
      self._discard_partial(step)
      if not isinstance(error, Exception):
        raise
      log.debug("checkpoint: saving step %d failed", step, exc_info=error)
      raise CheckpointError(f"cannot write checkpoint step {step} to {self.directory}: {_reason(error)}") from None
    if saved:
      log.info("checkpoint: saved step %d to %s", step, self.directory)
    return saved

  def metadata(self, step: int | None = None) -> dict:
    """The JSON metadata (data position, config) saved with `step` without the state; by default that of the
    newest step whose metadata is readable (each unreadable newer step logs one warning)."""
    if step is not None:
      return self._or_error(step, lambda: self._read_meta(step))
    failures = []
    for candidate in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self._read_meta(candidate)
      except _Unreadable as error:
        failures.append((candidate, error.reason))
        continue
      self._warn_fallback(failures, candidate, notes={})
      return meta
    raise self._none_readable(failures)

  def restore(self, abstract: NamedTuple, step: int | None = None) -> tuple[NamedTuple, dict]:
    """Restore `step` into the shapes, dtypes and shardings of `abstract`; by default the newest readable step
    (see `restore_latest`). Raises `CheckpointError` when it cannot be read or there is no checkpoint."""
    if step is None:
      found = self.restore_latest(abstract)
      if found is None:
        raise CheckpointError(f"no checkpoint in {self.directory}")
      return found[0], found[1]
    meta = self._or_error(step, lambda: self._read_meta(step))
    state = self._or_error(step, lambda: self._read_state(abstract, step))
    log.info("checkpoint: resumed from step %d in %s", step, self.directory)
    return state, meta

  def restore_latest(self, abstract: NamedTuple, check: Callable[[dict], None] | None = None
                     ) -> tuple[NamedTuple, dict, int] | None:
    """(state, meta, step) of the newest step that restores, or None when there is no checkpoint.

    A step whose metadata or state cannot be read is skipped for the next older one, with one warning line, and
    once an older step has restored it is moved aside to `corrupt-<step>`. `check(meta)` runs on each step's
    metadata before its state is read, and what it raises propagates (a config mismatch is not corruption).
    Raises `CheckpointError` (one line, naming the directory) when no step is readable; nothing is moved then.
    """
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      reason = None
      try:
        meta = self._read_meta(step)
        if check is not None:
          check(meta)
        state = self._read_state(abstract, step)
      except _Unreadable as error:
        reason = error.reason
      # Each process reads its own shards: a step one of them cannot read is skipped by all of them.
      others = [i for i in sharding.processes_where(reason is not None) if i != jax.process_index()]
      if reason is not None or others:
        failures.append((step, reason or f"unreadable on process {others[0]}"))
        continue
      self._warn_fallback(failures, step, notes=self._set_aside([s for s, _ in failures]))
      log.info("checkpoint: resumed from step %d in %s", step, self.directory)
      return state, meta, step
    if failures:
      raise self._none_readable(failures)
    return None

  def close(self) -> None:
    self.manager.close()

  # -------------------------------------------------------------------------- internals

  def _read_meta(self, step: int) -> dict:
    """The step's JSON metadata, or `_Unreadable`."""
    path = self.directory / str(step) / "meta" / "metadata"
    if not path.is_file():
      raise _Unreadable("missing meta/")
    _check_json(path, self.directory / str(step))
    return self._orbax_read(step, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def _read_state(self, abstract: NamedTuple, step: int) -> NamedTuple:
    """The step's state in the layout of `abstract`, or `_Unreadable`."""
    step_dir = self.directory / str(step)
    if not (step_dir / "state").is_dir():
      raise _Unreadable("missing state/")
    for path in [step_dir / "state" / "_METADATA", *sorted((step_dir / "state" / "array_metadatas").glob("*"))]:
      _check_json(path, step_dir)  # orbax reads these beside the arrays and leaves the array reads dangling
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract._asdict())
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
    return type(abstract)(**self._orbax_read(step, args)["state"])

  def _orbax_read(self, step: int, args) -> dict:
    try:
      with _quiet_orbax():
        return self.manager.restore(step, args=args)
    except Exception as error:
      log.debug("checkpoint: reading step %d failed", step, exc_info=error)
      raise _Unreadable(_reason(error, self.directory / str(step))) from None

  def _or_error(self, step: int, read: Callable):
    try:
      return read()
    except _Unreadable as error:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable ({error.reason})") from None

  def _none_readable(self, failures: list[tuple[int, str]]) -> CheckpointError:
    if not failures:
      return CheckpointError(f"no checkpoint in {self.directory}")
    steps = {}  # reason -> steps, newest first
    for step, reason in failures:
      steps.setdefault(reason, []).append(str(step))
    reasons = "; ".join(f"step{'s' * (len(s) > 1)} {', '.join(s)}: {reason}" for reason, s in steps.items())
    return CheckpointError(f"no readable checkpoint in {self.directory} ({reasons})")

  def _warn_fallback(self, failures: list[tuple[int, str]], step: int, notes: dict[int, str]) -> None:
    """One warning per unreadable step and Checkpointer (`metadata()` then `restore_latest()` warn once)."""
    for bad, reason in failures:
      if bad in self._warned:
        if bad in notes:
          log.info("checkpoint: unreadable step %d in %s: %s", bad, self.directory, notes[bad])
        continue
      self._warned.add(bad)
      note = f"; {notes[bad]}" if bad in notes else ""
      log.warning("checkpoint step %d in %s is unreadable (%s): falling back to step %d%s",
                  bad, self.directory, reason, step, note)

  def _set_aside(self, steps: list[int]) -> dict[int, str]:
    """Rename unreadable step directories to `corrupt-<step>` (kept for inspection, invisible to orbax, so a new
    save of the step has its name free and keep-N counts only good steps); returns a note per step."""
    notes = {}
    for step in steps if jax.process_index() == 0 else ():  # the other processes only read
      target, n = self.directory / f"corrupt-{step}", 1
      while target.exists():
        n += 1
        target = self.directory / f"corrupt-{step}.{n}"
      try:
        (self.directory / str(step)).rename(target)
        notes[step] = f"moved it to {target.name}"
      except OSError as error:
        notes[step] = f"could not move it aside: {_reason(error)}"
    if steps:
      sharding.barrier("jaxalign checkpoint: unreadable steps set aside")  # all see the same steps before a save
      self.manager.reload()
    return notes

  def _discard_partial(self, step: int) -> None:
    """Remove what a failed or interrupted save of `step` left, and forget it."""
    _remove_partial(self.directory, str(step))
    with contextlib.suppress(Exception):
      self.manager.reload()


def _remove_partial(directory: pathlib.Path, step: str) -> None:
  """Remove orbax's temporary directories of `step` (a glob) under `directory`: never a checkpoint."""
  for path in directory.glob(f"{step}{_TMP_SUFFIX}*") if jax.process_index() == 0 else ():
    shutil.rmtree(path, ignore_errors=True)


def _check_writable(directory: pathlib.Path) -> None:
  """One-line `CheckpointError` unless a file can be created in `directory` (made if missing): better at the start
  than at the first save, hours later."""
  try:
    directory.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
    os.close(fd)
    os.remove(probe)
  except OSError as error:
    raise CheckpointError(f"cannot write checkpoints to {directory}: {_reason(error)}") from None


def _check_json(path: pathlib.Path, step_dir: pathlib.Path) -> None:
  """`_Unreadable` unless `path` holds JSON (orbax would fail on it only after starting the array reads)."""
  name = path.relative_to(step_dir)
  try:
    json.loads(path.read_bytes())
  except OSError as error:
    raise _Unreadable(f"cannot read {name}: {_reason(error)}") from None
  except ValueError:
    raise _Unreadable(f"{name} is truncated or not JSON") from None


def _chain(error: BaseException):
  """`error` and the exceptions it wraps (__cause__, __context__, exception groups)."""
  seen, todo = set(), [error]
  while todo:
    e = todo.pop(0)
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def _reason(error: BaseException, step_dir: pathlib.Path | None = None) -> str:
  """A few words on why an orbax / tensorstore / OS call failed: the OS error when there is one, else the file
  under `step_dir` that tensorstore names and what it says about it, else the innermost message's first sentence."""
  chain = list(_chain(error))
  os_error = next((e for e in chain if isinstance(e, OSError) and e.errno), None)
  if os_error is not None:
    return f"{os_error.strerror or os.strerror(os_error.errno)} [Errno {os_error.errno}]"
  text = " ".join(str(e).split(" [tensorstore_spec")[0] for e in chain)
  code = _OS_ERROR_CODE.search(text)
  os_said = f"{os.strerror(int(code[1]))} [Errno {code[1]}]" if code else None
  files = [f for f in _QUOTED_PATH.finditer(text) if step_dir and f[1].startswith(f"{step_dir}{os.sep}")]
  if files:  # the last file named is the one that failed; what follows it says how
    said = os_said or _sentence(text[files[-1].end():].lstrip(": "))
    return f"cannot read {files[-1][1][len(str(step_dir)) + 1:]}" + (f": {said}" if said else "")
  if os_said:
    return os_said
  inner = chain[-1]
  return _sentence(str(inner.args[0] if isinstance(inner, KeyError) else inner)) or type(inner).__name__


def _sentence(message: str) -> str:
  return message.splitlines()[0].split(". ")[0][:160] if message else ""


class _HoldErrors(logging.Filter):
  """Holds back ERROR records (orbax logs a traceback per failing thread) instead of letting them through."""

  def __init__(self):
    super().__init__()
    self.records = []

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    self.records.append(record)
    return False


@contextlib.contextmanager
def _quiet_orbax():
  """Around an orbax call: its (absl's) ERROR records are held back, dropped when the call raises (jaxalign reports
  the failure in one line and logs the traceback at DEBUG) and logged as usual when it succeeds; and the leftovers
  of its failure path are muted (see `_mute_orbax_leftovers`)."""
  _mute_orbax_leftovers()
  logger, held = logging.getLogger("absl"), _HoldErrors()
  logger.addFilter(held)
  try:
    yield
  finally:
    logger.removeFilter(held)
  for record in held.records:
    logger.handle(record)


def _is_orbax_leftover(unraisable) -> bool:
  code = getattr(unraisable.object, "cr_code", None)
  if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
    return True  # an abandoned array read or write, closed by the garbage collector
  return unraisable.object is None and str(unraisable.exc_value) == "Event loop is closed"  # a tensorstore callback


class _DropOrbaxLeftovers(logging.Filter):
  """asyncio's "Task/Future exception was never retrieved" for orbax's abandoned array reads and writes."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ("exception was never retrieved" in message and ("orbax" in message or "tensorstore" in message))


def _mute_orbax_leftovers() -> None:
  """When an orbax save or restore fails, the async work it abandons reports itself later, from other threads or at
  garbage collection: tensorstore callbacks on a closed event loop, coroutines closed with the error, tasks and
  futures whose exception nobody retrieved, a coroutine never awaited (up to hundreds of lines after jaxalign's
  one). Mute exactly those; idempotent, and redone if a test harness put its own hook back."""
  if not getattr(sys.unraisablehook, "mutes_orbax", False):
    hook = sys.unraisablehook

    def muted(unraisable):
      if not _is_orbax_leftover(unraisable):
        hook(unraisable)

    muted.mutes_orbax = True
    sys.unraisablehook = muted
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _DropOrbaxLeftovers) for f in asyncio_log.filters):
    asyncio_log.addFilter(_DropOrbaxLeftovers())
  warnings.filterwarnings("ignore", _ORBAX_NEVER_AWAITED, RuntimeWarning)
