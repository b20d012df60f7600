"""Attention in plain JAX: the naive reference and a blockwise (flash) custom_vjp.

Shape letters: B batch, T queries, S keys, N query heads, K kv heads, G = N // K query heads per
kv head, H head dim; bq / bk the query / key block sizes, nq / nk the numbers of blocks.

Mask (`visible`): query t sees key s iff k_seg[s] != 0, q_seg[t] == k_seg[s], k_pos[s] <= q_pos[t]
and, with a window, q_pos[t] - k_pos[s] < window. Logits s = scale * q.k (float32 accumulation),
soft-capped as cap * tanh(s / cap) before masking. A query that sees no key gets output 0.

Blockwise forward (FlashAttention, Dao et al. 2022, arXiv:2205.14135, Alg. 1, with the online
softmax of Milakov & Gimelshein 2018, arXiv:1805.02867): for each query block a scan over the key
blocks keeps the running row max m, the running sum l and the unnormalised output acc in float32,

  m' = max(m, rowmax(s)),  p = exp(s - m'),  l' = exp(m - m') l + rowsum(p),
  acc' = exp(m - m') acc + p V,  out = acc / l,  lse = m + log l.

Blockwise backward (FlashAttention-2, Dao 2023, arXiv:2307.08691, Alg. 2): with D = rowsum(dO * O),
each (key block, query block) pair recomputes p = exp(s - lse) and accumulates

  dV += p^T dO,  dP = dO V^T,  dS = p * (dP - D),  dQ += dS K,  dK += dS^T Q,

where dS is further multiplied by 1 - tanh^2 under a soft-cap and by the scale. Only out and lse
are saved, so memory is O(T * block), not O(T * S). Block pairs that `block_table` rules out
(causal, window, empty cache slots) are skipped with `lax.cond` (half the work for causal masks).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class FlashSpec:
  """Static configuration of one blockwise attention call."""
  scale: float
  softcap: float | None
  has_window: bool
  block_q: int
  block_k: int
  skip_empty_blocks: bool = True


def visible(q_pos, q_seg, k_pos, k_seg, window):
  """Boolean [B, T, S] mask from q_pos, q_seg [B, T], k_pos, k_seg [B, S], window [] or None."""
  qp, kp = q_pos[:, :, None], k_pos[:, None, :]  # [B, T, 1], [B, 1, S]
  mask = (k_seg[:, None, :] != 0) & (q_seg[:, :, None] == k_seg[:, None, :]) & (kp <= qp)
  if window is not None:
    mask &= qp - kp < window
  return mask  # [B, T, S]


def logits(q, k, scale, softcap):
  """(s, tanh) from q [B, T, K, G, H] and k [B, S, K, H]: s [B, K, G, T, S] float32 and the
  soft-cap's tanh(scale * q.k / softcap) (None without a soft-cap)."""
  s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=F32) * scale
  if softcap is None:
    return s, None
  t = jnp.tanh(s / softcap)
  return softcap * t, t


def naive_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, window, *, scale, softcap):
  """Reference: materialises float32 [B, K, G, T, S] logits; gradients by autodiff.

  q [B, T, N, H], k / v [B, S, K, H], q_pos / q_seg [B, T], k_pos / k_seg [B, S] int32,
  window None or int / [] int32. Returns [B, T, N, H] in q.dtype.
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]
  s, _ = logits(qg, k, scale, softcap)  # [B, K, G, T, S]
  mask = visible(q_pos, q_seg, k_pos, k_seg, window)[:, None, None]  # [B, 1, 1, T, S]
  s = jnp.where(mask, s, jnp.finfo(F32).min)
  # A row with no visible key is uniform here; the mask product makes it 0 (finite gradients).
  p = jax.nn.softmax(s, axis=-1) * mask  # [B, K, G, T, S]
  if t == 1:  # a decode step: XLA:CPU runs this order (batch dims major) as a fast matmul, [B, T, ...] as a slow one
    out = jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(v.dtype), v, preferred_element_type=F32).transpose(0, 3, 1, 2, 4)
  else:
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p.astype(v.dtype), v, preferred_element_type=F32)
  return out.reshape(b, t, n, h).astype(q.dtype)


def _blocks(x, size, fill=0):
  """[B, L, ...] -> [n, B, size, ...], padding L up to n * size with `fill`."""
  n = -(-x.shape[1] // size)
  pad = [(0, 0), (0, n * size - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
  x = jnp.pad(x, pad, constant_values=fill)
  return jnp.moveaxis(x.reshape(x.shape[0], n, size, *x.shape[2:]), 1, 0)


def _unblock(x, length):
  """[n, B, size, ...] -> [B, length, ...] (drops the padding)."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def block_table(q_pos, q_seg, k_pos, k_seg, window, spec):
  """[nq, nk] bool: may query block i see key block j? A superset of the blocks with a visible
  pair, from each block's range of valid positions (causal and window skipping; packed segments
  are not used). Reduced over the batch once, so the block loops need no cross-device traffic
  when the batch is sharded.
  """
  def ranges(pos, seg, size):
    valid = _blocks(seg, size) != 0  # [n, B, size]; padded tails have segment 0
    pos = _blocks(pos, size)
    lo = jnp.min(jnp.where(valid, pos, jnp.iinfo(jnp.int32).max), axis=-1)  # [n, B]
    hi = jnp.max(jnp.where(valid, pos, jnp.iinfo(jnp.int32).min), axis=-1)
    return lo, hi, jnp.any(valid, axis=-1)

  q_lo, q_hi, q_any = (x[:, None] for x in ranges(q_pos, q_seg, spec.block_q))  # [nq, 1, B]
  k_lo, k_hi, k_any = (x[None] for x in ranges(k_pos, k_seg, spec.block_k))  # [1, nk, B]
  both = q_any & k_any  # [nq, nk, B]
  pair = both & (k_lo <= q_hi)  # some key is not after some query
  if window is not None:  # some (query, key) are less than `window` apart
    pair &= jnp.where(both, q_lo, 0) - jnp.where(both, k_hi, 0) < window
  return jnp.any(pair, axis=-1)  # [nq, nk]


