"""Pallas Triton (GPU) flash attention with GQA, segment ids, a sliding window and a logit soft-cap.

Shape letters: B batch, T sequence (queries and keys alike), N query heads, K kv heads, G = N // K,
H head dim; bq / bk the query / key block sizes, nq = T / bq, nk = T / bk.

Self-attention of one sequence per batch row with one segment-id array `seg` [B, T] shared by q and
k. Query t sees key s iff seg[s] != 0, seg[t] == seg[s], s <= t and, with a window w,
t - s < w: the mask rule of `ops.attention` for positions arange(T) (or restarting per packed
document). Logits are x = scale * q.k (float32 dot accumulation), soft-capped as
softcap * tanh(x / softcap) before masking. A query that sees no key (padding) gets output 0,
lse = +inf and zero gradients.

Kernels (FlashAttention-2, Dao 2023, arXiv:2307.08691). The block index leads each grid, so that
neighbouring programs share one head's k / v (or q / dO) in L2.

* forward, grid (nq, B, N): a program keeps one [bq, H] query block and walks its key blocks with
  the online softmax (running max m, sum l and output acc in float32), writing out and
  lse = m + log l [B, N, T].
* dq, grid (nq, B, N): a program recomputes p = exp(s - lse) for each key block of its query block
  and accumulates dq += dS k, with dS = p (dO v^T - delta) (1 - tanh^2 under a soft-cap) scale and
  delta = rowsum(dO * out) (computed in XLA).
* dk / dv, grid (nk, B, K): a program owns one key block of one kv head and walks the G query
  heads of its group and their query blocks (same recomputation): dv += p^T dO, dk += dS^T q. The
  group's sum happens in registers, so k / v are never repeated to N heads.

Only the key (or query) blocks that causality and the window leave visible are visited; packed
segments are masked, not skipped. Query head n uses kv head n // G through the BlockSpec index
maps. Triton tiles need power-of-two sizes of at least 16: T must be a multiple of 16 (`blocks`),
and H is zero-padded up to one (a no-op for the usual 64 / 128 / 256).
Block sizes and warp counts are untuned defaults (written without a GPU).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32
MIN_BLOCK = 16  # smallest Triton dot operand dim
MAX_BLOCK_Q = 128  # forward query block
MAX_BLOCK_K = 64  # forward key block, and both blocks of the backward kernels
NEG = -1e30  # masked logit: finite, so exp(NEG - m) == 0 without inf - inf


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static configuration of one call."""
  scale: float
  softcap: float | None
  window: int | None
  block_q: int  # forward query block
  block_k: int  # forward key block; the backward kernels use block_k for queries and keys
  interpret: bool  # run the kernels in Pallas interpret mode (CPU)


def blocks(t, block):
  """(block_q, block_k) for sequence length T: the largest powers of two dividing T that are at
  most min(block, MAX_BLOCK_Q) / min(block, MAX_BLOCK_K); None if block_k would be < MIN_BLOCK."""
  def pow2_divisor(cap):
    return math.gcd(t, 1 << (min(block, cap).bit_length() - 1))
  bq, bk = pow2_divisor(MAX_BLOCK_Q), pow2_divisor(MAX_BLOCK_K)
  return None if bk < MIN_BLOCK else (bq, bk)


def _dot_nt(a, b):
  """a [m, H] @ b [n, H]^T -> [m, n] float32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32)


def _dot_tn(a, b):
  """a [m, n]^T @ b [m, H] -> [n, H] float32."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=F32)


def _logits(q, k, q_start, k_start, q_seg, k_seg, spec):
  """Masked logits of a query tile against a key tile.

  q [bq, H], k [bk, H], q_seg [bq], k_seg [bk]; q_start / k_start the tiles' first token index.
  Returns (s, mask, th): s [bq, bk] float32 (NEG where masked), mask [bq, bk] bool and the
  soft-cap's tanh(x / softcap) [bq, bk] (None without a soft-cap).
  """
  x = _dot_nt(q, k) * spec.scale
  th = None
  if spec.softcap is not None:
    th = jnp.tanh(x / spec.softcap)
    x = spec.softcap * th
  t = q_start + jnp.arange(q.shape[0], dtype=jnp.int32)[:, None]  # [bq, 1]
  s = k_start + jnp.arange(k.shape[0], dtype=jnp.int32)[None, :]  # [1, bk]
  mask = (k_seg[None, :] != 0) & (q_seg[:, None] == k_seg[None, :]) & (s <= t)
  if spec.window is not None:
    mask &= t - s < spec.window
  return jnp.where(mask, x, NEG), mask, th


def _dlogits(p, dp, delta, th, spec):
  """dL / dx for the raw logits x = q.k [bq, bk]: p (dp - delta) (1 - th^2) scale, from the
  probabilities p, dp = dO v^T [bq, bk], delta [bq] and the soft-cap's tanh th (or None)."""
  ds = p * (dp - delta[:, None])
  if th is not None:
    ds *= 1.0 - th * th
  return ds * spec.scale


