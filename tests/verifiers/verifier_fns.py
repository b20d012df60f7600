"""Module-level verifier functions for the pool tests (workers import this module by name to unpickle them).

Kept free of heavy imports, so a worker's first call does not spend its time limit importing.
"""

import os
import time


def square(x: float) -> float:
  return x * x


def sleepy(item: tuple[float, float]) -> float:
  """Sleeps item[0] seconds, then returns item[1]."""
  seconds, value = item
  time.sleep(seconds)
  return value


def flaky(item: tuple[str, float]) -> float:
  """'ok': the value; 'raise': an exception; 'exit': the process dies (os._exit); 'nan': a non-number."""
  kind, value = item
  if kind == "raise":
    raise RuntimeError("verifier bug")
  if kind == "exit":
    os._exit(3)
  if kind == "nan":
    return float("nan")
  return value


def worker_pid(item) -> float:
  del item
  return float(os.getpid())
