"""`python -m jaxalign.eval` on tiny local models and the shared data: the task pipelines score known completions
as their definitions say, and a whole run writes its JSON, markdown, per-example records and plots."""

import json

import numpy as np
import pytest
from flax import nnx

from jaxalign.data import synthetic
from jaxalign.eval import policy as models
from jaxalign.eval import tasks
from jaxalign.eval.__main__ import main, parse
from jaxalign.models import CausalLM, ScalarModel, save_hf, tiny


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
  """A tiny random policy and reward model with the built-in digits tokenizer, saved as HF directories."""
  root = tmp_path_factory.mktemp("models")
  tokenizer = synthetic.digits_tokenizer()
  cfg = tiny("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
  save_hf(CausalLM(cfg, rngs=nnx.Rngs(0)), cfg, root / "policy", tokenizer=tokenizer)
  save_hf(ScalarModel(cfg, rngs=nnx.Rngs(1)), cfg, root / "rm", tokenizer=tokenizer)
  return root


def gsm8k(data_dir, tmp_path, n=6):
  """The first n GSM8K training problems as a prompt file, and their gold solutions."""
  rows = [json.loads(line) for line in (data_dir / "gsm8k/train.jsonl").read_text().splitlines()[:n]]
  path = tmp_path / "gsm8k.jsonl"
  path.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows))
  return path, [r["answer"] for r in rows]


def scripted(monkeypatch, completions):
  """Generation replaced by fixed completions (per call, in order), to test the scoring pipelines."""
  calls = iter(completions)
  monkeypatch.setattr(models, "complete", lambda loaded, prompts, cfg, **kw: next(calls)[:len(prompts)])


def test_math_task_scores_greedy_majority_and_pass_at_k(model_dirs, data_dir, tmp_path, monkeypatch):
  path, gold = gsm8k(data_dir, tmp_path)
  final = [g.split("####")[-1].strip() for g in gold]
  wrong = [str(int(f.replace(",", "")) + 1) for f in final]
  greedy = [f"The answer is #### {final[i] if i < 3 else wrong[i]}" for i in range(6)]  # 3 of 6 right
  # 3 samples: prompt i has i % 4 right ones -> pass@3 = 1 if any right; maj@3 right when 2+ right
  samples = [[f"#### {final[i] if j < i % 4 else wrong[i]}" for i in range(6)] for j in range(3)]
  scripted(monkeypatch, [greedy, *samples])
  cfg = parse(None, [f"policy={model_dirs / 'policy'}", "tasks=[math]", f"math.data=[{path}]",
                     "generation.samples=3", "verifier_workers=1", "bootstrap_resamples=200"])
  with tasks.VerifierPool(1, 10.0) as pool:
    result = tasks.math_accuracy(tasks.Context(cfg, models.load(cfg.policy), pool))
  hits = [i % 4 for i in range(6)]  # 0 1 2 3 0 1
  assert result.metrics["accuracy"].estimate == pytest.approx(0.5)
  assert result.metrics["pass@3"].estimate == pytest.approx(np.mean([h > 0 for h in hits]))
  assert result.metrics["maj@3"].estimate == pytest.approx(np.mean([h >= 2 for h in hits]))
  assert [r["correct"] for r in result.records] == [True] * 3 + [False] * 3


def test_ifeval_task_strict_and_loose(model_dirs, data_dir, monkeypatch):
  """A response that follows its instruction only once a markdown first line is removed passes loose, not strict."""
  record = next(r for r in map(json.loads, (data_dir / "ifeval/input_data.jsonl").read_text().splitlines())
                if r["instruction_id_list"] == ["punctuation:no_comma"])
  path = data_dir / "ifeval/input_data.jsonl"
  scripted(monkeypatch, [["Sure, here it is:\nNo commas in this text at all"]])
  cfg = parse(None, [f"policy={model_dirs / 'policy'}", "tasks=[ifeval]", f"ifeval.data=[{path}]",
                     "bootstrap_resamples=50"])
  monkeypatch.setattr(tasks, "examples", lambda task: tasks.parse_records([(record, "ifeval")], "prompt")[0])
  with tasks.VerifierPool(1, 10.0) as pool:
    result = tasks.ifeval_accuracy(tasks.Context(cfg, models.load(cfg.policy), pool))
  assert result.metrics["prompt_level/strict"].estimate == 0.0
  assert result.metrics["prompt_level/loose"].estimate == 1.0


def test_a_whole_run_writes_its_outputs_and_a_policy_ties_with_itself(model_dirs, data_dir, tmp_path, capsys):
  """Real generation with the tiny models: the policy against itself as baseline wins exactly half (every pair a
  tie), length-controlled too; rule metrics are in [0, 1]; the outputs are all written."""
  path, _ = gsm8k(data_dir, tmp_path, n=4)
  out = tmp_path / "out"
  code = main([f"policy={model_dirs / 'policy'}", f"baseline={model_dirs / 'policy'}",
               f"reward_model={model_dirs / 'rm'}", "tasks=[win_rate, rule]", f"win_rate.data=[{path}]",
               f"rule.data=[{path}]", "generation.max_new_tokens=4", "generation.batch_size=4",
               "bootstrap_resamples=100", f"output_dir={out}"])
  assert code == 0
  results = json.loads((out / "results.json").read_text())["metrics"]
  assert results["win_rate"]["win_rate"]["estimate"] == 0.5
  assert results["win_rate"]["lc_win_rate"]["estimate"] == pytest.approx(0.5)
  assert all(0.0 <= results["rule"][k]["estimate"] <= 1.0 for k in ("exact_match", "f1", "rougeL"))
  for name in ("report.md", "win_rate.jsonl", "win_rate.png", "rule.jsonl", "rule.png"):
    assert (out / name).stat().st_size > 0
  assert len((out / "rule.jsonl").read_text().splitlines()) == 4
  assert "| win_rate | win_rate | 0.5000 |" in capsys.readouterr().out


def test_config_errors_are_one_line(model_dirs, capsys):
  assert main(["tasks=[win_rate]", f"policy={model_dirs / 'policy'}", "win_rate.data=[x.jsonl]"]) == 2
  assert "win_rate needs baseline" in capsys.readouterr().err
  assert main([f"policy={model_dirs}/nothing", "tasks=[math]", "math.data=[x.jsonl]"]) == 2
  err = capsys.readouterr().err.strip()
  assert "neither an HF model directory" in err and "\n" not in err
