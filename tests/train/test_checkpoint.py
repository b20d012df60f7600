"""Checkpoints that fail: an unreadable newest step falls back to the previous one, a failed or interrupted save
loses nothing and leaves nothing half-written, and every failure is one line naming the directory."""

import errno
import logging
import os
import resource
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils.epath import backend as epath_backend

from jaxalign.algorithms.step import TrainState
from jaxalign.checkpoint import Checkpointer, CheckpointError


def state_at(step: int, shape=(3, 4)) -> TrainState:
  """A small TrainState whose every array differs from step to step."""
  key = jax.random.key(step)
  return TrainState(trainable={"w": jax.random.normal(key, shape), "b": jnp.full((4,), step, jnp.bfloat16)},
                    opt_state=(jnp.arange(2.0) + step,), step=jnp.array(step, jnp.int32), rng=jax.random.key_data(key))


def assert_same(a: TrainState, b: TrainState) -> None:
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a._asdict(), b._asdict())


@pytest.fixture
def saved(tmp_path):
  """A directory with steps 2, 4 and 6 saved (keep=3)."""
  directory = tmp_path / "checkpoints"
  ckpt = Checkpointer(directory, keep=3, every=2)
  for step in (2, 4, 6):
    assert ckpt.save(step, state_at(step), {"step": step})
  ckpt.close()
  return directory


def warnings_of(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.name == "jaxalign.checkpoint" and r.levelno >= logging.WARNING]


def truncate_array_file(step_dir):
  """Halve the biggest file of the step's array store (state/d/: the arrays orbax reads)."""
  path = max((step_dir / "state" / "d").iterdir(), key=lambda p: p.stat().st_size)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  return f"cannot read state/d/{path.name}: Requested byte range"


def remove_state(step_dir):
  shutil.rmtree(step_dir / "state")
  return "missing state/"


def corrupt_meta(step_dir):
  (step_dir / "meta" / "metadata").write_text('{"step": 6, "da')
  return "meta/metadata is truncated or not JSON"


@pytest.mark.parametrize("damage", [truncate_array_file, remove_state, corrupt_meta])
def test_an_unreadable_newest_step_falls_back_to_the_previous_one(saved, damage, caplog):
  reason = damage(saved / "6")
  ckpt = Checkpointer(saved, keep=3, every=2)
  state, meta, step = ckpt.restore_latest(state_at(0))
  assert (step, meta) == (4, {"step": 4})
  assert_same(state, state_at(4))
  [warning] = warnings_of(caplog)
  assert warning.startswith(f"checkpoint step 6 in {saved} is unreadable ({reason}") and "\n" not in warning
  assert warning.endswith("): falling back to step 4; moved it to corrupt-6")
  # Set aside: a new step 6 takes its place, and keep-N rotation counts only readable steps.
  assert sorted(os.listdir(saved)) == ["2", "4", "corrupt-6"] and ckpt.latest_step() == 4
  assert ckpt.save(6, state_at(60), {"step": 60}) and ckpt.save(8, state_at(8), {"step": 8})
  assert sorted(os.listdir(saved)) == ["4", "6", "8", "corrupt-6"]
  assert_same(ckpt.restore(state_at(0), step=6)[0], state_at(60))
  ckpt.close()


def test_metadata_skips_an_unreadable_step_and_warns_once(saved, caplog):
  corrupt_meta(saved / "6")
  ckpt = Checkpointer(saved, keep=3, every=2)
  assert ckpt.metadata() == {"step": 4}  # what the trainer checks the config against before building the run
  assert ckpt.restore_latest(state_at(0))[2] == 4
  assert len(warnings_of(caplog)) == 1  # metadata() and restore_latest() report step 6 once
  with pytest.raises(CheckpointError, match=r"^checkpoint step 4 in .* is unreadable \(missing meta/\)$"):
    shutil.rmtree(saved / "4" / "meta")
    ckpt.metadata(4)
  ckpt.close()


def test_no_readable_step_is_one_line_naming_the_directory_and_moves_nothing(saved):
  for step in (2, 4, 6):
    truncate_array_file(saved / str(step))
  ckpt = Checkpointer(saved, keep=3, every=2)
  with pytest.raises(CheckpointError) as error:
    ckpt.restore_latest(state_at(0))
  message = str(error.value)
  assert message.startswith(f"no readable checkpoint in {saved} (step 6: cannot read state/d/") and "\n" not in message
  assert "step 4: " in message and "step 2: " in message
  assert sorted(os.listdir(saved)) == ["2", "4", "6"]


def test_a_state_of_another_layout_is_reported_not_set_aside(saved):
  """A wrong target (e.g. another LoRA rank) fails on every step alike: one line, and no step is renamed."""
  ckpt = Checkpointer(saved, keep=3, every=2)
  with pytest.raises(CheckpointError, match=r"^no readable checkpoint in .* \(steps 6, 4, 2: Requested shape: "
                                            r"\(3, 5\) is not compatible with the stored shape: \(3, 4\)\)$"):
    ckpt.restore_latest(state_at(0, shape=(3, 5)))
  assert sorted(os.listdir(saved)) == ["2", "4", "6"]


