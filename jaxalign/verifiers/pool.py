"""Verifier calls in worker processes, each with a wall-clock limit: a hang or a crash scores 0, never stalls.

Rule-based verifiers run untrusted model output through parsers (sympy, regexes, JSON): a pathological input
can hang one for minutes or kill its process. `VerifierPool(workers, timeout_s).score(fn, items)` calls
`fn(item)` for each item in a separate worker process and returns the scores in input order. A call that runs
past `timeout_s` is stopped by killing its worker; a call that raises, returns something that is not a finite
number, or takes its process down scores 0.0 too; a killed or dead worker is replaced, and the other workers keep
taking items meanwhile. `fn` must be picklable by reference (a module-level function of an importable module).

Workers are fresh interpreters (`python -c ...`, not forks: the parent runs JAX's threads), started at the first
`score` and kept for later calls; each reads length-prefixed pickles on stdin and answers on its own copy of
stdout (the real stdout goes to stderr, so a verifier's prints cannot corrupt the stream). A worker ignores
SIGINT (the parent stops it) and exits when its stdin closes, so none outlives the parent.
"""

from __future__ import annotations

import math
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

_HEADER = struct.Struct("<Q")  # the byte length of the pickle that follows
_SERVE = "from jaxalign.verifiers.pool import serve; serve()"
_START_LIMIT_S = 120.0  # a worker that has not imported its modules by then is broken


class Scores(NamedTuple):
  """One `VerifierPool.score` call: each item's score and what the call cost."""

  values: np.ndarray  # [N] float32, in input order; 0.0 for timed-out and failed calls
  seconds: float  # wall-clock seconds of the whole call
  timeouts: int  # calls stopped at the limit
  errors: int  # calls that raised, returned a non-number or killed their worker


# ---- worker side --------------------------------------------------------------------------------------------

def _read_exact(fd: int, size: int) -> bytes | None:
  """`size` bytes from `fd`, or None at end of file."""
  chunks, left = [], size
  while left:
    chunk = os.read(fd, min(left, 1 << 20))
    if not chunk:
      return None
    chunks.append(chunk)
    left -= len(chunk)
  return b"".join(chunks)


def _read_message(fd: int):
  header = _read_exact(fd, _HEADER.size)
  if header is None:
    return None
  return _read_exact(fd, _HEADER.unpack(header)[0])


def _write_message(fd: int, payload: bytes) -> None:
  data = _HEADER.pack(len(payload)) + payload
  while data:
    data = data[os.write(fd, data):]


def _call(fn: Callable, item) -> tuple[str, object]:
  try:
    value = float(fn(item))
  except BaseException as error:  # noqa: BLE001 (SystemExit too: a verifier must not end the worker quietly)
    return "error", f"{type(error).__name__}: {error}"[:500]
  return ("ok", value) if math.isfinite(value) else ("error", f"non-finite score {value}")


def serve() -> None:
  """A worker's loop: import the modules named on the command line, say ready, then answer (fn, item) pickles."""
  import importlib
  import signal

  signal.signal(signal.SIGINT, signal.SIG_IGN)
  out = os.dup(1)
  os.dup2(2, 1)  # prints from verifiers go to stderr, not into the answer stream
  for name in sys.argv[1:]:
    importlib.import_module(name)
  try:
    _write_message(out, pickle.dumps(("ready", None)))
    while (message := _read_message(0)) is not None:
      try:
        fn, item = pickle.loads(message)
      except Exception as error:  # noqa: BLE001 (e.g. the function's module does not import here)
        answer = ("error", f"cannot unpickle the call: {type(error).__name__}: {error}"[:500])
      else:
        answer = _call(fn, item)
      _write_message(out, pickle.dumps(answer))
  except OSError:  # the parent closed the pipes (the pool was closed while this worker started or ran)
    pass


# ---- parent side --------------------------------------------------------------------------------------------

class _Worker:
  """One worker process, its pipes, and the call it is running (item index and deadline)."""

  def __init__(self, preload: Sequence[str]):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    self.process = subprocess.Popen([sys.executable, "-c", _SERVE, *preload], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, env=env, bufsize=0)
    self.started = time.monotonic()
    self.ready = False
    self.index: int | None = None  # the item being scored
    self.deadline = math.inf

  @property
  def fd(self) -> int:
    return self.process.stdout.fileno()

  def send(self, index: int, payload: bytes, timeout_s: float) -> bool:
    """Start a call; False when the worker is gone (its stdin closed)."""
    try:
      _write_message(self.process.stdin.fileno(), payload)
    except OSError:
      return False
    self.index, self.deadline = index, time.monotonic() + timeout_s
    return True

  def stop(self, grace_s: float = 0.0) -> None:
    """Close stdin (a clean exit), then kill after `grace_s` seconds."""
    for pipe in (self.process.stdin, self.process.stdout):
      try:
        pipe.close()
      except OSError:
        pass
    try:
      self.process.wait(grace_s)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait()


def _stop_all(workers: list[_Worker]) -> None:
  for worker in workers:
    worker.stop(grace_s=1.0)
  workers.clear()


