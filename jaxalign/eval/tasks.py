"""The evaluation tasks. Each reads its prompts, generates with the policy, scores, and returns a `Result`: its
metrics (point estimates with bootstrap confidence intervals) and one record per example."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxalign.data.formats import Example, parse_records
from jaxalign.data.readers import read_records
from jaxalign.eval import judge as judging
from jaxalign.eval import metrics as stats
from jaxalign.eval import policy as models
from jaxalign.eval.config import EvalConfig, TaskData
from jaxalign.verifiers import ifeval, math, registry
from jaxalign.verifiers.pool import VerifierPool


@dataclasses.dataclass
class Result:
  """A task's metrics ({name: Interval or float}) and per-example records."""

  metrics: dict
  records: list[dict]


@dataclasses.dataclass
class Context:
  """What every task may use: the config, the loaded models and the verifier pool."""

  cfg: EvalConfig
  policy: models.Loaded
  pool: VerifierPool
  baseline: models.Loaded | None = None
  reward_model: models.Loaded | None = None
  judge: models.Loaded | None = None

  def interval(self, values) -> stats.Interval:
    return stats.bootstrap_ci(np.asarray(values, np.float64), confidence=self.cfg.confidence,
                              resamples=self.cfg.bootstrap_resamples, seed=self.cfg.seed)

  def greedy(self, loaded: models.Loaded, prompts: list, desc: str) -> list[str]:
    g = self.cfg.generation
    cfg = models.sampling(loaded, g.max_new_tokens, g.temperature, g.top_p)
    return models.complete(loaded, prompts, cfg, batch_size=g.batch_size, seed=self.cfg.seed, desc=desc)

  def verify(self, name: str, completions: list[str], answers: list[str]) -> np.ndarray:
    """`registry.VERIFIERS[name]` on each (completion, answer) in the pool: a hung or crashing call scores 0."""
    return self.pool.score(registry.call, [(name, c, a) for c, a in zip(completions, answers)]).values


def examples(task: TaskData) -> list[Example]:
  """The task's prompts ("prompt" format), the first `limit` of its sources' examples in order."""
  out = []
  for source in task.data:
    out += parse_records(read_records(source), "prompt")[0]
  return out[:task.limit] if task.limit else out


def win_rate(ctx: Context) -> Result:
  """Reward-model win rate of the policy's greedy completions against the baseline's on the same prompts (ties
  half), and AlpacaEval 2's length-controlled win rate (lengths in characters)."""
  prompts = [e.prompt for e in examples(ctx.cfg.win_rate)]
  ours, theirs = ctx.greedy(ctx.policy, prompts, "policy"), ctx.greedy(ctx.baseline, prompts, "baseline")
  batch = ctx.cfg.generation.batch_size
  s_ours = models.reward_scores(ctx.reward_model, prompts, ours, batch_size=batch)
  s_theirs = models.reward_scores(ctx.reward_model, prompts, theirs, batch_size=batch)
  outcomes = stats.preference_outcomes(s_ours, s_theirs)
  kw = dict(confidence=ctx.cfg.confidence, resamples=ctx.cfg.bootstrap_resamples, seed=ctx.cfg.seed)
  lc = stats.length_controlled_win_rate(outcomes, [len(c) for c in ours], [len(c) for c in theirs], l2=1e-3, **kw)
  metrics = {"win_rate": stats.win_rate_from_outcomes(outcomes, **kw),
             "lc_win_rate": stats.Interval(lc.win_rate, lc.low, lc.high),
             "reward/policy": ctx.interval(s_ours), "reward/baseline": ctx.interval(s_theirs),
             "length/policy": float(np.mean([len(c) for c in ours])),
             "length/baseline": float(np.mean([len(c) for c in theirs]))}
  records = [{"prompt": p, "policy": a, "baseline": b, "reward_policy": float(x), "reward_baseline": float(y)}
             for p, a, b, x, y in zip(prompts, ours, theirs, s_ours, s_theirs)]
  return Result(metrics, records)


def judged(ctx: Context) -> Result:
  """Pairwise LLM-as-judge of the policy against the baseline in both orders (`eval.judge`): the win rate of the
  debiased verdicts (a win only when both orders agree; ties half), the raw win rate with the policy shown first,
  and the judge's position bias (its consistency across orders, the first position's share of wins)."""
  prompts = [e.prompt for e in examples(ctx.cfg.judge)]
  ours, theirs = ctx.greedy(ctx.policy, prompts, "policy"), ctx.greedy(ctx.baseline, prompts, "baseline")
  questions = [judging.question_text(p) for p in prompts]
  a_first, b_first = judging.pairwise(ctx.judge, questions, ours, theirs, batch_size=ctx.cfg.generation.batch_size)
  bias = stats.position_bias(a_first, b_first)
  kw = dict(confidence=ctx.cfg.confidence, resamples=ctx.cfg.bootstrap_resamples, seed=ctx.cfg.seed)
  metrics = {"win_rate": stats.win_rate_from_outcomes(bias.outcomes, **kw),
             "win_rate/policy_first": stats.win_rate_from_outcomes(a_first, **kw),
             "consistency": bias.consistency, "first_position_win_rate": bias.first_position_win_rate}
  records = [{"prompt": p, "policy": a, "baseline": b, "verdict_policy_first": float(x),
              "verdict_baseline_first": float(y)} for p, a, b, x, y in zip(prompts, ours, theirs, a_first, b_first)]
  return Result(metrics, records)


