"""Packed training passes of the online step: rollout rows packed into fewer, fuller rows inside the jit.

A rollout row [T = P + N] is a left-padded prompt and a right-padded completion, so most of a batch of rows
is padding when lengths vary. With `rl.pack_ratio` r in (0, 1], the old-policy, reference and update passes
run on packed rows of `rl.pack_length` L tokens (default T) holding r x the padded slots of each batch shard,
rounded up to whole rows: ceil(r x U_s x T / L) rows for the shard's U_s rows. Rows are placed first-fit,
longest first (a `lax.scan`, shard by shard, so no token leaves its shard), as documents of a packed row
(segment ids 1, 2, ...: no cross-document attention, positions restart). Results are read back into the
[U, T] row view, so every algorithm's loss sees the arrays it sees padded, equal to float rounding.

Shapes are static, lengths are not: a batch whose rows do not fit in the packed rows (one longer than L, or
too many tokens) runs padded. The choice is a `lax.cond` around the whole pass (`packed_or_padded`), the
gradient included, so the backward pass of one layout never keeps the residuals of the other. The step
reports `packing/{scoring,update}_packed_fraction` (how often packing applied) and `..._pack_fill` (how full
the rows were). With few rows per shard the rounding to whole rows can leave as many slots as padding (e.g.
r = 0.9, 4 rows per shard, L = T): such passes run padded, with a warning.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxalign import sharding
from jaxalign.models.routing import NOT_RECORDED

log = logging.getLogger(__name__)


class Packing(NamedTuple):
  """Where the tokens of U rows [S, U_s, T] go in M packed rows [S, M_s, L] (S batch shards)."""

  source: jax.Array  # [S, M_s, L] flat index u * T + t of the row token in each packed slot (-1: padding)
  segment_ids: jax.Array  # [S, M_s, L] document number in the packed row (0: padding)
  dest: jax.Array  # [S, U_s, T] flat index m * L + j of each row token's packed slot (M_s * L: none)
  fits: jax.Array  # [] every row of every shard found room


def _plan_shard(segment_ids: jax.Array, packed_rows: int, length: int) -> tuple[jax.Array, ...]:
  """(source, segment_ids, dest, fits) of one shard's rows [U_s, T] in `packed_rows` rows of `length` L: first
  fit, longest row first. A row's real tokens (segment id != 0) keep their order and become one document."""
  u, t = segment_ids.shape
  real = segment_ids != 0
  lengths = jnp.sum(real, -1)

  def place(carry, row):
    room, docs = carry  # [M_s] free slots, documents so far
    fits = room >= lengths[row]
    target = jnp.argmax(fits)
    ok = fits[target]
    offset = length - room[target]
    room = room.at[target].add(jnp.where(ok, -lengths[row], 0))
    docs = docs.at[target].add(ok.astype(jnp.int32))
    return (room, docs), (target, offset, docs[target], ok)

  order = jnp.argsort(-lengths, stable=True)
  init = (jnp.full((packed_rows,), length, jnp.int32), jnp.zeros((packed_rows,), jnp.int32))
  _, placed = jax.lax.scan(place, init, order)
  target, offset, doc, ok = (jnp.zeros_like(x).at[order].set(x) for x in placed)  # back to row order
  rank = jnp.cumsum(real, -1) - 1  # [U_s, T] index of each real token within its row
  slots = packed_rows * length
  dest = jnp.where(real & ok[:, None], (target * length + offset)[:, None] + rank, slots)
  source = jnp.full((slots,), -1, jnp.int32).at[dest.reshape(-1)].set(jnp.arange(u * t, dtype=jnp.int32),
                                                                       mode="drop")
  docs = jnp.zeros((slots,), jnp.int32).at[dest.reshape(-1)].set(jnp.repeat(doc, t), mode="drop")
  return source.reshape(packed_rows, length), docs.reshape(packed_rows, length), dest, jnp.all(ok)


