"""Resume semantics: a run_dir is continued only by the run that wrote it, never mixed with another."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.algorithms.step import StepFns
from jaxalign.checkpoint import Checkpointer
from jaxalign.config import ConfigError, to_dict
from jaxalign.resume import changed_keys, check_resumable
from jaxalign.trainer import TrainingError, build_run, train


def test_changes_that_alter_the_run_are_listed_and_refused(stage):
  saved = to_dict(stage())
  check_resumable(stage(log__every=7, checkpoint__every=3, mesh__fsdp=1, model__remat="full"), saved, "d")  # execution
  with pytest.raises(ConfigError, match=r"^d holds a run with another config: data.batch_size \(8 -> 4\), "
                                        r"optim.lr \(0.003 -> 1e-05\); .*checkpoint.allow_changes=\[data.batch_size,optim.lr\]"):
    check_resumable(stage(optim__lr=1e-5, data__batch_size=4), saved, "d")
  check_resumable(stage(steps=9, optim__lr=1e-5, checkpoint__allow_changes=["steps", "optim"]), saved, "d")
  with pytest.raises(ConfigError, match=r"another layout: model.param_dtype"):  # never allowed: the state would not fit
    check_resumable(stage(model__param_dtype="bfloat16", checkpoint__allow_changes=["model"]), saved, "d")


def test_keys_a_checkpoint_predates_are_not_changes_but_new_loss_parameters_are(stage):
  saved = to_dict(stage(algorithm="preference", loss__name="dpo", data__format="preference"))
  del saved["optim"]["max_consecutive_skips"]  # written by a version without the key
  now = to_dict(stage(algorithm="preference", loss__name="dpo", data__format="preference", loss__params={"beta": 0.3}))
  assert changed_keys(saved, now) == ["loss.params.beta"]


def rows(run_dir):
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_used_run_dir_is_resumed_only_by_its_own_config(stage, tmp_path, caplog):
  run_dir = tmp_path / "run"
  train(stage(steps=2))
  lrs = [r["train/lr"] for r in rows(run_dir) if "train/lr" in r]  # cosine to 0.1 lr over 2 updates
  np.testing.assert_allclose(lrs, [3e-3, 3e-3 * (0.1 + 0.45 * (1 + np.cos(np.pi / 2)))], rtol=1e-6)
  with pytest.raises(ConfigError, match=r"holds a run with another config: optim.lr \(0.003 -> 0.001\)"):
    train(stage(steps=2, optim__lr=1e-3))
  with pytest.raises(ConfigError, match=r"saved state has another layout: optim.mu_dtype \(None -> 'bfloat16'\)"):
    train(stage(steps=2, optim__mu_dtype="bfloat16", checkpoint__allow_changes=["optim"]))
  with pytest.raises(ConfigError, match=r"already holds a run \(checkpoints, metrics.jsonl\) and checkpoint.resume=false"):
    train(stage(steps=2, checkpoint__resume=False))
  with caplog.at_level(logging.INFO, logger="jaxalign"):
    again = train(stage(steps=2))  # the same config: the finished run says so and trains nothing
  assert "already finished (step 2 of 2); nothing to train" in caplog.text
  assert again["eval_after"] is not None and [r["step"] for r in rows(run_dir)] == [0, 1, 2, 2]

  longer = train(stage(steps=3, checkpoint__allow_changes=["steps"]))  # an allowed change continues the run
  assert [r["step"] for r in rows(run_dir) if "train/loss" in r] == [1, 2, 3] and longer["eval_before"] is None

  train(stage(steps=1, optim__lr=1e-3, checkpoint__overwrite=True))  # starts over: nothing of the old run is left
  assert [r["step"] for r in rows(run_dir)] == [0, 1, 1]
  assert sorted(os.listdir(run_dir / "checkpoints")) == ["1"]


def test_a_second_live_run_on_the_same_run_dir_is_refused(stage, tmp_path):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  (run_dir / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getppid(), "started": "2026-12-02T05:00:00Z"}))
  with pytest.raises(Exception, match=f"{run_dir} is in use by pid {os.getppid()}") as error:
    train(stage(steps=1))
  assert "\n" not in str(error.value) and not (run_dir / "checkpoints").exists()


def test_repeatedly_skipped_updates_stop_the_run(stage, tmp_path, monkeypatch):
  # A loss whose value is finite but whose gradient is NaN (d sqrt(0 * w) / dw): every update is skipped.
  original = StepFns.micro_loss

  def nan_gradient(self, trainable, *args):
    loss, metrics = original(self, trainable, *args)
    return loss + jnp.sqrt(0.0 * jnp.sum(jax.tree.leaves(trainable)[0])), metrics

  monkeypatch.setattr(StepFns, "micro_loss", nan_gradient)
  cfg = stage(steps=30, optim__max_consecutive_skips=3, checkpoint__every=1)
  with pytest.raises(TrainingError, match=r"^step 3: the last 3 updates were skipped for non-finite gradients "
                                          r"\(optim.max_consecutive_skips=3; .*\); last good checkpoint: step 2 in "):
    train(cfg)
  logged = [r for r in rows(tmp_path / "run") if "train/skipped_updates" in r]
  assert [r["train/skipped_updates"] for r in logged] == [1, 2, 3] and all(np.isfinite(r["train/loss"]) for r in logged)
  # The optimiser's schedule counts applied updates: with every one skipped, each step is still at update 0.
  np.testing.assert_allclose([r["train/lr"] for r in logged], 3e-3, rtol=1e-6)
  run = build_run(cfg)  # skipped updates left the weights as they were: the checkpoint holds the initial ones
  saved, _, _ = Checkpointer(tmp_path / "run/checkpoints").restore_latest(run.state)
  for a, b in zip(jax.tree.leaves(saved.trainable), jax.tree.leaves(run.state.trainable)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
