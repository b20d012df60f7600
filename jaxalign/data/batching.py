"""Collation into fixed-shape numpy batches: right padding to a few bucket lengths, optional packing.

Every batch holds `input_ids`, `loss_mask` (1 on response tokens) and `segment_ids` (0 = padding,
1, 2, ... = documents of a packed row). Multi-response formats add a response axis C:
[B, C, T] for preference pairs (C=2: chosen, rejected) and ranked lists; `scores` [B, C] for ranked
lists; unpaired (KTO) batches add `label` [B] and the mismatched `kl_*` rows (prompt i with the
response of example i+1, OBJECTIVES.md §9.11).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxalign.data.tokenize import Encoded


def default_buckets(max_length: int, smallest: int = 32) -> tuple[int, ...]:
  """Powers of two from `smallest` up to, and ending with, max_length (bounded recompiles)."""
  buckets, n = [], smallest
  while n < max_length:
    buckets.append(n)
    n *= 2
  return tuple(buckets) + (max_length,)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if length <= b:
      return b
  return buckets[-1]


def _row(pieces: Sequence[tuple[np.ndarray, np.ndarray]], length: int):
  """One padded row from (prompt, response) pieces, each piece its own segment."""
  ids, mask, seg = np.zeros(length, np.int32), np.zeros(length, np.int32), np.zeros(length, np.int32)
  pos = 0
  for doc, (prompt, response) in enumerate(pieces, 1):
    n_p, n_r = len(prompt), len(response)
    ids[pos:pos + n_p], ids[pos + n_p:pos + n_p + n_r] = prompt, response
    mask[pos + n_p:pos + n_p + n_r] = 1
    seg[pos:pos + n_p + n_r] = doc
    pos += n_p + n_r
  return ids, mask, seg


def _stack_rows(rows) -> dict[str, np.ndarray]:
  ids, mask, seg = (np.stack(x) for x in zip(*rows))
  return {"input_ids": ids, "loss_mask": mask, "segment_ids": seg}


def _take(examples: Sequence, rows: Sequence[int] | None) -> list:
  """The examples of the rows this process materialises (all of them by default)."""
  return list(examples) if rows is None else [examples[i] for i in rows]


def collate_single(examples: Sequence[Encoded], buckets: Sequence[int],
                   rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """SFT / unpaired: one response per row. [B, T].

  Every collate function sizes the batch from all of `examples` (the global batch) but builds only the
  `rows` this process holds, so hosts of a multi-process mesh agree on shapes without materialising the
  global batch."""
  length = bucket_length(max(e.length for e in examples), buckets)
  return _stack_rows([_row([(e.prompt, e.responses[0])], length) for e in _take(examples, rows)])


def collate_multi(examples: Sequence[Encoded], buckets: Sequence[int],
                  rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """Preference pairs and ranked lists: every response of an example in its own row. [B, C, T]."""
  length = bucket_length(max(e.length for e in examples), buckets)
  local = _take(examples, rows)
  per_example = [_stack_rows([_row([(e.prompt, r)], length) for r in e.responses]) for e in local]
  batch = {k: np.stack([b[k] for b in per_example]) for k in per_example[0]}
  if local[0].scores:
    batch["scores"] = np.asarray([e.scores for e in local], np.float32)
  if local[0].ref_logps:
    batch["ref_logps"] = np.asarray([e.ref_logps for e in local], np.float32)
  return batch


def collate_unpaired(examples: Sequence[Encoded], buckets: Sequence[int],
                     rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """KTO: [B, T] rows, labels [B], and mismatched rows (prompt i, response i+1) for the reference point."""
  batch = collate_single(examples, buckets, rows)
  shifted = [(e.prompt, examples[(i + 1) % len(examples)].responses[0]) for i, e in enumerate(examples)]
  length = bucket_length(max(len(p) + len(r) for p, r in shifted), buckets)
  batch.update({f"kl_{k}": v for k, v in _stack_rows([_row([piece], length) for piece in _take(shifted, rows)]).items()})
  batch["label"] = np.asarray([e.scores[0] > 0.5 for e in _take(examples, rows)])
  return batch


def collate_prompts(examples: Sequence[Encoded], buckets: Sequence[int],
                    rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """Prompt-only rows, left-padded for generation: prompt_ids / prompt_mask [B, P] and uid [B]."""
  length = bucket_length(max(len(e.prompt) for e in examples), buckets)
  local = _take(examples, rows)
  ids, mask = np.zeros((len(local), length), np.int32), np.zeros((len(local), length), np.int32)
  for i, e in enumerate(local):
    ids[i, length - len(e.prompt):], mask[i, length - len(e.prompt):] = e.prompt, 1
  return {"prompt_ids": ids, "prompt_mask": mask, "uid": np.asarray([e.uid for e in local], np.int32)}


def pack_rows(examples: Sequence[Encoded], num_rows: int, length: int,
              rows: Sequence[int] | None = None) -> tuple[dict[str, np.ndarray], int]:
  """Pack examples in order into `num_rows` rows of `length` tokens (segment ids restart per row); only
  `rows` are built (see `collate_single`).

  Returns the batch and how many examples it consumed (at least one per row while any remain).
  """
  packed, used, i = [], 0, 0
  for _ in range(num_rows):
    pieces, room = [], length
    while i < len(examples) and (examples[i].length <= room or not pieces):
      e = examples[i]
      take = min(len(e.responses[0]), room - min(len(e.prompt), room))
      pieces.append((e.prompt[:room], e.responses[0][:take]))
      room -= len(pieces[-1][0]) + take
      i += 1
    packed.append(pieces)
    used = i
  return _stack_rows([_row(pieces, length) for pieces in _take(packed, rows)]), used