def test_check_sees_the_metadata_first_and_its_error_propagates(saved):
  remove_state(saved / "6")
  ckpt = Checkpointer(saved, keep=3, every=2)
  seen = []
  assert ckpt.restore_latest(state_at(0), check=seen.append)[2] == 4
  assert seen == [{"step": 6}, {"step": 4}]

  def refuse(meta):
    raise ValueError(f"config differs at step {meta['step']}")

  with pytest.raises(ValueError, match="config differs at step 4"):
    ckpt.restore_latest(state_at(0), check=refuse)
  assert Checkpointer(saved / "empty").restore_latest(state_at(0)) is None  # no checkpoint at all


def fail_writes_under(monkeypatch, directory, error):
  """Make every Python-level file write under `directory` (orbax's JSON files: the metadata, the step's
  _CHECKPOINT_METADATA) raise `error`, as a full or read-only disk would; returns the paths it refused."""
  refused, real_open = [], open

  def open_(path, mode="r", *args, **kwargs):
    if any(m in mode for m in "wax") and str(path).startswith(str(directory)):
      refused.append(str(path))
      raise error
    return real_open(path, mode, *args, **kwargs)

  monkeypatch.setattr(epath_backend, "open", open_, raising=False)  # etils' local backend calls the builtin
  return refused


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failed_save_is_one_line_and_loses_nothing(saved, monkeypatch, code):
  ckpt = Checkpointer(saved, keep=3, every=2)
  refused = fail_writes_under(monkeypatch, saved, OSError(code, os.strerror(code)))
  with pytest.raises(CheckpointError) as error:
    ckpt.save(8, state_at(8), {"step": 8})
  monkeypatch.undo()
  assert str(error.value) == f"cannot write checkpoint step 8 to {saved}: {os.strerror(code)} [Errno {code}]"
  assert any(".orbax-checkpoint-tmp" in path for path in refused)  # it failed half-way through the step
  assert sorted(os.listdir(saved)) == ["2", "4", "6"]  # no partial directory, no step rotated out
  assert ckpt.latest_step() == 6
  assert_same(ckpt.restore_latest(state_at(0))[0], state_at(6))
  assert Checkpointer(saved, keep=3, every=2).latest_step() == 6
  assert ckpt.save(8, state_at(8), {"step": 8})  # the same Checkpointer saves again once the disk has room
  assert sorted(os.listdir(saved)) == ["4", "6", "8"]


def test_a_failed_array_write_names_the_os_error(saved):
  """The arrays are written by tensorstore (C++): its OS error arrives inside a ValueError's message. A file size
  limit makes that write fail for real (EFBIG), as a full disk would with ENOSPC."""
  ckpt = Checkpointer(saved, keep=3, every=2)
  big = state_at(8)._replace(trainable={"w": jax.random.normal(jax.random.key(8), (256, 256))})  # 256 KiB, random
  limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
  try:
    with pytest.raises(CheckpointError) as error:
      ckpt.save(8, big, {"step": 8})
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, handler)
  assert str(error.value) == f"cannot write checkpoint step 8 to {saved}: File too large [Errno {errno.EFBIG}]"
  assert sorted(os.listdir(saved)) == ["2", "4", "6"] and ckpt.latest_step() == 6


def test_an_interrupted_save_keeps_the_previous_checkpoint(saved, monkeypatch):
  ckpt = Checkpointer(saved, keep=3, every=2)
  refused = fail_writes_under(monkeypatch, saved, KeyboardInterrupt())
  with pytest.raises(KeyboardInterrupt):
    ckpt.save(8, state_at(8), {"step": 8})
  monkeypatch.undo()
  assert any(".orbax-checkpoint-tmp" in path for path in refused)
  assert sorted(os.listdir(saved)) == ["2", "4", "6"] and ckpt.latest_step() == 6
  state, meta, step = Checkpointer(saved, keep=3, every=2).restore_latest(state_at(0))
  assert (step, meta) == (6, {"step": 6})
  assert_same(state, state_at(6))


def test_a_save_left_half_done_by_a_killed_run_is_not_a_checkpoint(saved):
  partial = saved / "8.orbax-checkpoint-tmp"
  shutil.copytree(saved / "6", partial)
  (partial / "meta" / "metadata").write_text("{")
  Checkpointer(saved, keep=3, every=2)  # a reader (an eval job, a notebook) never touches a live run's save
  assert partial.exists()
  ckpt = Checkpointer(saved, keep=3, every=2, clean=True)  # the run holding the lock removes it
  assert ckpt.latest_step() == 6 and not partial.exists()
  assert ckpt.save(8, state_at(8), {"step": 8})
  assert_same(ckpt.restore_latest(state_at(0))[0], state_at(8))


def test_an_unwritable_checkpoint_directory_is_one_line(tmp_path, monkeypatch):
  (tmp_path / "file").write_text("")
  with pytest.raises(CheckpointError, match=rf"^cannot write checkpoints to {tmp_path}/file/run/checkpoints: "
                                            rf"Not a directory \[Errno {errno.ENOTDIR}\]$"):
    Checkpointer(tmp_path / "file" / "run" / "checkpoints")

  real_open = os.open

  def read_only(path, flags, *args, **kwargs):
    if flags & os.O_CREAT and str(path).startswith(str(tmp_path)):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    return real_open(path, flags, *args, **kwargs)

  monkeypatch.setattr(os, "open", read_only)
  with pytest.raises(CheckpointError, match=rf"^cannot write checkpoints to {tmp_path}/ro: "
                                            rf"Read-only file system \[Errno {errno.EROFS}\]$"):
    Checkpointer(tmp_path / "ro")