def _when(spec, pred, fn, skip, operand):
  """fn(operand) if pred (a [] bool from `block_table`) or skipping is off, else skip(operand)."""
  if not spec.skip_empty_blocks:
    return fn(operand)
  return lax.cond(pred, fn, skip, operand)


def _forward_q_block(spec, window, kv_blocks, q_block):
  """Online softmax of one query block over all key blocks.

  q_block: (q [B, bq, K, G, H], q_pos [B, bq], q_seg [B, bq], table row [nk]); kv_blocks:
  (k, v [nk, B, bk, K, H], k_pos, k_seg [nk, B, bk]). Returns out [B, bq, K, G, H] in q's dtype
  and lse [B, K, G, bq] float32 (+inf for a row with no visible key, so that exp(s - lse) = 0 in
  the backward pass).
  """
  q_i, qpos_i, qseg_i, table_i = q_block
  b, bq, kh, g, h = q_i.shape
  init = (jnp.full((b, kh, g, bq), -jnp.inf, F32), jnp.zeros((b, kh, g, bq), F32),
          jnp.zeros((b, kh, g, bq, h), F32))

  def step(carry, kv_j):
    k_j, v_j, kpos_j, kseg_j, pred = kv_j

    def update(carry):
      m, l, acc = carry
      mask = visible(qpos_i, qseg_i, kpos_j, kseg_j, window)  # [B, bq, bk]
      s, _ = logits(q_i, k_j, spec.scale, spec.softcap)  # [B, K, G, bq, bk]
      s = jnp.where(mask[:, None, None], s, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))  # [B, K, G, bq]
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # all masked so far: exp(-inf) = 0
      p = jnp.exp(s - m_safe[..., None])  # [B, K, G, bq, bk]
      alpha = jnp.exp(m - m_safe)  # [B, K, G, bq]
      pv = jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(v_j.dtype), v_j, preferred_element_type=F32)
      return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

    return _when(spec, pred, update, lambda c: c, carry), None

  (m, l, acc), _ = lax.scan(step, init, (*kv_blocks, table_i))
  seen = l > 0  # [B, K, G, bq]
  out = acc / jnp.where(seen, l, 1.0)[..., None]  # [B, K, G, bq, H]
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
  return jnp.moveaxis(out, 3, 1).astype(q_i.dtype), lse  # [B, bq, K, G, H], [B, K, G, bq]