def _key_blocks(i, bq, bk, spec):
  """[lo, hi) key blocks that query block i can see (causal; window w: s > i * bq - w)."""
  hi = lax.div((i + 1) * bq + bk - 1, bk)
  if spec.window is None:
    return 0, hi
  return lax.div(jnp.maximum(i * bq - spec.window + 1, 0), bk), hi


def _query_blocks(j, bq, bk, nq, spec):
  """[lo, hi) query blocks that can see key block j (causal; window w: t < (j + 1) bk - 1 + w)."""
  lo = lax.div(j * bk, bq)
  if spec.window is None:
    return lo, nq
  return lo, jnp.minimum(lax.div((j + 1) * bk + spec.window - 2, bq) + 1, nq)


def _forward_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, spec):
  """One (batch row, query head, query block): q_ref [bq, H], k_ref / v_ref [T, H] of the kv head,
  qseg_ref [bq], kseg_ref [T] -> o_ref [bq, H], lse_ref [bq]."""
  bq, bk = spec.block_q, spec.block_k
  i = pl.program_id(0)
  q, q_seg = q_ref[...], qseg_ref[...]

  def body(j, carry):
    m, l, acc = carry  # [bq], [bq], [bq, H]
    keys = pl.ds(j * bk, bk)
    s, mask, _ = _logits(q, k_ref[keys, :], i * bq, j * bk, q_seg, kseg_ref[keys], spec)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)  # a row masked so far has m_new = NEG
    v = v_ref[keys, :]
    acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=F32)
    return m_new, alpha * l + jnp.sum(p, axis=1), acc

  init = (jnp.full((bq,), NEG, F32), jnp.zeros((bq,), F32), jnp.zeros(q.shape, F32))
  m, l, acc = lax.fori_loop(*_key_blocks(i, bq, bk, spec), body, init)
  seen = l > 0
  o_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(l), jnp.inf)


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               spec):
  """One (batch row, query head, query block): q_ref / do_ref [bk, H], k_ref / v_ref [T, H],
  qseg_ref / lse_ref / delta_ref [bk], kseg_ref [T] -> dq_ref [bk, H]."""
  b = spec.block_k
  i = pl.program_id(0)
  q, do, q_seg = q_ref[...], do_ref[...], qseg_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def body(j, dq):
    keys = pl.ds(j * b, b)
    k, v = k_ref[keys, :], v_ref[keys, :]
    s, _, th = _logits(q, k, i * b, j * b, q_seg, kseg_ref[keys], spec)
    p = jnp.exp(s - lse[:, None])  # 0 where masked and in rows that see no key
    ds = _dlogits(p, _dot_nt(do, v), delta, th, spec)
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=F32)

  dq = lax.fori_loop(*_key_blocks(i, b, b, spec), body, jnp.zeros(q.shape, F32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, *, spec):
  """One (batch row, kv head, key block): q_ref / do_ref [T, G, H] (the group's query heads),
  k_ref / v_ref [bk, H], qseg_ref [T], kseg_ref [bk], lse_ref / delta_ref [G, T]
  -> dk_ref / dv_ref [bk, H]."""
  b = spec.block_k
  t, g, _ = q_ref.shape
  j = pl.program_id(0)
  k, v, k_seg = k_ref[...], v_ref[...], kseg_ref[...]
  lo, hi = _query_blocks(j, b, b, t // b, spec)

  def head(r, carry):  # r: the query head's rank in the group
    def body(i, carry):
      dk, dv = carry
      rows = pl.ds(i * b, b)
      q, do = q_ref[rows, r, :], do_ref[rows, r, :]
      s, _, th = _logits(q, k, i * b, j * b, qseg_ref[rows], k_seg, spec)
      p = jnp.exp(s - lse_ref[r, rows][:, None])
      ds = _dlogits(p, _dot_nt(do, v), delta_ref[r, rows], th, spec)
      return dk + _dot_tn(ds.astype(q.dtype), q), dv + _dot_tn(p.astype(do.dtype), do)

    return lax.fori_loop(lo, hi, body, carry)

  zeros = jnp.zeros(k.shape, F32)
  dk, dv = lax.fori_loop(0, g, head, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _params(h):
  return plgpu.CompilerParams(num_warps=4 if h <= 64 else 8, num_stages=2)


def _forward(q, k, v, seg, spec):
  """(out [B, T, N, H] in q.dtype, lse [B, N, T] float32)."""
  b, t, n, h = q.shape
  g = n // k.shape[2]
  bq = spec.block_q
  kv = pl.BlockSpec((None, t, None, h), lambda i, b_, n_: (b_, 0, n_ // g, 0))
  q_block = pl.BlockSpec((None, bq, None, h), lambda i, b_, n_: (b_, i, n_, 0))
  return pl.pallas_call(
      functools.partial(_forward_kernel, spec=spec),
      grid=(t // bq, b, n),
      in_specs=[q_block, kv, kv, pl.BlockSpec((None, bq), lambda i, b_, n_: (b_, i)),
                pl.BlockSpec((None, t), lambda i, b_, n_: (b_, 0))],
      out_specs=[q_block, pl.BlockSpec((None, None, bq), lambda i, b_, n_: (b_, n_, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, n, t), F32)],
      compiler_params=_params(h),
      interpret=spec.interpret,
      name="attention_fwd",
  )(q, k, v, seg, seg)


def _dq(q, k, v, seg, do, lse, delta, spec):
  """dq [B, T, N, H] in q.dtype."""
  b, t, n, h = q.shape
  g = n // k.shape[2]
  bk = spec.block_k
  kv = pl.BlockSpec((None, t, None, h), lambda i, b_, n_: (b_, 0, n_ // g, 0))
  q_block = pl.BlockSpec((None, bk, None, h), lambda i, b_, n_: (b_, i, n_, 0))
  row = pl.BlockSpec((None, None, bk), lambda i, b_, n_: (b_, n_, i))
  return pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec),
      grid=(t // bk, b, n),
      in_specs=[q_block, kv, kv, pl.BlockSpec((None, bk), lambda i, b_, n_: (b_, i)),
                pl.BlockSpec((None, t), lambda i, b_, n_: (b_, 0)), q_block, row, row],
      out_specs=q_block,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(h),
      interpret=spec.interpret,
      name="attention_dq",
  )(q, k, v, seg, seg, do, lse, delta)


def _dkv(q, k, v, seg, do, lse, delta, spec):
  """(dk, dv) [B, T, K, H] in k.dtype."""
  b, t, kh, h = k.shape
  g = q.shape[2] // kh
  bk = spec.block_k
  group = pl.BlockSpec((None, t, g, h), lambda j, b_, k_: (b_, 0, k_, 0))  # heads k_ G + [0, G)
  k_block = pl.BlockSpec((None, bk, None, h), lambda j, b_, k_: (b_, j, k_, 0))
  rows = pl.BlockSpec((None, g, t), lambda j, b_, k_: (b_, k_, 0))
  return pl.pallas_call(
      functools.partial(_dkv_kernel, spec=spec),
      grid=(t // bk, b, kh),
      in_specs=[group, k_block, k_block, pl.BlockSpec((None, t), lambda j, b_, k_: (b_, 0)),
                pl.BlockSpec((None, bk), lambda j, b_, k_: (b_, j)), group, rows, rows],
      out_specs=[k_block, k_block],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
      compiler_params=_params(h),
      interpret=spec.interpret,
      name="attention_dkv",
  )(q, k, v, seg, seg, do, lse, delta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, spec):
  return _forward(q, k, v, seg, spec)[0]


def _flash_fwd(q, k, v, seg, spec):
  out, lse = _forward(q, k, v, seg, spec)
  return out, (q, k, v, seg, out, lse)


def _flash_bwd(spec, res, do):
  q, k, v, seg, out, lse = res
  delta = jnp.einsum("BTNH,BTNH->BNT", out.astype(F32), do.astype(F32))  # rowsum(dO * out)
  dk, dv = _dkv(q, k, v, seg, do, lse, delta, spec)
  return _dq(q, k, v, seg, do, lse, delta, spec), dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_head(x, hp):
  """[B, T, ., H] zero-padded to head dim hp."""
  return x if x.shape[-1] == hp else jnp.pad(x, [(0, 0)] * 3 + [(0, hp - x.shape[-1])])


def flash_attention(q, k, v, seg, *, scale, softcap, window, blocks, interpret):
  """Causal flash attention with segment ids, differentiable in q, k, v.

  Args:
    q: [B, T, N, H]. k, v: [B, T, K, H] in q.dtype, N a multiple of K. seg: [B, T] int32
      segment ids shared by q and k (0 = padding).
    scale: logit scale. softcap: None or a float > 0. window: None or a Python int >= 1.
    blocks: (block_q, block_k) from `blocks`. interpret: Pallas interpret mode (CPU).

  Returns:
    [B, T, N, H] in q.dtype; 0 for a query that sees no key.
  """
  h = q.shape[-1]
  hp = max(MIN_BLOCK, pl.next_power_of_2(h))
  spec = Spec(scale=scale, softcap=softcap, window=window, block_q=blocks[0], block_k=blocks[1],
              interpret=interpret)
  out = _flash(*(_pad_head(x, hp) for x in (q, k, v)), seg, spec)
  return out[..., :h]
