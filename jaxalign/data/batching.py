"""Collation into fixed-shape numpy batches: right padding to a few bucket lengths, optional packing.

Every batch holds `input_ids`, `loss_mask` (1 on response tokens) and `segment_ids` (0 = padding,
1, 2, ... = documents of a packed row). Multi-response formats add a response axis C:
[B, C, T] for preference pairs (C=2: chosen, rejected) and ranked lists; `scores` [B, C] for ranked
lists; unpaired (KTO) batches add `label` [B] and the mismatched `kl_*` rows (prompt i with the
response of example i+1, OBJECTIVES.md §9.11).

Packed pairs and lists (`collate_packed`) keep B examples but put their B*C sequences into N <= B*C rows
[N, T], with `pack_row` / `pack_segment` [B, C] saying where each (example, response) landed.

Pairs and lists with a shared prompt (`collate_multi(share_prompt=True)`, when it takes fewer token slots):
every row is the prompt left-padded to P, then the response right-padded, and `prompt_mask` [B, P] marks the
prompt's tokens; the objective then runs each prompt once (`forward.example_logps`).

Online algorithms that learn from a dataset's responses (SPIN, PMLE, preference distillation) get those rows
prefixed `data_` beside the prompts they sample from (`with_prompts`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxalign.data.tokenize import Encoded

ROW_KEYS = ("input_ids", "loss_mask", "segment_ids")
# A packing group's row count is a multiple of ceil(sequences / PACK_STEPS): at most this many row counts
# (compiled shapes) per length bucket.
PACK_STEPS = 8


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


def _prompt_first_row(prompt: np.ndarray, response: np.ndarray, prompt_length: int, length: int):
  """One row [length]: the prompt right-aligned in slots [0, prompt_length), the response from there."""
  start = prompt_length - len(prompt)
  ids, mask, seg = _row([(prompt, response)], length - start)
  return (np.pad(x, (start, 0)) for x in (ids, mask, seg))


def left_pad(sequences: Sequence, pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pad token lists to `length` (default: the longest), the one home of left padding (prompts for
  generation, shared-prompt rows). Returns ids, mask [B, P] int32."""
  length = max(len(s) for s in sequences) if length is None else length
  ids = np.full((len(sequences), length), pad_id, np.int32)
  mask = np.zeros((len(sequences), length), np.int32)
  for row, seq in enumerate(sequences):
    if len(seq):
      ids[row, -len(seq):], mask[row, -len(seq):] = seq, 1
  return ids, mask


def shared_prompt_lengths(examples: Sequence[Encoded], buckets: Sequence[int]) -> tuple[int, int] | None:
  """(P, N): the prompt and response lengths of a shared-prompt batch of `examples` (each a bucket), or None
  when that layout would hold more token slots than whole rows (P + C*N >= C*T) or rows longer than the
  longest bucket."""
  responses = len(examples[0].responses)
  if any(len(e.responses) != responses for e in examples):
    return None
  p = bucket_length(max(len(e.prompt) for e in examples), buckets)
  n = bucket_length(max(len(r) for e in examples for r in e.responses), buckets)
  whole = bucket_length(max(e.length for e in examples), buckets)
  return (p, n) if p + n <= buckets[-1] and p + responses * n < responses * whole else None


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


def collate_multi(examples: Sequence[Encoded], buckets: Sequence[int], rows: Sequence[int] | None = None,
                  share_prompt: bool = False) -> dict[str, np.ndarray]:
  """Preference pairs and ranked lists: every response of an example in its own row. [B, C, T].

  share_prompt: where it takes fewer token slots (`shared_prompt_lengths`), rows [P + N] of the prompt
  left-padded to P and the response, and `prompt_mask` [B, P]."""
  local = _take(examples, rows)
  lengths = shared_prompt_lengths(examples, buckets) if share_prompt else None
  if lengths is None:
    length = bucket_length(max(e.length for e in examples), buckets)
    per_example = [_stack_rows([_row([(e.prompt, r)], length) for r in e.responses]) for e in local]
  else:
    per_example = [_stack_rows([_prompt_first_row(e.prompt, r, lengths[0], sum(lengths)) for r in e.responses])
                   for e in local]
  batch = {k: np.stack([b[k] for b in per_example]) for k in per_example[0]}
  if lengths is not None:
    batch["prompt_mask"] = left_pad([e.prompt for e in local], 0, lengths[0])[1]
  return {**batch, **_per_example_values(local)}


