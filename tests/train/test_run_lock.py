"""One run per run directory: a second live run is refused in one line, a crashed run's lock is taken over."""

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from jaxalign import run_lock
from jaxalign.config import ConfigError
from jaxalign.run_lock import RunDirBusy, RunLock


def write_lock(run_dir, **record):
  run_dir.mkdir(parents=True, exist_ok=True)
  record = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-12-02T05:10:33Z", **record}
  (run_dir / ".lock").write_text(json.dumps(record))
  return record


def dead_pid() -> int:
  """The pid of a process that has exited and been reaped."""
  child = subprocess.Popen([sys.executable, "-c", "pass"])
  child.wait()
  return child.pid


def lock_warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.name == "jaxalign.run_lock" and r.levelno >= logging.WARNING]


def test_the_lock_names_this_process_and_goes_on_exit(tmp_path):
  run_dir = tmp_path / "runs" / "x"
  with RunLock(run_dir):
    record = json.loads((run_dir / ".lock").read_text())
    assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())
    assert record["started"].endswith("Z")
  assert not (run_dir / ".lock").exists() and sorted(os.listdir(run_dir)) == []


def test_a_second_run_on_a_held_directory_is_refused_in_one_line(tmp_path):
  run_dir = tmp_path / "x"
  with RunLock(run_dir):
    held = (run_dir / ".lock").read_text()
    with pytest.raises(RunDirBusy) as error:
      RunLock(run_dir).acquire()
    assert (run_dir / ".lock").read_text() == held  # the refused run leaves the holder's lock alone
  message = str(error.value)
  assert message.startswith(f"{run_dir} is in use by pid {os.getpid()} on host {socket.gethostname()} since ")
  assert message.endswith(f"(a second run would interleave its checkpoints and metrics; remove {run_dir}/.lock if "
                          "that run is gone)")
  assert "\n" not in message and isinstance(error.value, ConfigError)


@pytest.mark.parametrize("holder", ["parent process", "pid 1", "another host"])
def test_a_lock_of_a_live_or_uncheckable_process_is_respected(tmp_path, holder):
  pid, host = {"parent process": (os.getppid(), None), "pid 1": (1, None),
               "another host": (dead_pid(), "node-7")}[holder]
  record = write_lock(tmp_path, pid=pid, **({"host": host} if host else {}))
  with pytest.raises(RunDirBusy, match=rf"^{tmp_path} is in use by pid {pid} on host {record['host']} since "
                                       r"2026-12-02 05:10 UTC \(a second run"):
    RunLock(tmp_path).acquire()
  assert json.loads((tmp_path / ".lock").read_text()) == record


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
  pid = dead_pid()
  write_lock(tmp_path, pid=pid)
  with RunLock(tmp_path):
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  [warning] = lock_warnings(caplog)
  assert warning == (f"{tmp_path}/.lock was left by pid {pid} on this host (since 2026-12-02 05:10 UTC), which is "
                     "no longer running: taking it over")
  assert not (tmp_path / ".lock").exists()


def test_a_lock_from_another_host_is_taken_over_once_its_heartbeat_stops(tmp_path, caplog, monkeypatch):
  write_lock(tmp_path, host="node-7", pid=4242)
  old = time.time() - run_lock.STALE_AFTER_S - 5
  os.utime(tmp_path / ".lock", (old, old))
  with RunLock(tmp_path):
    assert json.loads((tmp_path / ".lock").read_text())["host"] == socket.gethostname()
  assert lock_warnings(caplog) == [f"{tmp_path}/.lock was left by pid 4242 on host node-7 (since 2026-12-02 05:10 UTC), "
                                   f"not refreshed for {run_lock.STALE_AFTER_S:.0f} s: taking it over"]


def test_a_held_lock_is_refreshed_so_other_hosts_see_it_alive(tmp_path, monkeypatch):
  monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
  with RunLock(tmp_path):
    old = time.time() - 3600
    os.utime(tmp_path / ".lock", (old, old))
    time.sleep(0.3)
    assert time.time() - (tmp_path / ".lock").stat().st_mtime < 5


@pytest.mark.parametrize("content", ["", "{\"host\": \"h\", \"pi", "[1, 2]", '{"host": "h", "pid": 0, "started": "x"}'])
def test_a_lock_with_garbage_content_is_stale(tmp_path, caplog, content):
  (tmp_path / ".lock").write_text(content)
  with RunLock(tmp_path):
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  [warning] = lock_warnings(caplog)
  assert warning.startswith(f"{tmp_path}/.lock is unreadable (not a lock record: ") and "taking it over" in warning


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
  lock = RunLock(tmp_path)
  lock.acquire()
  other = write_lock(tmp_path, pid=os.getppid())  # e.g. taken over by another run meanwhile
  lock.release()
  assert json.loads((tmp_path / ".lock").read_text()) == other


def test_an_unwritable_run_dir_is_one_line(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(ConfigError, match=rf"^cannot lock run dir {tmp_path}/file/x: Not a directory "
                                        rf"\[Errno {errno.ENOTDIR}\]$"):
    RunLock(tmp_path / "file" / "x").acquire()