def graded(ctx: Context) -> Result:
  """Single-answer grading of the policy's greedy completions: the judge's expected 1-5 rating, reference-guided
  (each example's answer as the reference) with grade_with_reference."""
  data = examples(ctx.cfg.grade)
  prompts = [e.prompt for e in data]
  completions = ctx.greedy(ctx.policy, prompts, "policy")
  references = [e.answer or "" for e in data] if ctx.cfg.grade_with_reference else None
  scores = judging.ratings(ctx.judge, [judging.question_text(p) for p in prompts], completions, references,
                           batch_size=ctx.cfg.generation.batch_size)
  records = [{"prompt": p, "completion": c, "rating": float(r)} for p, c, r in zip(prompts, completions, scores)]
  return Result({"rating": ctx.interval(scores)}, records)


def math_accuracy(ctx: Context) -> Result:
  """Greedy accuracy (pass@1) with Math-Verify against each example's answer; with generation.samples = k > 1,
  also maj@k (the most frequent answer of k samples, Math-Verify's canonical form) and pass@k (Chen et al.'s
  unbiased estimator with n = k)."""
  data = examples(ctx.cfg.math)
  prompts, answers = [e.prompt for e in data], [e.answer or "" for e in data]
  greedy = ctx.greedy(ctx.policy, prompts, "math")
  correct = ctx.verify("math_verify", greedy, answers)
  metrics = {"accuracy": ctx.interval(correct)}
  records = [{"prompt": p, "answer": a, "completion": c, "correct": bool(x)}
             for p, a, c, x in zip(prompts, answers, greedy, correct)]
  k = ctx.cfg.generation.samples
  if k > 1:
    g = ctx.cfg.generation
    cfg = models.sampling(ctx.policy, g.max_new_tokens, g.sample_temperature, g.top_p)
    samples = [models.complete(ctx.policy, prompts, cfg, batch_size=g.batch_size, seed=ctx.cfg.seed + 1 + j,
                               desc=f"sample {j + 1}/{k}") for j in range(k)]
    by_prompt = [[samples[j][i] for j in range(k)] for i in range(len(prompts))]
    right = ctx.verify("math_verify", [c for row in by_prompt for c in row],
                       [a for a in answers for _ in range(k)]).reshape(len(prompts), k) > 0
    vote = stats.majority_vote([[math.canonical_answer(c) for c in row] for row in by_prompt], right.tolist())
    metrics[f"maj@{k}"] = ctx.interval(np.asarray(vote.correct, np.float64))
    metrics[f"pass@{k}"] = ctx.interval(stats.pass_at_k(k, right.sum(axis=1), k))
    for record, row, hits in zip(records, by_prompt, right):
      record.update(samples=row, samples_correct=hits.tolist())
  return Result(metrics, records)


def ifeval_accuracy(ctx: Context) -> Result:
  """IFEval (Zhou et al. 2023): prompt-level accuracy (every instruction followed) and instruction-level
  accuracy, strict and loose (the response with its first / last line or markdown asterisks removed)."""
  data = examples(ctx.cfg.ifeval)
  prompts, answers = [e.prompt for e in data], [e.answer or "" for e in data]
  greedy = ctx.greedy(ctx.policy, prompts, "ifeval")
  metrics, records = {}, [{"prompt": p, "completion": c} for p, c in zip(prompts, greedy)]
  for mode in ("strict", "loose"):
    prompt_level = ctx.verify(f"ifeval_{mode}", greedy, answers)
    per_instruction = [ifeval.follows(*ifeval.decode(a), c, loose=mode == "loose") for c, a in zip(greedy, answers)]
    metrics[f"prompt_level/{mode}"] = ctx.interval(prompt_level)
    metrics[f"instruction_level/{mode}"] = ctx.interval([x for row in per_instruction for x in row])
    for record, hits in zip(records, per_instruction):
      record[mode] = hits
  return Result(metrics, records)


def rule_scores(ctx: Context) -> Result:
  """Exact match, token F1 (SQuAD's normalisation) and ROUGE-L of the greedy completion against the answer."""
  data = examples(ctx.cfg.rule)
  prompts, answers = [e.prompt for e in data], [e.answer or "" for e in data]
  greedy = ctx.greedy(ctx.policy, prompts, "rule")
  scores = {"exact_match": stats.exact_match(greedy, answers), "f1": stats.token_f1(greedy, answers),
            "rougeL": stats.rouge_l(greedy, answers)}
  records = [{"prompt": p, "answer": a, "completion": c, **{k: float(v[i]) for k, v in scores.items()}}
             for i, (p, a, c) in enumerate(zip(prompts, answers, greedy))]
  return Result({k: ctx.interval(v) for k, v in scores.items()}, records)


TASK_FNS = {"win_rate": win_rate, "judge": judged, "grade": graded, "math": math_accuracy, "ifeval": ifeval_accuracy,
            "rule": rule_scores}
