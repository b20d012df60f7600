"""VerifierPool: scores in input order, a per-call wall-clock limit, and crashes (raise, os._exit) that score 0
while the pool keeps working. The verifier functions live in tests/verifiers/verifier_fns.py (workers import it)."""

import os
import time

import numpy as np
import pytest
import verifier_fns as fns

from jaxalign.verifiers import VerifierPool


@pytest.fixture(scope="module")
def pool():
  with VerifierPool(workers=2, timeout_s=0.5) as p:
    p.start()  # both workers ready (a worker that is still starting takes no calls)
    yield p


def test_results_come_back_in_input_order(pool):
  scores = pool.score(fns.sleepy, [(0.2 * (i % 2), float(i)) for i in range(6)])  # odd items finish later
  np.testing.assert_array_equal(scores.values, np.arange(6, dtype=np.float32))
  assert scores.values.dtype == np.float32 and scores.timeouts == scores.errors == 0
  assert pool.score(fns.square, []).values.shape == (0,)


def test_a_hanging_call_times_out_at_the_limit_and_the_others_score(pool):
  items = [(0.0, 1.0), (60.0, 2.0), (0.0, 3.0), (0.0, 4.0), (0.0, 5.0)]
  start = time.monotonic()
  scores = pool.score(fns.sleepy, items)
  elapsed = time.monotonic() - start
  np.testing.assert_array_equal(scores.values, [1.0, 0.0, 3.0, 4.0, 5.0])
  assert (scores.timeouts, scores.errors) == (1, 0)
  assert 0.5 <= scores.seconds <= elapsed < 3.0  # about the limit, not the 60 s the call wanted
  # The killed worker was replaced: the pool is whole again.
  assert len(pool._workers) == 2 and pool.score(fns.square, [3.0, 4.0]).values.tolist() == [9.0, 16.0]


def test_crashing_calls_score_zero_and_the_pool_keeps_working(pool):
  items = [("ok", 1.0), ("raise", 2.0), ("exit", 3.0), ("nan", 4.0), ("ok", 5.0), ("exit", 6.0), ("ok", 7.0)]
  scores = pool.score(fns.flaky, items)
  np.testing.assert_array_equal(scores.values, [1.0, 0.0, 0.0, 0.0, 5.0, 0.0, 7.0])
  assert (scores.timeouts, scores.errors) == (0, 4)
  again = pool.score(fns.flaky, [("ok", 8.0)] * 4)  # replacements serve the next call
  assert again.values.tolist() == [8.0] * 4 and again.errors == 0
  assert pool.score(fns.flaky, [("raise", 0.0)]).errors == 1 and "verifier bug" in pool.last_error


def test_calls_run_in_other_processes_in_parallel():
  with VerifierPool(workers=2, timeout_s=5.0) as pool:
    pool.start()
    assert all(w.ready for w in pool._workers) and len(pool._workers) == 2
    pids = pool.score(fns.worker_pid, [0] * 4).values
    assert os.getpid() not in pids
    start = time.monotonic()
    assert pool.score(fns.sleepy, [(0.5, 1.0), (0.5, 1.0)]).values.tolist() == [1.0, 1.0]
    assert time.monotonic() - start < 0.95  # two 0.5 s calls side by side (one after the other: >= 1 s)
  assert not pool._workers  # closed


def test_unpicklable_functions_and_bad_sizes_are_refused():
  with pytest.raises(ValueError, match="workers >= 1 and timeout_s > 0"):
    VerifierPool(workers=0, timeout_s=1.0)
  with VerifierPool(workers=1, timeout_s=1.0) as pool, pytest.raises(TypeError, match="module-level function"):
    pool.score(lambda x: x, [1])