def packed_shape(shape: tuple[int, int], ratio: float, length: int = 0) -> tuple[int, int, int]:
  """(batch shards S, packed rows per shard M_s, their length L) for rows of `shape` [U, T]: rows of `length`
  (0: T) holding ratio x the shard's slots, rounded up to whole rows."""
  u, t = shape
  length = length or t
  shards = sharding.shards("batch", u)
  return shards, math.ceil(ratio * (u // shards) * t / length), length


def plan(segment_ids: jax.Array, ratio: float, length: int = 0) -> Packing:
  """The packing of rows [U, T] (segment ids) into `packed_shape` rows per batch shard."""
  u, t = segment_ids.shape
  shards, rows, length = packed_shape((u, t), ratio, length)
  seg = sharding.constrain(segment_ids.reshape(shards, u // shards, t), ("batch", None, None))
  source, docs, dest, fits = jax.vmap(_plan_shard, in_axes=(0, None, None))(seg, rows, length)
  return Packing(source, docs, dest, jnp.all(fits))


def saves_slots(shape: tuple[int, int], ratio: float, length: int = 0) -> bool:
  """Whether packed rows hold fewer slots than the padded rows [U, T] on each shard (rounding to whole rows
  per shard can leave as many: e.g. ratio 0.9 with 4 rows per shard)."""
  shards, rows, length = packed_shape(shape, ratio, length)
  return rows * length < shape[0] // shards * shape[1]


def _by_shard(x: jax.Array, shards: int) -> jax.Array:
  return sharding.constrain(x.reshape(shards, -1, *x.shape[1:]), ("batch",) + (None,) * x.ndim)


def _merged(x: jax.Array) -> jax.Array:
  return sharding.constrain(x.reshape(-1, *x.shape[2:]), ("batch",) + (None,) * (x.ndim - 2))


def pack(x: jax.Array, packing: Packing, fill=0, *, targets: bool = False) -> jax.Array:
  """Token-aligned x [U, T, ...] -> [M, L, ...] in the packed layout (`fill` on padding). targets: x [U, T-1]
  is aligned with tokens 1..T-1 (next-token targets) and so is the result [M, L-1]."""
  if targets:
    x = jnp.concatenate([jnp.full_like(x[:, :1], fill), x], axis=1)

  def one(rows, source):
    picked = rows.reshape(-1, *rows.shape[2:])[jnp.maximum(source, 0)]
    real = (source >= 0).reshape(*source.shape, *(1,) * (rows.ndim - 2))
    return jnp.where(real, picked, jnp.asarray(fill, rows.dtype))

  packed = _merged(jax.vmap(one)(_by_shard(x, packing.source.shape[0]), packing.source))
  return packed[:, 1:] if targets else packed


def unpack(y: jax.Array, packing: Packing, fill=0, *, targets: bool = False) -> jax.Array:
  """The inverse of `pack`: packed y [M, L] (or targets [M, L-1]) -> [U, T] ([U, T-1]), `fill` on padding.
  Differentiable in y."""
  if targets:
    y = jnp.concatenate([jnp.full_like(y[:, :1], fill), y], axis=1)

  def one(packed, dest):
    return jnp.take(packed.reshape(-1), dest, mode="fill", fill_value=fill)

  rows = _merged(jax.vmap(one)(_by_shard(y, packing.dest.shape[0]), packing.dest))
  return rows[:, 1:] if targets else rows


def packed_rows(rows: dict, packing: Packing) -> dict:
  """Training rows (input_ids, loss_mask, segment_ids [U, T]; routed_experts [U, T, L, k] if recorded) in the
  packed layout [M, L]."""
  out = {"input_ids": pack(rows["input_ids"], packing), "loss_mask": pack(rows["loss_mask"], packing),
         "segment_ids": _merged(packing.segment_ids)}
  if "routed_experts" in rows:
    out["routed_experts"] = pack(rows["routed_experts"], packing, NOT_RECORDED)
  return out


def _is_rows(x) -> bool:
  return isinstance(x, dict) and "segment_ids" in x and "input_ids" in x


def _rows_dicts(tree) -> list[dict]:
  return [x for x in jax.tree.leaves(tree, is_leaf=_is_rows) if _is_rows(x)]


def with_packing(tree, ratio: float, length: int = 0):
  """(tree with a "packing" entry in every rows dict, whether all of them fit)."""
  fits = []

  def attach(rows):
    packing = plan(rows["segment_ids"], ratio, length)
    fits.append(packing.fits)
    return {**rows, "packing": packing}

  tree = jax.tree.map(lambda x: attach(x) if _is_rows(x) else x, tree, is_leaf=_is_rows)
  return tree, jnp.all(jnp.stack(fits))


def packed_or_padded(fn, tree, ratio: float, length: int = 0):
  """(fn(tree) on packed rows when all of its rows dicts fit, else on the padded ones; metrics).

  `fn` reads the rows dicts of `tree` through `OnlineFns.completion_logps` / `values`, which run the packed
  layout when a rows dict carries "packing". Metrics: "packed_fraction" (1 when packing applied) and
  "pack_fill" (real tokens over the slots of the rows the pass ran on). ratio 0: padded, no metrics. When
  packed rows would not save slots (`saves_slots`), the pass runs padded (a warning at trace time)."""
  if not ratio:
    return fn(tree), {}
  rows = _rows_dicts(tree)
  real = sum(jnp.sum(r["segment_ids"] != 0) for r in rows)
  padded_slots = sum(r["segment_ids"].size for r in rows)
  if not all(saves_slots(r["segment_ids"].shape, ratio, length) for r in rows):
    log.warning("rl.pack_ratio=%s, rl.pack_length=%s: packed rows would hold as many slots as the padded %s "
                "per batch shard; this pass runs padded", ratio, length, [r["segment_ids"].shape for r in rows])
    return fn(tree), {"packed_fraction": jnp.zeros((), jnp.float32), "pack_fill": real / padded_slots}
  packed, fits = with_packing(tree, ratio, length)
  packed_slots = sum(math.prod(packed_shape(r["segment_ids"].shape, ratio, length)) for r in rows)
  out = jax.lax.cond(fits, lambda: fn(packed), lambda: fn(tree))
  return out, {"packed_fraction": fits.astype(jnp.float32),
               "pack_fill": real / jnp.where(fits, packed_slots, padded_slots)}
