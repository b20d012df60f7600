"""The training loop end to end: resume, crash safety, meshes, accumulation, CLI errors, recipes."""

import json

import jax
import numpy as np
import pytest

from jaxalign.algorithms.step import make_train_step
from jaxalign.data.pipeline import Batches
from jaxalign.models import load_hf
from jaxalign.train import main
from jaxalign.trainer import build_run, put_batch, stack_micro_batches, train


def losses_by_step(run_dir):
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_resume_after_a_crash_continues_exactly(stage, tmp_path, monkeypatch):
  kw = dict(algorithm="preference", loss__name="dpo", data__format="preference", steps=6, checkpoint__every=2)
  full = train(stage(run_dir=str(tmp_path / "full"), **kw))
  assert full["eval_after"]["loss"] < full["eval_before"]["loss"]

  calls = {"n": 0}
  original = Batches.__next__

  def crash_at_fifth(self):
    calls["n"] += self.shuffle  # count training batches only (eval batches are not shuffled)
    if calls["n"] == 5 and self.shuffle:
      raise KeyboardInterrupt("simulated crash")
    return original(self)

  monkeypatch.setattr(Batches, "__next__", crash_at_fifth)
  with pytest.raises(KeyboardInterrupt):
    train(stage(run_dir=str(tmp_path / "resumed"), **kw))
  assert (tmp_path / "resumed/checkpoints/4").is_dir()  # saved on the way out
  monkeypatch.setattr(Batches, "__next__", original)
  train(stage(run_dir=str(tmp_path / "resumed"), **kw))
  expected, got = losses_by_step(tmp_path / "full"), losses_by_step(tmp_path / "resumed")
  for step in (5, 6):
    np.testing.assert_allclose(got[step], expected[step], rtol=1e-5)


def one_step_params(cfg):
  run = build_run(cfg)
  micro = stack_micro_batches([next(run.train_data) for _ in range(cfg.optim.grad_accum)])
  state, metrics = jax.jit(make_train_step(run.fns))(run.state, put_batch(micro, run.mesh, cfg.mesh.rules, 1),
                                                     run.frozen)
  return jax.tree.map(np.asarray, state.trainable), float(metrics["loss"]), float(metrics["grad_norm"])


