"""MetricsLogger: strict JSON rows, no duplicate rows or events after a resume, silent non-writing processes;
and a quiet command line."""

import json
import math
import pathlib
import struct
import subprocess
import sys
import time
import types

import numpy as np
from tensorboardX.proto import event_pb2

from jaxalign.logging import MetricsLogger


def _strict_rows(path: pathlib.Path) -> list[dict]:
  """Rows of a metrics.jsonl, parsed as strict JSON (NaN / Infinity tokens are an error)."""

  def refuse(token):
    raise ValueError(f"non-standard JSON constant {token}")

  return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_nan_and_inf_are_written_as_null(tmp_path):
  logger = MetricsLogger(tmp_path, 10, progress=False, tensorboard=False)
  values = logger.log(1, {"loss": float("nan"), "grad_norm": float("inf"), "kl": -math.inf, "reward": 0.5})
  logger.log(2, {"loss": 1.25}, "eval")
  logger.close()
  assert math.isnan(values["loss"])  # the caller still sees the NaN (the trainer stops on it)
  rows = _strict_rows(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[0]["train/loss"] is None and rows[0]["train/grad_norm"] is None and rows[0]["train/kl"] is None
  assert rows[0]["train/reward"] == 0.5 and rows[1]["eval/loss"] == 1.25


def test_resume_drops_replayed_rows_and_a_torn_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  first = [{"step": s, "time": s / 10, f"{p}/loss": float(s)} for s in range(7) for p in ("train", "eval")]
  first[4]["train/loss"] = float("nan")
  path.write_text("".join(json.dumps(r) + "\n" for r in first) + '{"step": 7, "ti')  # killed mid-write, bare NaN
  logger = MetricsLogger(tmp_path, 10, start_step=4, progress=False, tensorboard=False)
  assert not list(tmp_path.glob("*.tmp"))
  for step in (5, 6, 7):
    logger.log(step, {"loss": 100.0 + step})
  logger.close()
  rows = _strict_rows(path)
  assert rows[:10] == [dict(r, **{"train/loss": None}) if r is first[4] else r for r in first[:10]]  # steps <= 4
  assert [(r["step"], r["train/loss"]) for r in rows[10:]] == [(5, 105.0), (6, 106.0), (7, 107.0)]
  inode = path.stat().st_ino
  MetricsLogger(tmp_path, 10, start_step=7, progress=False, tensorboard=False).close()  # nothing to drop
  assert path.stat().st_ino == inode and len(_strict_rows(path)) == 13


def test_a_start_from_step_zero_replaces_an_abandoned_attempts_rows(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval/loss": 3.0}\n{"step": 3, "train/loss": 1.0}\n')
  logger = MetricsLogger(tmp_path, 10, progress=False, tensorboard=False)
  logger.log(1, {"loss": 2.0})
  logger.close()
  assert [r["step"] for r in _strict_rows(tmp_path / "metrics.jsonl")] == [1]


def test_non_writing_process_writes_and_prints_nothing(tmp_path, capsys):
  run_dir = tmp_path / "run"
  logger = MetricsLogger(run_dir, 10, start_step=2, progress=True, tensorboard=True, write=False)
  logger.advance()
  assert logger.log(3, {"loss": 0.5, "logits": [1.0, 2.0]}) == {"loss": 0.5}
  assert logger.log(3, {"accuracy": 1.0}, "eval") == {"accuracy": 1.0}
  logger.close()
  assert not run_dir.exists()
  assert capsys.readouterr() == ("", "")


def _scalar_events(directory: pathlib.Path) -> list[tuple[str, int, float]]:
  """(tag, step, value) as TensorBoard shows them: event files read in name order, and a SessionLog START at step s
  discards every earlier event of step >= s (tensorboard's EventAccumulator._CheckForRestartAndMaybePurge)."""
  shown = []
  for file in sorted(directory.glob("events.out.tfevents.*")):
    data = file.read_bytes()
    offset = 0
    while offset < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
      (length,) = struct.unpack_from("<Q", data, offset)
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        shown = [s for s in shown if s[1] < event.step]
      shown += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  return shown


def test_resumed_tensorboard_events_replace_the_replayed_steps(tmp_path):
  logger = MetricsLogger(tmp_path, 10, progress=False)
  for step in range(1, 7):
    logger.log(step, {"loss": float(step)})
  logger.log(6, {"accuracy": 0.5}, "eval")
  logger.close()
  time.sleep(1.05 - time.time() % 1)  # event files are named by the second (a same-second file would overwrite)
  logger = MetricsLogger(tmp_path, 10, start_step=4, progress=False)
  for step in (5, 6):
    logger.log(step, {"loss": 100.0 + step})
  logger.close()
  assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
  events = _scalar_events(tmp_path / "tensorboard")
  assert [(s, v) for tag, s, v in events if tag == "train/loss"] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 105), (6, 106)]
  assert not [e for e in events if e[0] == "eval/accuracy"]  # step 6's eval is redone by the resumed run


def test_command_line_help_prints_nothing_to_stderr_without_torch():
  """The runtime install has no torch: transformers' "PyTorch was not found" advice must not reach the user."""
  prelude = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['jaxalign.train', '--help']; "
             "runpy.run_module('jaxalign.train', run_name='__main__', alter_sys=True)")
  done = subprocess.run([sys.executable, "-c", prelude], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith("Command line: `python -m jaxalign.train")
  assert done.stderr == ""
  probe = "import sys; sys.modules['torch'] = None; import transformers; print(transformers.is_torch_available())"
  assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300).stdout == "False\n"


class _FakeWandb:
  """Records what the logger hands Weights & Biases (the service itself is not reachable from tests)."""

  def __init__(self):
    self.inits, self.rows, self.finished = [], [], 0
    self.util = types.SimpleNamespace(generate_id=lambda: f"run{len(self.inits)}")

  def init(self, **kwargs):
    self.inits.append(kwargs)
    return types.SimpleNamespace(log=lambda row, step: self.rows.append((step, row)),
                                 finish=lambda: setattr(self, "finished", self.finished + 1))


def test_wandb_gets_every_row_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  logger = MetricsLogger(tmp_path, 4, progress=False, tensorboard=False, wandb_project="proj", config={"seed": 3})
  logger.log(1, {"loss": 2.0, "vector": np.zeros(3)})
  logger.log(1, {"reward": 0.5}, "eval")
  logger.close()
  assert fake.rows == [(1, {"train/loss": 2.0}), (1, {"eval/reward": 0.5})] and fake.finished == 1
  assert fake.inits[0]["project"] == "proj" and fake.inits[0]["config"] == {"seed": 3}
  resumed = MetricsLogger(tmp_path, 4, start_step=2, progress=False, tensorboard=False, wandb_project="proj")
  resumed.close()
  assert fake.inits[1]["id"] == fake.inits[0]["id"] and fake.inits[1]["resume"] == "allow"
  assert not (tmp_path / "other").exists() and MetricsLogger(tmp_path / "other", 1, progress=False,
                                                              tensorboard=False).wandb is None
