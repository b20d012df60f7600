"""One run per run directory: `run_dir/.lock` names the process that holds it (host, pid, start time).

A second run on the same directory would interleave its checkpoints and metrics with the first one's, so it
stops with a one-line error instead. A lock left by a run that crashed or was killed (-9) on this host, whose pid
is no longer alive, is taken over with a warning. A holder on another host cannot be checked from here: it
refreshes the lock's modification time every `HEARTBEAT_S` seconds, and a lock from another host left
unrefreshed for `STALE_AFTER_S` (a relaunch on another node after a crash) is taken over.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import pathlib
import socket
import threading
import time

from jaxalign.config import ConfigError

log = logging.getLogger(__name__)

HEARTBEAT_S = 60.0
STALE_AFTER_S = 300.0


class RunDirBusy(ConfigError):
  """The run directory is in use by another live run; the message names it."""


class RunLock:
  """`with RunLock(run_dir):` holds `run_dir/.lock` for the duration (created atomically, removed on exit)."""

  def __init__(self, run_dir: str | pathlib.Path):
    self.run_dir = pathlib.Path(run_dir)
    self.path = self.run_dir / ".lock"
    self.record: dict | None = None
    self._stop = threading.Event()

  def __enter__(self) -> RunLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> None:
    """Take the lock, or raise `RunDirBusy` (held by a live run) / `ConfigError` (the directory is unwritable)."""
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    try:
      self.run_dir.mkdir(parents=True, exist_ok=True)
      for _ in range(3):  # a stale lock is removed and the creation retried; another starter may win the race
        if _create(self.path, record):
          self.record = record
          self._stop.clear()
          threading.Thread(target=self._heartbeat, name="jaxalign-run-lock", daemon=True).start()
          return
        self._clear_if_stale()
    except OSError as error:
      raise ConfigError(f"cannot lock run dir {self.run_dir}: {error.strerror} [Errno {error.errno}]") from None
    raise RunDirBusy(f"{self.run_dir}: could not take {self.path} (another run keeps creating it)")

  def _heartbeat(self) -> None:
    """Refresh the lock's modification time while held, so runs on other hosts can tell it is alive."""
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError:
        return

  def release(self) -> None:
    """Remove the lock if this process still holds it (a forked child or a taken-over lock leaves it alone)."""
    self._stop.set()
    if self.record is None or self.record["pid"] != os.getpid():
      return
    if _read(self.path)[0] == self.record:
      self.path.unlink(missing_ok=True)
    self.record = None

  def _clear_if_stale(self) -> None:
    """Raise `RunDirBusy` if the lock's holder is alive; else remove it (one warning)."""
    held, problem = _read(self.path)
    if held is None and problem is None:
      return  # removed meanwhile: try again
    if problem is not None:
      log.warning("%s is unreadable (%s): taking it over as a stale lock", self.path, problem)
    else:
      since = _since(held["started"])
      remote = held["host"] != socket.gethostname()
      if (remote and not _unrefreshed(self.path)) or (not remote and _alive(held["pid"])):
        raise RunDirBusy(f"{self.run_dir} is in use by pid {held['pid']} on host {held['host']} since {since} "
                         f"(a second run would interleave its checkpoints and metrics; remove {self.path} if that "
                         "run is gone)")
      elif remote:
        log.warning("%s was left by pid %d on host %s (since %s), not refreshed for %d s: taking it over", self.path,
                    held["pid"], held["host"], since, STALE_AFTER_S)
      else:
        log.warning("%s was left by pid %d on this host (since %s), which is no longer running: taking it over",
                    self.path, held["pid"], since)
    self.path.unlink(missing_ok=True)


def _create(path: pathlib.Path, record: dict) -> bool:
  """Create `path` holding `record` unless it exists; atomic: the file appears with its content or not at all."""
  tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
  tmp.write_text(json.dumps(record))
  try:
    os.link(tmp, path)  # fails if `path` exists
    return True
  except FileExistsError:
    return False
  except OSError:  # no hard links on this filesystem: O_EXCL, with a moment where the file is still empty
    return _create_excl(path, record)
  finally:
    tmp.unlink(missing_ok=True)


def _create_excl(path: pathlib.Path, record: dict) -> bool:
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(json.dumps(record))
  return True


def _read(path: pathlib.Path) -> tuple[dict | None, str | None]:
  """(record, None), or (None, what is wrong with it), or (None, None) when there is no lock file."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None, None
  except (OSError, UnicodeDecodeError) as error:
    return None, str(error)
  try:
    record = json.loads(text)
    ok = isinstance(record["host"], str) and isinstance(record["pid"], int) and record["pid"] > 0 and \
      isinstance(record["started"], str)
  except (ValueError, TypeError, KeyError):
    ok = False
  return (record, None) if ok else (None, f"not a lock record: {text[:60]!r}")


def _unrefreshed(path: pathlib.Path) -> bool:
  """Whether a lock file went without its holder's heartbeat for STALE_AFTER_S."""
  try:
    return time.time() - path.stat().st_mtime > STALE_AFTER_S
  except FileNotFoundError:
    return True


def _alive(pid: int) -> bool:
  """Whether a process `pid` exists on this host (it may belong to another user)."""
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  except OverflowError:
    return False
  return True


def _since(started: str) -> str:
  """"2026-12-02T05:10:33Z" -> "2026-12-02 05:10 UTC" (or as written when it is not such a time)."""
  try:
    time = datetime.datetime.strptime(started, "%Y-%m-%dT%H:%M:%SZ")
  except ValueError:
    return started
  return time.strftime("%Y-%m-%d %H:%M UTC")