@pytest.mark.parametrize("algorithm,loss,fmt", [("sft", "sft", "sft"), ("preference", "cpo", "preference")])
def test_gradient_accumulation_equals_one_large_batch(stage, algorithm, loss, fmt):
  kw = dict(algorithm=algorithm, loss__name=loss, data__format=fmt, data__shuffle=False, optim__max_grad_norm=0.0)
  big, loss_big, norm_big = one_step_params(stage(data__batch_size=8, **kw))
  small, loss_small, norm_small = one_step_params(stage(data__batch_size=4, optim__grad_accum=2, **kw))
  np.testing.assert_allclose(loss_small, loss_big, rtol=1e-5)
  np.testing.assert_allclose(norm_small, norm_big, rtol=1e-5)  # the gradient itself, before Adam's rescaling
  for a, b in zip(jax.tree.leaves(small), jax.tree.leaves(big)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_one_device_and_eight_device_meshes_agree(stage, tmp_path):
  kw = dict(algorithm="preference", loss__name="dpo", data__format="preference", steps=3)
  one = train(stage(run_dir=str(tmp_path / "one"), mesh__data=1, mesh__fsdp=1, mesh__tensor=1, **kw))
  eight = train(stage(run_dir=str(tmp_path / "eight"), mesh__data=2, mesh__fsdp=2, mesh__tensor=2, **kw))
  a, b = losses_by_step(tmp_path / "one"), losses_by_step(tmp_path / "eight")
  np.testing.assert_allclose([b[s] for s in (1, 2, 3)], [a[s] for s in (1, 2, 3)], rtol=1e-4)
  np.testing.assert_allclose(eight["eval_after"]["loss"], one["eval_after"]["loss"], rtol=1e-4)


def test_default_pipeline_exports_models(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  assert main(["stages.0.steps=30", "stages.1.steps=10", "log.progress=false", "data.synthetic_size=[256, 64]"]) == 0
  out = capsys.readouterr().out
  assert "| dpo | rewards/accuracies |" in out and "| dpo | behaviour/sort_exact |" in out
  model, cfg = load_hf(tmp_path / "runs/default/dpo/hf")
  assert cfg.vocab_size == 32 and (tmp_path / "runs/default/dpo/hf/tokenizer.json").exists()


def run_cli(args, capsys):
  code = main(args)
  err = capsys.readouterr().err.strip()
  assert code == 2 and "\n" not in err, err
  return err


def test_cli_errors_are_one_line(tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
  base = ["log.progress=false", "steps=1", f"run_dir={tmp_path / 'r'}"]
  cfg = tmp_path / "one.yaml"
  cfg.write_text("algorithm: sft\nloss: {name: sft}\ndata: {format: sft}\n")
  assert "bad.jsonl:2: malformed JSON" in run_cli(["--config", str(cfg), f"data.train=[{bad}]", *base], capsys)
  missing = tmp_path / "missing.jsonl"
  missing.write_text('{"prompt": "a"}\n')
  assert "missing.jsonl:1: missing field 'completion'" in run_cli(
    ["--config", str(cfg), f"data.train=[{missing}]", *base], capsys)
  assert "config key 'optim.learning_rate' is unknown" in run_cli(
    ["--config", str(cfg), "optim.learning_rate=1", *base], capsys)
  assert "eval_reward='sort_exactly'" in run_cli(["--config", str(cfg), "eval_reward=sort_exactly", *base], capsys)
  good = tmp_path / "good.jsonl"
  good.write_text('{"prompt": "a", "completion": "b"}\n' * 40)
  assert "name data.eval to score held-out prompts" in run_cli(
    ["--config", str(cfg), f"data.train=[{good}]", "eval_reward=sort_exact", *base], capsys)


def test_unwritable_run_dir_and_interrupted_save_are_one_line(tmp_path, capsys, monkeypatch):
  from jaxalign.checkpoint import Checkpointer

  cfg = tmp_path / "one.yaml"
  cfg.write_text("algorithm: sft\nloss: {name: sft}\ndata: {format: sft, synthetic_size: [64, 16], batch_size: 8}\n"
                 "steps: 2\nlog: {progress: false, tensorboard: false}\ncheckpoint: {export_hf: false}\n"
                 "model: {vocab_size: 24, hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 2, "
                 "num_kv_heads: 1, max_position_embeddings: 32, remat: none}\n")
  (tmp_path / "file").write_text("")  # a run_dir that cannot be created (tests run as root: chmod would not stop them)
  assert "cannot lock run dir" in run_cli(["--config", str(cfg), f"run_dir={tmp_path / 'file/run'}"], capsys)

  original = Checkpointer.save
  def interrupted(self, step, *args, **kwargs):  # Ctrl-C in the middle of the final save, once
    monkeypatch.setattr(Checkpointer, "save", original)
    raise KeyboardInterrupt
  monkeypatch.setattr(Checkpointer, "save", interrupted)
  assert main(["--config", str(cfg), f"run_dir={tmp_path / 'run'}"]) == 130
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: interrupted") and "\n" not in err, err
  assert (tmp_path / "run/checkpoints/1").is_dir()  # the state was saved on the way out, and a rerun resumes it
  assert main(["--config", str(cfg), f"run_dir={tmp_path / 'run'}"]) == 0
  assert Checkpointer(tmp_path / "run/checkpoints").latest_step() == 2


def test_vocab_mismatch_is_a_clear_error(tmp_path, capsys, data_dir):
  cfg = tmp_path / "one.yaml"
  cfg.write_text(f"algorithm: sft\nloss: {{name: sft}}\ndata: {{format: sft}}\nsteps: 1\n"
                 f"tokenizer: {data_dir / 'tokenizers/gpt2/tokenizer.json'}\nmodel: {{vocab_size: 1000}}\n")
  err = run_cli(["--config", str(cfg), f"run_dir={tmp_path / 'r'}"], capsys)
  assert "has 50257 tokens but the model's vocab_size is 1000" in err


def test_hh_rlhf_dpo_recipe_runs_on_the_real_data(tmp_path, data_dir, capsys):
  hh = data_dir / "hh_rlhf"
  code = main(["--config", "configs/hh_dpo_gpt2.yaml", "steps=2", "eval_batches=1", "log.progress=false",
               f"run_dir={tmp_path / 'hh'}", f"tokenizer={data_dir / 'tokenizers/gpt2/tokenizer.json'}",
               f"data.train=[{hh / 'harmless-base/test.jsonl.gz'}]", f"data.eval=[{hh / 'helpful-base/test.jsonl.gz'}]",
               "data.limit=64", "data.batch_size=4", "data.max_length=128", "data.max_prompt_length=96",
               "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=2",
               "model.num_kv_heads=1", "checkpoint.export_hf=false", "mesh.fsdp=1"])
  assert code == 0, capsys.readouterr().err
  assert "| dpo-hh | rewards/accuracies |" in capsys.readouterr().out


def test_nan_loss_stops_with_a_clear_error_and_keeps_finite_checkpoints(stage, tmp_path):
  from jaxalign.checkpoint import Checkpointer
  from jaxalign.trainer import TrainingError

  cfg = stage(algorithm="sft", loss__name="sft", steps=8, optim__lr=1e30, optim__max_grad_norm=0.0,
              checkpoint__every=1, run_dir=str(tmp_path / "nan"))
  with pytest.raises(TrainingError, match=r"step \d+: the last 5 updates were skipped for non-finite gradients, "
                                          r"loss nan \(optim.max_consecutive_skips=5; .*\); last good checkpoint: "):
    train(cfg)
  run = build_run(cfg)
  ckpt = Checkpointer(tmp_path / "nan/checkpoints")
  state, _ = ckpt.restore(run.state)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.trainable))
