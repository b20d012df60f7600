"""The evaluation config: which policy, against what, on which tasks (`python -m jaxalign.eval`)."""

from __future__ import annotations

import dataclasses

from jaxalign.sharding import MeshConfig

TASKS = ("win_rate", "judge", "grade", "math", "ifeval", "rule")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """How completions are generated (greedy unless temperature > 0); `samples` > 1 also draws that many sampled
  completions per prompt at `sample_temperature` (maj@k / pass@k of the verified tasks)."""

  max_new_tokens: int = 256
  temperature: float = 0.0
  top_p: float = 1.0
  samples: int = 1
  sample_temperature: float = 0.7
  batch_size: int = 16

  def __post_init__(self):
    if self.max_new_tokens < 1 or self.samples < 1 or self.batch_size < 1:
      raise ValueError("generation.max_new_tokens, generation.samples and generation.batch_size must be >= 1")
    if self.temperature < 0 or not self.sample_temperature > 0 or not 0 < self.top_p <= 1:
      raise ValueError("generation.temperature must be >= 0 (0: greedy), generation.sample_temperature > 0 and "
                       "generation.top_p in (0, 1]")


@dataclasses.dataclass(frozen=True)
class TaskData:
  """A task's prompts: data sources read like the trainer's (`data.readers`; the "prompt" format: {prompt} or
  {question} with an optional answer, HH-RLHF pairs, IFEval records), the first `limit` of them (0: all)."""

  data: tuple[str, ...] = ()
  limit: int = 64

  def __post_init__(self):
    if self.limit < 0:
      raise ValueError(f"limit={self.limit} must be >= 0 (0: every example)")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """`policy` (an HF model directory, or a training run directory: its newest export) evaluated on `tasks`:
  - win_rate: reward-model win rate against `baseline` (another policy) on the prompts, with bootstrap confidence
    intervals and a length-controlled variant (needs `reward_model`, a *ForSequenceClassification directory);
  - math: greedy accuracy with Math-Verify against each prompt's answer (GSM8K's `#### n` or a boxed answer), and
    maj@k / pass@k with generation.samples = k;
  - ifeval: IFEval prompt-level and instruction-level accuracy, strict and loose;
  - judge: pairwise LLM-as-judge (`judge_model`, any local causal LM) of the policy against `baseline`, both
    orders, position bias measured and cancelled (a verdict counts when both orders agree), ties half;
  - grade: single-answer 1-5 grading by `judge_model`, reference-guided (each prompt's answer shown as the
    reference) with grade_with_reference;
  - rule: exact match, token F1 and ROUGE-L of the greedy completion against each prompt's answer."""

  policy: str = ""
  baseline: str | None = None
  reward_model: str | None = None
  judge_model: str | None = None
  grade_with_reference: bool = False
  tasks: tuple[str, ...] = ("math",)
  win_rate: TaskData = TaskData()
  judge: TaskData = TaskData()
  grade: TaskData = TaskData()
  math: TaskData = TaskData()
  ifeval: TaskData = TaskData()
  rule: TaskData = TaskData()
  generation: GenerationConfig = GenerationConfig()
  bootstrap_resamples: int = 1000
  confidence: float = 0.95
  verifier_workers: int = 2
  verifier_timeout_s: float = 10.0
  output_dir: str = "eval_out"
  seed: int = 0
  mesh: MeshConfig = MeshConfig()

  def __post_init__(self):
    unknown = [t for t in self.tasks if t not in TASKS]
    if unknown:
      raise ValueError(f"tasks: unknown {unknown}; choose from {list(TASKS)}")
    if not self.policy:
      raise ValueError("policy: give an HF model directory or a training run directory")
    if "win_rate" in self.tasks and not (self.baseline and self.reward_model):
      raise ValueError("tasks: win_rate needs baseline (a policy to compare with) and reward_model")
    if "judge" in self.tasks and not (self.baseline and self.judge_model):
      raise ValueError("tasks: judge needs baseline (a policy to compare with) and judge_model")
    if "grade" in self.tasks and not self.judge_model:
      raise ValueError("tasks: grade needs judge_model (a local causal LM directory)")
    for task in self.tasks:
      if not getattr(self, task).data:
        raise ValueError(f"{task}.data: name the task's data sources (e.g. {task}.data=[path.jsonl])")
    if not 0 < self.confidence < 1 or self.bootstrap_resamples < 1:
      raise ValueError("confidence must be in (0, 1) and bootstrap_resamples >= 1")
    if self.verifier_workers < 1 or not self.verifier_timeout_s > 0:
      raise ValueError("verifier_workers must be >= 1 and verifier_timeout_s > 0")