def _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, window, spec):
  """(out [B, T, N, H] in q.dtype, lse [nq, B, K, G, bq] float32) of the blockwise forward."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  window = window if spec.has_window else None
  qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]
  table = block_table(q_pos, q_seg, k_pos, k_seg, window, spec)  # [nq, nk]
  q_blocks = (_blocks(qg, spec.block_q), _blocks(q_pos, spec.block_q),
              _blocks(q_seg, spec.block_q), table)  # padded queries: segment 0, output 0
  kv_blocks = (_blocks(k, spec.block_k), _blocks(v, spec.block_k), _blocks(k_pos, spec.block_k),
               _blocks(k_seg, spec.block_k))  # padded keys: segment 0, never visible
  out, lse = lax.map(functools.partial(_forward_q_block, spec, window, kv_blocks), q_blocks)
  return _unblock(out, t).reshape(b, t, n, h), lse  # [B, T, N, H], [nq, B, K, G, bq]


def _backward_pair(spec, window, kv_j, carry, q_block):
  """FlashAttention-2 backward of one (key block j, query block i) pair.

  kv_j: (k, v [B, bk, K, H], k_pos, k_seg [B, bk]); carry: (dk, dv [B, bk, K, H] float32);
  q_block: (q, do [B, bq, K, G, H], lse, delta [B, K, G, bq], q_pos, q_seg [B, bq], table [i, j]).
  Returns ((dk, dv), dq_i [B, bq, K, G, H] float32).
  """
  k_j, v_j, kpos_j, kseg_j = kv_j
  q_i, do_i, lse_i, delta_i, qpos_i, qseg_i, pred = q_block

  def update(carry):
    dk, dv = carry
    mask = visible(qpos_i, qseg_i, kpos_j, kseg_j, window)  # [B, bq, bk]
    s, t = logits(q_i, k_j, spec.scale, spec.softcap)  # [B, K, G, bq, bk]
    p = jnp.where(mask[:, None, None], jnp.exp(s - lse_i[..., None]), 0.0)
    dv = dv + jnp.einsum("BKGTS,BTKGH->BSKH", p.astype(do_i.dtype), do_i,
                         preferred_element_type=F32)
    dp = jnp.einsum("BTKGH,BSKH->BKGTS", do_i, v_j, preferred_element_type=F32)
    ds = p * (dp - delta_i[..., None])  # [B, K, G, bq, bk]
    if t is not None:
      ds = ds * (1.0 - t * t)  # d(cap * tanh(x / cap)) / dx
    ds = (ds * spec.scale).astype(q_i.dtype)
    dq_i = jnp.einsum("BKGTS,BSKH->BTKGH", ds, k_j, preferred_element_type=F32)
    dk = dk + jnp.einsum("BKGTS,BTKGH->BSKH", ds, q_i, preferred_element_type=F32)
    return (dk, dv), dq_i

  def skip(carry):
    return carry, jnp.zeros(q_i.shape, F32)

  return _when(spec, pred, update, skip, carry)


def _backward(spec, res, d_out):
  """(dq, dk, dv) in the input dtypes, recomputing p block by block."""
  q, k, v, q_pos, k_pos, q_seg, k_seg, window, out, lse = res
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  window = window if spec.has_window else None
  shape = (b, t, kh, n // kh, h)
  do = _blocks(d_out.reshape(shape), spec.block_q)  # [nq, B, bq, K, G, H]
  delta = jnp.sum(do.astype(F32) * _blocks(out.reshape(shape), spec.block_q).astype(F32), -1)
  delta = jnp.moveaxis(delta, 2, -1)  # [nq, B, K, G, bq]
  table = block_table(q_pos, q_seg, k_pos, k_seg, window, spec)  # [nq, nk]
  q_blocks = (_blocks(q.reshape(shape), spec.block_q), do, lse, delta,
              _blocks(q_pos, spec.block_q), _blocks(q_seg, spec.block_q))
  kv_blocks = (_blocks(k, spec.block_k), _blocks(v, spec.block_k), _blocks(k_pos, spec.block_k),
               _blocks(k_seg, spec.block_k), table.T)

  def key_step(dq, kv_j):
    *kv_j, table_j = kv_j  # table_j [nq]
    zeros = jnp.zeros(kv_j[0].shape, F32)  # [B, bk, K, H]
    pair = functools.partial(_backward_pair, spec, window, kv_j)
    (dk_j, dv_j), dq_parts = lax.scan(pair, (zeros, zeros), (*q_blocks, table_j))
    return dq + dq_parts, (dk_j, dv_j)

  dq, (dk, dv) = lax.scan(key_step, jnp.zeros(q_blocks[0].shape, F32), kv_blocks)
  dq = _unblock(dq, t).reshape(b, t, n, h)
  return dq.astype(q.dtype), _unblock(dk, s).astype(k.dtype), _unblock(dv, s).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def flash(q, k, v, q_pos, k_pos, q_seg, k_seg, window, spec):
  """Blockwise attention; same contract as `naive_attention` (window: [] int32, ignored unless
  spec.has_window). Block sizes must not exceed T / S (the caller clips them)."""
  return _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, window, spec)[0]


def _flash_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, window, spec):
  out, lse = _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, window, spec)
  return out, (q, k, v, q_pos, k_pos, q_seg, k_seg, window, out, lse)


def _flash_bwd(spec, res, d_out):
  dq, dk, dv = _backward(spec, res, d_out)
  return dq, dk, dv, None, None, None, None, None


flash.defvjp(_flash_fwd, _flash_bwd)
