"""Multi-process training as a cluster runs it: 2 processes x 2 CPU devices on loopback, one per "host".

The two-stage default (SFT, then DPO from its export) runs as 2 processes; once DPO has checkpointed, one
process is killed with SIGKILL (the launcher then tears down the other), and both are relaunched. Every
logged loss, before and after the crash, and the final held-out metrics of both stages must equal those of an
uninterrupted run of one process with 4 devices.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from jaxalign.train import main

# Small enough for CI, large enough that every stage checkpoints and resumes: 6 SFT steps, 6 DPO steps
# (remat off: pure recompute at this size).
ARGS = ["stages.0.steps=6", "stages.1.steps=6", "data.synthetic_size=[256, 64]", "eval_batches=1", "log.every=1",
        "log.progress=false", "log.tensorboard=false", "checkpoint.every=2", "mesh.data=1", "mesh.fsdp=4",
        "model.remat=none", "eval_reward=null"]  # greedy behaviour scoring runs in one process only


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(run_dir, log_dir, *, env_launch: bool):
  """Two processes of one job, given their rank by the CLI's keys or through JAX_* variables (as a launcher
  that exports them would)."""
  port = free_port()
  # No compilation cache: executables read back from it hang in cross-process (gloo) collectives on CPU.
  base = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  procs = []
  for rank in range(2):
    env = {**base, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"}
    args = [sys.executable, "-m", "jaxalign.train", *ARGS, f"run_dir={run_dir}"]
    if env_launch:
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank))
    else:
      args += [f"mesh.coordinator_address=127.0.0.1:{port}", "mesh.num_processes=2", f"mesh.process_id={rank}"]
    out = open(log_dir / f"rank{rank}.log", "w")
    procs.append(subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, text=True))
  return procs


def wait(procs, log_dir, timeout=420):
  for rank, p in enumerate(procs):
    assert p.wait(timeout=timeout) == 0, (log_dir / f"rank{rank}.log").read_text()[-3000:]


def rows(run_dir, stage):
  return [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir, stage):
  steps = [r["step"] for r in rows(run_dir, stage) if "train/loss" in r]
  assert steps == sorted(set(steps)), f"duplicate or unordered rows in {stage}: {steps}"
  return {r["step"]: r["train/loss"] for r in rows(run_dir, stage) if "train/loss" in r}


def final_eval(run_dir, stage):
  return [r for r in rows(run_dir, stage) if any(k.startswith("eval/") for k in r)][-1]


def test_two_processes_killed_and_relaunched_train_like_one(tmp_path, capsys):
  assert main([*ARGS, f"run_dir={tmp_path / 'one'}"]) == 0  # one process, 4 of its devices, uninterrupted
  capsys.readouterr()
  logs, two = tmp_path / "logs", tmp_path / "two"
  logs.mkdir()
  procs = launch(two, logs, env_launch=False)
  deadline = time.time() + 420
  while not (two / "dpo/checkpoints/2").is_dir():
    assert time.time() < deadline and all(p.poll() is None for p in procs), (logs / "rank0.log").read_text()[-3000:]
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGKILL)  # a node fails; the launcher kills the rest of the job
  procs[0].send_signal(signal.SIGKILL)
  for p in procs:
    p.wait()
  assert (two / "sft/hf/model.safetensors").exists() and not (two / "dpo/hf").exists()

  wait(launch(two, logs, env_launch=True), logs)  # relaunched, this time through JAX_* variables
  assert re.search(r"resumed from step [24] in \S+/dpo/checkpoints", (logs / "rank0.log").read_text())
  for stage, steps in (("sft", 6), ("dpo", 6)):
    want, got = losses(tmp_path / "one", stage), losses(two, stage)
    assert sorted(got) == list(range(1, steps + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=2e-5)
    a, b = final_eval(tmp_path / "one", stage), final_eval(two, stage)
    keys = sorted(k for k in a if k.startswith("eval/"))
    np.testing.assert_allclose([b[k] for k in keys], [a[k] for k in keys], rtol=2e-5)
  assert (two / "dpo/hf/model.safetensors").exists()