class VerifierPool:
  """`workers` processes scoring `fn(item)` calls, each limited to `timeout_s` seconds of wall-clock time.

  Args:
    workers: number of worker processes (calls run in parallel up to this many).
    timeout_s: wall-clock limit of one call, counted from when a worker receives it.
    preload: modules each worker imports before it takes calls (their import time then counts against no
      call's limit).

  Workers start at the first `score` call (or at `start()`, which also waits until they are ready); `close()`
  (or leaving a `with` block) stops them, and a later `score` starts new ones. A worker that is still starting
  takes no calls, so its start-up time counts against no call's limit. One `score` runs at a time (a lock); it is safe to call from a host-callback thread.
  """

  def __init__(self, workers: int, timeout_s: float, *, preload: Sequence[str] = ()):
    if workers < 1 or not timeout_s > 0:
      raise ValueError(f"VerifierPool needs workers >= 1 and timeout_s > 0, got {workers} and {timeout_s}")
    self.size, self.timeout_s, self.preload = int(workers), float(timeout_s), tuple(preload)
    self._workers: list[_Worker] = []
    self.last_error: str | None = None  # the message of the latest call that raised (for logs)
    self._lock = threading.Lock()
    self._finalizer = weakref.finalize(self, _stop_all, self._workers)

  def __enter__(self) -> VerifierPool:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Stop every worker (idempotent)."""
    with self._lock:
      _stop_all(self._workers)

  def start(self) -> None:
    """Start the workers (those not running) and wait until each has imported its modules and is ready."""
    with self._lock:
      self._fill()
      while starting := [w for w in self._workers if not w.ready]:
        wait = _START_LIMIT_S - (time.monotonic() - min(w.started for w in starting))
        for fd in select.select([w.fd for w in starting], [], [], max(wait, 0.0))[0]:
          worker = next(w for w in starting if w.fd == fd)
          self._started(worker, _read_message(fd))
        if wait <= 0:
          raise RuntimeError(f"a verifier worker did not start within {_START_LIMIT_S:.0f} s")

  def score(self, fn: Callable[[object], float], items: Sequence) -> Scores:
    """`fn(item)` for every item, in worker processes; scores in input order (0.0 where a call timed out or
    failed). Raises only when `fn` or an item cannot be pickled, or when workers cannot start at all."""
    try:
      payloads = [pickle.dumps((fn, item)) for item in items]
    except (pickle.PicklingError, AttributeError, TypeError) as error:
      raise TypeError(f"VerifierPool.score: fn and items must be picklable (fn a module-level function): "
                      f"{error}") from None
    with self._lock:
      return self._score(payloads)

  def _fill(self) -> None:
    while len(self._workers) < self.size:
      self._workers.append(_Worker(self.preload))

  def _started(self, worker: _Worker, message: bytes | None) -> None:
    """A starting worker's first message: "ready", or end of file (it died: its stderr says why)."""
    if message is None:
      code = worker.process.wait()
      raise RuntimeError(f"a verifier worker exited with code {code} before it was ready (see its stderr; "
                         f"preload={self.preload})")
    worker.ready = pickle.loads(message)[0] == "ready"

  def _replace(self, worker: _Worker) -> None:
    worker.process.kill()
    worker.stop()
    self._workers[self._workers.index(worker)] = _Worker(self.preload)

  def _score(self, payloads: list[bytes]) -> Scores:
    start = time.monotonic()
    values = np.zeros(len(payloads), np.float32)
    timeouts = errors = 0
    pending, done = list(range(len(payloads)))[::-1], 0  # pop() takes items in input order
    self._fill()
    while done < len(payloads):
      for worker in self._workers:  # hand out items to idle ready workers
        if worker.ready and worker.index is None and pending:
          index = pending.pop()
          if not worker.send(index, payloads[index], self.timeout_s):
            pending.append(index)  # the worker died while idle: the item goes to another one
            self._replace(worker)
      now = time.monotonic()
      wait = min([w.deadline for w in self._workers] + [now + 1.0]) - now
      readable = set(select.select([w.fd for w in self._workers], [], [], max(wait, 0.0))[0])
      now = time.monotonic()
      for worker in list(self._workers):
        if worker.fd in readable:
          message = _read_message(worker.fd)
          if not worker.ready:
            self._started(worker, message)
            continue
          if message is None:  # the process ended during a call (or while idle)
            if worker.index is not None:
              errors, done = errors + 1, done + 1
            self._replace(worker)
            continue
          status, value = pickle.loads(message)
          if status == "ok":
            values[worker.index] = value
          else:
            errors, self.last_error = errors + 1, value
          worker.index, worker.deadline, done = None, math.inf, done + 1
        elif worker.index is not None and now >= worker.deadline:
          timeouts, done = timeouts + 1, done + 1
          self._replace(worker)
        elif not worker.ready and now - worker.started > _START_LIMIT_S:
          raise RuntimeError(f"a verifier worker did not start within {_START_LIMIT_S:.0f} s")
    return Scores(values, time.monotonic() - start, timeouts, errors)