def _per_example_values(local: Sequence[Encoded]) -> dict[str, np.ndarray]:
  """The examples' own numbers: `scores` / `ref_logps` [B, C] per response, `margin` [B] (preference pairs)."""
  out = {}
  for key in ("scores", "ref_logps", "margin"):
    present = [getattr(e, key) not in (None, ()) for e in local]
    if any(present) and not all(present):
      raise ValueError(f"some examples of a batch carry '{key}' and others do not; give it for every example")
    if present and present[0]:
      out[key] = np.asarray([getattr(e, key) for e in local], np.float32)
  return out


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
  ids, mask = left_pad([e.prompt for e in local], 0, length)
  return {"prompt_ids": ids, "prompt_mask": mask, "uid": np.asarray([e.uid for e in local], np.int32)}


# Online algorithms that train on a dataset's responses get its rows under this prefix beside the prompts.
DATA_PREFIX = "data_"


def with_prompts(batch: dict[str, np.ndarray], examples: Sequence[Encoded], buckets: Sequence[int],
                 rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """An online algorithm's batch: the prompts to sample from (`collate_prompts`: prompt_ids / prompt_mask
  [B, P], uid [B]) and `batch`, the same examples collated in their data format (an SFT demonstration [B, T], a
  preference pair [B, 2, T] with its `scores` [B, 2] when the data has them), each key prefixed by DATA_PREFIX."""
  return {**collate_prompts(examples, buckets, rows), **{DATA_PREFIX + k: v for k, v in batch.items()}}


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


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """Bins of item indices, each summing to <= capacity: items longest first (ties in order), each into the
  first bin it fits, in the order they went in."""
  bins, room = [], []
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    fits = next((b for b, r in enumerate(room) if lengths[i] <= r), len(bins))
    if fits == len(bins):
      bins.append([])
      room.append(capacity)
    bins[fits].append(i)
    room[fits] -= lengths[i]
  return bins


def packed_row_count(needed: int, sequences: int, multiple: int = 1) -> int:
  """Rows a packing group of `sequences` sequences gets when first-fit-decreasing needs `needed`: rounded up
  to a step of ceil(sequences / PACK_STEPS) rows, itself a multiple of `multiple` (the batch shards per
  process, so rows shard evenly). Never below `needed`; at most one step above the padded layout's rows."""
  step = -(-max(-(-sequences // PACK_STEPS), 1) // multiple) * multiple
  return max(-(-needed // step), 1) * step


def pack_group(batch_size: int, rows: Sequence[int] | None) -> tuple[int, int]:
  """(groups, this process's group): each process packs its own block of examples into its own rows, so no
  process needs another's. One group in a single-process job."""
  if rows is None:
    return 1, 0
  n = len(rows)
  if batch_size % n or rows[0] % n or list(rows) != list(range(rows[0], rows[0] + n)):
    raise ValueError(f"data.packing needs each process to hold one contiguous block of the batch; this one holds "
                     f"rows {list(rows)} of {batch_size}")
  return batch_size // n, rows[0] // n


def collate_packed(examples: Sequence[Encoded], buckets: Sequence[int], rows: Sequence[int] | None = None,
                   multiple: int = 1) -> dict[str, np.ndarray]:
  """Preference pairs and ranked lists, packed: the B*C (prompt, response) sequences first-fit-decreasing
  into N rows of the length T the padded layout would use (`collate_multi`), so N <= B*C (plus rounding).

  Returns `input_ids` / `loss_mask` / `segment_ids` [N, T] (segments 1, 2, ... in each row, 0 padding at
  the end, empty rows last), `pack_row` / `pack_segment` [B, C] int32 (row of the global batch's packed rows
  and segment id of response c of example b), and `scores` / `ref_logps` [B, C] as `collate_multi`.

  Row count: each process's block of examples (`pack_group`) is packed apart; every block gets the rows the
  fullest needs, rounded by `packed_row_count`, so N = groups * rows per group is the same on every process
  and takes few values. Block g holds packed rows [g * N_g, (g + 1) * N_g); a process builds only its own.
  """
  length = bucket_length(max(e.length for e in examples), buckets)
  groups, mine = pack_group(len(examples), rows)
  size, per_example = len(examples) // groups, len(examples[0].responses)
  if any(len(e.responses) != per_example for e in examples):
    raise ValueError("packed lists need the same number of responses in every example")
  blocks = [examples[g * size:(g + 1) * size] for g in range(groups)]
  bins = [first_fit_decreasing([len(e.prompt) + len(r) for e in block for r in e.responses], length)
          for block in blocks]
  n_rows = packed_row_count(max(len(b) for b in bins), size * per_example, multiple)
  local = blocks[mine]
  pack_row = np.zeros((len(local), per_example), np.int32)
  pack_segment = np.zeros((len(local), per_example), np.int32)
  packed = []
  for r, members in enumerate(bins[mine] + [[]] * (n_rows - len(bins[mine]))):
    pieces = []
    for s, i in enumerate(members, 1):
      b, c = divmod(i, per_example)
      pack_row[b, c], pack_segment[b, c] = mine * n_rows + r, s
      pieces.append((local[b].prompt, local[b].responses[c]))
    packed.append(_row(pieces, length))
  batch = {**_stack_rows(packed), "pack_row": pack_row, "pack_segment": pack_segment}
  return {**batch, **_per_example_values(local)}


def equal_packed_rows(batches: list[dict]) -> list[dict]:
  """Packed micro-batches given the same row count (the most any has), so they stack: empty rows appended to
  each (a process holds one packing group, so its rows end its block) and `pack_row` re-based. Batches
  without `pack_row` are returned as they are."""
  if "pack_row" not in batches[0]:
    return batches
  n = max(b["input_ids"].shape[0] for b in batches)
  out = []
  for b in batches:
    have = b["input_ids"].shape[0]
    padded = {k: np.pad(b[k], [(0, n - have), (0, 0)]) for k in ROW_KEYS}
    out.append({**b, **padded, "pack_row": (b["pack_row"] // have * n + b["pack_row"] % have).astype(np.int32)})
  return out


def _whole_rows(batch: dict) -> dict:
  """A shared-prompt batch as whole rows: each row's left padding moved to its end, `prompt_mask` dropped."""
  real = batch["segment_ids"] != 0  # [..., T]: one contiguous run of real tokens per row
  shift = np.argmax(real, axis=-1)[..., None]  # its first real slot
  index = (np.arange(real.shape[-1]) + shift) % real.shape[-1]
  rolled = {k: np.take_along_axis(batch[k], index, axis=-1) for k in ROW_KEYS}
  return {**{k: v for k, v in batch.items() if k != "prompt_mask"}, **rolled}


def equal_prompt_layouts(batches: list[dict]) -> list[dict]:
  """Micro-batches in one row layout, so they stack: shared-prompt batches with their prompts left-padded to
  the longest P, or, when some use whole rows, all as whole rows."""
  shared = ["prompt_mask" in b for b in batches]
  if not any(shared):
    return batches
  if not all(shared):
    return [_whole_rows(b) if s else b for b, s in zip(batches, shared)]
  p = max(b["prompt_mask"].shape[-1] for b in batches)

  def widen(x, extra):
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(extra, 0)])

  return [{**b, **{k: widen(b[k], p - b["prompt_mask"].shape[-1]) for k in (*ROW_KEYS, "prompt_mask")}}
          for b in batches]
