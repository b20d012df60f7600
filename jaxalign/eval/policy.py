"""Models under evaluation: loading a policy (an HF directory or a run's export), its completions of prompts, and
a reward model's scores of (prompt, completion) pairs."""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxalign.config import ConfigError
from jaxalign.data.batching import left_pad
from jaxalign.data.tokenize import pad_id, prompt_ids
from jaxalign.models import ScalarModel, last_token_values, load_hf, load_tokenizer
from jaxalign.rollout import SamplingConfig, generate_text
from jaxalign.rollout.sampler import bucket_length


@dataclasses.dataclass
class Loaded:
  """A model directory read for evaluation."""

  path: pathlib.Path
  model: object
  tokenizer: object


def model_dir(path: str) -> pathlib.Path:
  """The HF directory of `path`: itself when it holds config.json, else a run directory's newest export
  (`<run>/hf`, or `<run>/<stage>/hf` of a multi-stage run)."""
  root = pathlib.Path(path)
  if (root / "config.json").exists():
    return root
  exports = sorted(root.glob("hf/config.json")) + sorted(root.glob("*/hf/config.json"))
  if not exports:
    raise ConfigError(f"{path}: neither an HF model directory (config.json) nor a run directory with an export "
                      "(hf/ or <stage>/hf/)")
  return max(exports, key=lambda p: p.stat().st_mtime).parent


def load(path: str, mesh=None) -> Loaded:
  """The model and tokenizer of an HF directory or a run directory (`model_dir`)."""
  where = model_dir(path)
  model, _ = load_hf(where, mesh=mesh)
  return Loaded(where, model, load_tokenizer(where))


def sampling(loaded: Loaded, max_new_tokens: int, temperature: float, top_p: float = 1.0) -> SamplingConfig:
  """Sampling settings with the tokenizer's EOS and pad ids (greedy at temperature 0)."""
  return SamplingConfig.for_tokenizer(loaded.tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p)


def complete(loaded: Loaded, prompts: list, cfg: SamplingConfig, *, batch_size: int, seed: int = 0,
             desc: str = "generating") -> list[str]:
  """The completion of each prompt (raw text or chat messages), in batches of `batch_size` with a progress bar."""
  out = []
  for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
    out += generate_text(loaded.model, loaded.tokenizer, prompts[start:start + batch_size],
                         key=jax.random.fold_in(jax.random.key(seed), start), cfg=cfg, batch_size=batch_size)
  return out


@nnx.jit
def _scores(model, ids, mask):
  return last_token_values(model(ids, mask), mask)


def reward_scores(loaded: Loaded, prompts: list, completions: list[str], *, batch_size: int,
                  max_length: int = 2048) -> np.ndarray:
  """A reward model's score [N] of each prompt followed by its completion, read at the last token, in the reward
  model's own tokenisation (its chat template for message prompts). Rows longer than `max_length` keep their last
  tokens."""
  if not isinstance(loaded.model, ScalarModel):
    raise ConfigError(f"reward_model={loaded.path} is not a reward model (*ForSequenceClassification)")
  tok = loaded.tokenizer
  rows = [(prompt_ids(tok, p) + tok.encode(c, add_special_tokens=False))[-max_length:]
          for p, c in zip(prompts, completions)]
  return over_batches(functools.partial(_scores, loaded.model), rows, pad_id(tok), batch_size, "scoring")


def over_batches(fn, rows: list[list[int]], pad: int, batch_size: int, desc: str) -> np.ndarray:
  """fn(ids, mask) -> [batch, ...] on token rows left-padded to one bucketed length, in batches of `batch_size`
  (the last one filled up: one compiled shape), with a progress bar -> [len(rows), ...] float64."""
  out = []
  for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", leave=False):
    chunk = rows[start:start + batch_size]
    chunk = chunk + [chunk[0]] * (batch_size - len(chunk))
    ids, mask = left_pad(chunk, pad, bucket_length(max(len(r) for r in rows)))
    out.append(np.asarray(fn(jnp.asarray(ids), jnp.asarray(mask)), np.float64)[:len(rows) - start])
  return np.concatenate(out)
