"""Datasets end to end: read -> parse -> tokenise -> deterministic, resumable batches."""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Iterator

import numpy as np

from jaxalign.data import batching, synthetic
from jaxalign.data.formats import FORMATS, parse_records
from jaxalign.data.readers import DataError, read_records
from jaxalign.data.tokenize import Encoded, encode_example

log = logging.getLogger(__name__)
PACKABLE = ("sft", "preference", "ranked")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the data is, what format it has, and how it is tokenised and batched."""

  # sft | preference | unpaired | ranked | prompt
  format: str = "sft"
  # Files or dataset directories; "synthetic:sort" is the built-in digit-sorting task.
  train: tuple[str, ...] = ("synthetic:sort",)
  # Held-out data; empty = hold out `eval_fraction` of train.
  eval: tuple[str, ...] = ()
  eval_fraction: float = 0.05
  # Synthetic task sizes (train, eval) when train is synthetic.
  synthetic_size: tuple[int, int] = (4000, 256)
  # Total tokens per row (prompt + response) and the prompt's share; longer inputs are truncated.
  max_length: int = 512
  max_prompt_length: int = 256
  # Padded lengths; empty = powers of two up to max_length.
  buckets: tuple[int, ...] = ()
  # Pack several sequences per row (segment ids keep them apart). sft: batch_size rows, each filled with as
  # many examples as fit; preference / ranked: batch_size examples whose B*C (prompt + response) sequences
  # share as few rows as hold them (`batching.collate_packed`).
  packing: bool = False
  # Preference / ranked batches without packing: where it takes fewer token slots, each row is the prompt
  # left-padded to the batch's prompt bucket then the response, and the objective runs each prompt once, its
  # C responses attending to it (`batching.collate_multi`, `forward.example_logps`); exact.
  share_prompt: bool = True
  # Examples (sft packing: packed rows) per micro-batch; the optimiser step sees batch_size * grad_accum.
  batch_size: int = 16
  shuffle: bool = True
  # Keep at most this many examples per split (0 = all).
  limit: int = 0

  def __post_init__(self):
    if self.format not in FORMATS:
      raise ValueError(f"data.format={self.format!r}; choose one of {FORMATS}")
    if not self.train:
      raise ValueError("data.train lists no data")
    if self.max_prompt_length >= self.max_length:
      raise ValueError("data.max_prompt_length must be smaller than data.max_length")
    if self.packing and self.format not in PACKABLE:
      raise ValueError(f"data.packing applies to the sft, preference and ranked formats, not {self.format}")
    if self.batch_size < 1 or self.max_prompt_length < 1 or self.limit < 0 or min(self.synthetic_size) < 1:
      raise ValueError("data.batch_size, data.max_prompt_length and data.synthetic_size must be >= 1, "
                       "data.limit >= 0")
    if not 0 <= self.eval_fraction < 1:
      raise ValueError(f"data.eval_fraction={self.eval_fraction} must be in [0, 1)")

  @property
  def bucket_lengths(self) -> tuple[int, ...]:
    return tuple(sorted(self.buckets)) or batching.default_buckets(self.max_length)


class Batches:
  """Deterministic batches over encoded examples; the order depends only on the seed and epoch.

  `state()` / `restore()` give the position (epoch, index) for checkpoints, so a resumed run sees
  exactly the batches an uninterrupted one would have. `rows` (set by a multi-process trainer) selects the
  rows of each global batch this process builds; every process walks the same order. `pack_multiple` (set by
  a trainer to the batch shards per process) makes packed pair / list row counts divide evenly over them.
  `prompts` (set by a trainer for an online algorithm that trains on sft / preference data) adds the prompts
  to sample from beside the data's rows (`batching.with_prompts`).
  """

  def __init__(self, examples: list[Encoded], cfg: DataConfig, seed: int, *, shuffle: bool | None = None,
               where: str = "data"):
    if len(examples) < cfg.batch_size:
      raise DataError(f"{where}: only {len(examples)} usable examples for data.batch_size={cfg.batch_size}")
    self.examples, self.cfg, self.seed = examples, cfg, seed
    self.rows: list[int] | None = None
    self.pack_multiple = 1
    self.prompts = False
    self.shuffle = cfg.shuffle if shuffle is None else shuffle
    self.epoch, self.index = 0, 0
    self._order = self._permutation(0)

  def _permutation(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(len(self.examples))
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

  def state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "index": self.index}

  def restore(self, state: dict) -> None:
    self.epoch, self.index = int(state["epoch"]), int(state["index"])
    self._order = self._permutation(self.epoch)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    cfg = self.cfg
    packs_examples = cfg.packing and cfg.format == "sft"  # a variable number of examples per batch
    if self.index + (1 if packs_examples else cfg.batch_size) > len(self._order):
      self.epoch, self.index = self.epoch + 1, 0
      self._order = self._permutation(self.epoch)
    chosen = [self.examples[i] for i in self._order[self.index:]]
    if packs_examples:
      batch, used = batching.pack_rows(chosen, cfg.batch_size, cfg.max_length, self.rows)
    elif cfg.packing:  # pairs / lists: batch_size examples, their sequences packed
      chosen, used = chosen[:cfg.batch_size], cfg.batch_size
      batch = batching.collate_packed(chosen, cfg.bucket_lengths, self.rows, self.pack_multiple)
    else:
      chosen, used = chosen[:cfg.batch_size], cfg.batch_size
      collate = {"sft": batching.collate_single, "prompt": batching.collate_prompts,
                 "unpaired": batching.collate_unpaired}.get(cfg.format)
      batch = (collate(chosen, cfg.bucket_lengths, self.rows) if collate else
               batching.collate_multi(chosen, cfg.bucket_lengths, self.rows, cfg.share_prompt))
    if self.prompts and cfg.format != "prompt":
      batch = batching.with_prompts(batch, chosen, cfg.bucket_lengths, self.rows)
    self.index += used
    return batch

  def epoch_batches(self) -> list[dict[str, np.ndarray]]:
    """All full batches of one pass in order (for evaluation)."""
    start = self.state()
    self.restore({"epoch": 0, "index": 0})
    n = len(self.examples) // self.cfg.batch_size
    out = [next(self) for _ in range(max(n, 1))]
    self.restore(start)
    return out


def eval_sources(cfg: DataConfig) -> tuple[tuple[str, ...], int]:
  """(sources, split) of the held-out data when it is its own split: data.eval, or the synthetic tasks' eval split;
  a DataError for a held-out part carved out of data.train (not a split of its own)."""
  if cfg.eval:
    return cfg.eval, 1
  if all(s.startswith("synthetic:") for s in cfg.train):
    return cfg.train, 1
  raise DataError("the held-out data is a part of data.train; name data.eval to score held-out prompts")


def records(sources: tuple[str, ...], cfg: DataConfig, split: int, seed: int):
  """(record, where) pairs of the sources: files, or the synthetic tasks' split (0: train, 1: eval) in cfg.format."""
  for source in sources:
    if source.startswith("synthetic:"):
      task = source.removeprefix("synthetic:")
      if task not in synthetic.TASKS:
        raise DataError(f"unknown synthetic task {source!r}; available: "
                        + ", ".join(f"synthetic:{t}" for t in synthetic.TASKS))
      records = synthetic.TASKS[task](cfg.synthetic_size[split], seed + 7919 * split, cfg.format)
      for i, record in enumerate(records):
        yield record, f"{source}:{i}"
    else:
      yield from read_records(source)


