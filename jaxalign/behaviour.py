"""What the policy does, not only what its loss says: at every eval, the policy's greedy completions of held-out
prompts scored by a rule reward (`eval_reward`, e.g. sort_exact: the task's true reward), reported as
`behaviour/<reward>`. Held-out prompts are the eval split read in the "prompt" format (with their answers)."""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np

from jaxalign.config import ConfigError, TrainConfig
from jaxalign.data.formats import parse_records
from jaxalign.data.pipeline import eval_sources, records
from jaxalign.rollout import SamplingConfig, generate_text
from jaxalign.rollout.rewards import INLINE

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Behaviour:
  """The held-out prompts and answers a behaviour metric scores, and how."""

  reward: str
  prompts: list
  answers: list[str]
  max_new_tokens: int


def held_out(cfg: TrainConfig) -> Behaviour | None:
  """The behaviour eval of `cfg` (None without eval_reward): its first eval_reward_prompts held-out prompts."""
  if not cfg.eval_reward:
    return None
  if cfg.eval_reward not in INLINE:
    raise ConfigError(f"eval_reward={cfg.eval_reward!r}; choose one of {sorted(INLINE)}")
  data = dataclasses.replace(cfg.data, format="prompt")
  sources, split = eval_sources(data)
  examples = parse_records(records(sources, data, split, cfg.seed), "prompt")[0][:cfg.eval_reward_prompts]
  if not examples or all(e.answer is None for e in examples):
    raise ConfigError(f"eval_reward={cfg.eval_reward}: the held-out data ({', '.join(sources)}) has no answers to "
                      "score against")
  return Behaviour(cfg.eval_reward, [e.prompt for e in examples], [e.answer or "" for e in examples],
                   data.max_length - data.max_prompt_length)


def score(behaviour: Behaviour, model, tokenizer, batch_size: int) -> dict[str, float]:
  """{"behaviour/<reward>": the mean reward of the model's greedy completions of the held-out prompts}."""
  if jax.process_count() > 1:  # generation reads whole rows back on one host
    log.warning("eval_reward: skipped in a multi-process job")
    return {}
  cfg = SamplingConfig.for_tokenizer(tokenizer, max_new_tokens=behaviour.max_new_tokens, temperature=0.0)
  completions = generate_text(model, tokenizer, behaviour.prompts, cfg=cfg, batch_size=batch_size)
  rewards = [INLINE[behaviour.reward](c, a) for c, a in zip(completions, behaviour.answers)]
  return {f"behaviour/{behaviour.reward}": float(np.mean(rewards))}
