"""Packed training passes of the online step: rollout rows packed into fewer, fuller rows inside the jit.

A rollout row [T = P + N] is a left-padded prompt and a right-padded completion, so most of a batch of rows
is padding when lengths vary. With `rl.pack_ratio` r in (0, 1], the old-policy, reference and update passes
run on ceil(r x U_s) packed rows of the same length T per batch shard (U_s rows of the batch on that shard):
rows are placed first-fit, longest first (a `lax.scan`, shard by shard, so no token leaves its shard), as
documents of a packed row (segment ids 1, 2, ...: no cross-document attention, positions restart). Results
are read back into the [U, T] row view, so every algorithm's loss sees the arrays it sees padded, equal to
float rounding.

Shapes are static, lengths are not: a batch whose rows do not fit in the packed rows runs padded. The choice
is a `lax.cond` around the whole pass (`packed_or_padded`), the gradient included, so the backward pass of one
layout never keeps the residuals of the other. `update/packed_fraction` reports how often packing applied and
`update/pack_fill` how full the packed rows were; a ratio a little above the mean fill of the padded rows
(`completions/mean_length` and the prompt lengths tell it) packs nearly every batch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxalign import sharding


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


def plan(segment_ids: jax.Array, ratio: float, length: int = 0) -> Packing:
  """The packing of rows [U, T] (segment ids) into rows of `length` L (0: T) holding ratio x the rows' slots
  per batch shard: ceil(ratio x U_s x T / L) rows."""
  u, t = segment_ids.shape
  length = length or t
  shards = sharding.shards("batch", u)
  per_shard = u // shards
  seg = sharding.constrain(segment_ids.reshape(shards, per_shard, t), ("batch", None, None))
  rows = math.ceil(ratio * per_shard * t / length)
  source, docs, dest, fits = jax.vmap(_plan_shard, in_axes=(0, None, None))(seg, rows, length)
  return Packing(source, docs, dest, jnp.all(fits))


def _by_shard(x: jax.Array, shards: int) -> jax.Array:
  return sharding.constrain(x.reshape(shards, -1, *x.shape[1:]), ("batch",) + (None,) * x.ndim)


def _merged(x: jax.Array) -> jax.Array:
  return sharding.constrain(x.reshape(-1, *x.shape[2:]), ("batch",) + (None,) * (x.ndim - 2))


def pack(x: jax.Array, packing: Packing, fill=0, *, targets: bool = False) -> jax.Array:
  """Token-aligned x [U, T] -> [M, L] in the packed layout (`fill` on padding). targets: x [U, T-1] is
  aligned with tokens 1..T-1 (next-token targets) and so is the result [M, L-1]."""
  if targets:
    x = jnp.concatenate([jnp.full_like(x[:, :1], fill), x], axis=1)

  def one(rows, source):
    picked = rows.reshape(-1)[jnp.maximum(source, 0)]
    return jnp.where(source >= 0, picked, jnp.asarray(fill, rows.dtype))

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
  """Training rows (input_ids, loss_mask, segment_ids [U, T]) in the packed layout [M, L]."""
  return {"input_ids": pack(rows["input_ids"], packing), "loss_mask": pack(rows["loss_mask"], packing),
          "segment_ids": _merged(packing.segment_ids)}


def _is_rows(x) -> bool:
  return isinstance(x, dict) and "segment_ids" in x and "input_ids" in x


def with_packing(tree, ratio: float, length: int = 0):
  """(tree with a "packing" entry in every rows dict, whether all of them fit, real tokens / packed slots)."""
  fits, real, slots = [], [], []

  def attach(rows):
    packing = plan(rows["segment_ids"], ratio, length)
    fits.append(packing.fits)
    real.append(jnp.sum(rows["segment_ids"] != 0))
    slots.append(packing.source.size)
    return {**rows, "packing": packing}

  tree = jax.tree.map(lambda x: attach(x) if _is_rows(x) else x, tree, is_leaf=_is_rows)
  return tree, jnp.all(jnp.stack(fits)), sum(real) / sum(slots)


def packed_or_padded(fn, tree, ratio: float, length: int = 0):
  """(fn(tree) on packed rows when all of its rows dicts fit, else on the padded ones; metrics: whether
  packing applied, and real tokens / packed slots).

  `fn` reads the rows dicts of `tree` through `OnlineFns.completion_logps` / `values`, which run the packed
  layout when a rows dict carries "packing". ratio 0: padded, no metrics."""
  if not ratio:
    return fn(tree), {}
  packed, fits, fill = with_packing(tree, ratio, length)
  out = jax.lax.cond(fits, lambda: fn(packed), lambda: fn(tree))
  return out, {"packed_fraction": fits.astype(jnp.float32), "pack_fill": fill}