def load_split(sources: tuple[str, ...], cfg: DataConfig, tokenizer, split: int = 0, seed: int = 0):
  """Parse and tokenise one split. Returns (encoded examples, counts of skipped/truncated)."""
  examples, counts = parse_records(records(sources, cfg, split, seed), cfg.format)
  counts = collections.Counter({f"skipped: {k}": v for k, v in counts.items()})
  encoded = [dataclasses.replace(encode_example(tokenizer, e, cfg.max_length, cfg.max_prompt_length, counts), uid=i)
             for i, e in enumerate(examples)]
  if cfg.limit:
    encoded = encoded[:cfg.limit]
  return encoded, counts


def build_datasets(cfg: DataConfig, tokenizer, seed: int) -> tuple[Batches, Batches, collections.Counter]:
  """Train and eval batch iterators, and the skip / truncation counts (also logged)."""
  train, counts = load_split(cfg.train, cfg, tokenizer, 0, seed)
  if cfg.eval:
    held_out, eval_counts = load_split(cfg.eval, cfg, tokenizer, 1, seed)
    counts.update({f"eval {k}": v for k, v in eval_counts.items()})
  elif all(s.startswith("synthetic:") for s in cfg.train):
    held_out, eval_counts = load_split(cfg.train, cfg, tokenizer, 1, seed)
  else:
    order = np.random.default_rng([seed, 12345]).permutation(len(train))
    n_eval = max(cfg.batch_size, int(len(train) * cfg.eval_fraction))
    held_out, train = [train[i] for i in order[:n_eval]], [train[i] for i in order[n_eval:]]
  for key, value in sorted(counts.items()):
    log.info("data: %s: %d", key, value)
  train_where = ", ".join(cfg.train)
  eval_where = ", ".join(cfg.eval) if cfg.eval else f"held-out part of {train_where}"
  return (Batches(train, cfg, seed, where=f"data.train ({train_where})"),
          Batches(held_out, cfg, seed, shuffle=False, where=f"data.eval ({eval_where})"), counts)
