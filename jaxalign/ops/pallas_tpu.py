"""Pallas TPU (Mosaic) kernels for token log-probs, each with a pure-jnp reference.

Shape letters: N tokens, D model width, V vocab (of this call's weight slice).

* `forward`: grid (N / bn, V / bv), the vocab axis last and sequential ("arbitrary"). Each
  step multiplies a [bn, D] hidden block by a [D, bv] weight block on the MXU (float32
  accumulation) and folds the [bn, bv] tile into an online log-sum-exp held in VMEM scratch
  (running max m, sum s = sum exp(z - m), sum exp(z - m) (z - m) for the entropy, sum
  exp(2 (z - m)) for log sum p^2, and the target logit). Logits never leave VMEM.
* `grad_logits`: grid (N / bn, V / bv), both parallel; recomputes the tile and writes the
  gradient with respect to the raw logits in the input dtype. `xla_chunked.backward` calls it
  one vocab chunk at a time and does the two weight/hidden matmuls in XLA.

Mosaic block rules: the last two block dims are multiples of (8, 128) or equal to the
array's dims, so bn is a multiple of 8 (16 for bf16 is better) unless it is N, bv a multiple
of 128 unless it is V, and D is never split. Tails (N % bn, V % bv) are edge blocks: columns
past V are masked to a large negative logit and excluded with `where` (never multiplied, so
garbage or NaN padding cannot leak), rows past N are dropped when the block is written.

A logit floor (optional [N] float32 input, a (bn, 1) block like the targets) sets the tile's
columns below it, bar the target, to NEG as well (see `xla_chunked.floor_mask`); without one
the kernels take no floor input and do no masking.

A logit soft-cap (static) makes both kernels use z = cap * tanh(x / cap) / T for the raw tile
x = h @ w (`xla_chunked.soft_cap`, computed in VMEM like the rest), and the grad kernel multiplies
its tile by 1 - tanh(x / cap)^2 (`xla_chunked.soft_cap_slope`; the 1 / T is in the row
coefficients). Without one (None) the kernels compute no tanh.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxalign.ops import xla_chunked

BLOCK_N = 256  # tokens per block
BLOCK_V = 512  # vocab columns per block
NEG = -1e30  # masked logit: exp(NEG - m) == 0 and 0 * NEG == 0, unlike -inf


def _block(size, block, multiple):
  if size <= block:
    return size
  if block % multiple:
    raise ValueError(f"TPU block {block} must be a multiple of {multiple} (or >= {size})")
  return block


def _floor_ref(refs, has_floor):
  """(f_ref or None, the remaining refs) from the refs after the targets."""
  return (refs[0], refs[1:]) if has_floor else (None, refs)


def _mask(z, col, v_total, t_ref, f_ref):
  """NEG past V and, with a floor, below it (the target column always kept)."""
  keep = col < v_total
  if f_ref is not None:
    keep &= (z >= f_ref[...]) | (col == t_ref[...])
  return jnp.where(keep, z, NEG)


def _forward_kernel(h_ref, w_ref, t_ref, *refs, inv_t, v_total, bv, with_entropy, with_sum_sq,
                    has_floor, softcap):
  """One (token block i, vocab block j) step of the online log-sum-exp.

  refs: [f_ref (floor, when has_floor)], lse_ref, ent_ref, tz_ref, lsq_ref, then 5 scratch refs.
  """
  f_ref, refs = _floor_ref(refs, has_floor)
  lse_ref, ent_ref, tz_ref, lsq_ref, m_sc, s_sc, e_sc, tz_sc, q_sc = refs
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
    for sc in (s_sc, e_sc, tz_sc, q_sc):
      sc[...] = jnp.zeros(sc.shape, jnp.float32)

  x = jnp.dot(h_ref[...], w_ref[...], preferred_element_type=jnp.float32)  # [bn, bv]
  z = xla_chunked.soft_cap(x, softcap) * inv_t
  col = j * bv + lax.broadcasted_iota(jnp.int32, z.shape, 1)
  z = _mask(z, col, v_total, t_ref, f_ref)
  m_old = m_sc[...]  # [bn, 1]
  s_old = s_sc[...]
  m_new = jnp.maximum(m_old, jnp.max(z, axis=1, keepdims=True))
  alpha = jnp.exp(m_old - m_new)
  e = jnp.exp(z - m_new)  # [bn, bv]
  s_sc[...] = alpha * s_old + jnp.sum(e, axis=1, keepdims=True)
  if with_entropy:  # sum exp(z - m)(z - m), rescaled to the new max
    e_sc[...] = (alpha * (e_sc[...] + (m_old - m_new) * s_old)
                 + jnp.sum(e * (z - m_new), axis=1, keepdims=True))
  if with_sum_sq:  # sum exp(2 (z - m)), rescaled to the new max
    q_sc[...] = alpha * alpha * q_sc[...] + jnp.sum(e * e, axis=1, keepdims=True)
  m_sc[...] = m_new
  hit = col == t_ref[...]
  tz_sc[...] += jnp.sum(jnp.where(hit, z, 0.0), axis=1, keepdims=True)

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    log_s = jnp.log(s_sc[...])
    lse_ref[...] = m_sc[...] + log_s
    ent_ref[...] = log_s - e_sc[...] / s_sc[...] if with_entropy else jnp.zeros_like(log_s)
    tz_ref[...] = tz_sc[...]
    if with_sum_sq:
      lsq_ref[...] = 2.0 * m_sc[...] + jnp.log(q_sc[...])
    else:
      lsq_ref[...] = jnp.full(log_s.shape, -jnp.inf, jnp.float32)


def _floor_args(floor, n):
  """The floor as a [N, 1] float32 kernel input: [] without one."""
  return [] if floor is None else [floor.astype(jnp.float32).reshape(n, 1)]


def forward(hidden, weight, targets, *, temperature, with_entropy=True, with_sum_sq=False,
            floor=None, softcap=None, block_n=BLOCK_N, block_v=BLOCK_V, interpret=False):
  """Fused (lse, ent, tz, lsq) of the tempered logits (see `xla_chunked`), each [N] float32.

  Args:
    hidden: [N, D] bf16 or f32. weight: [D, V] same dtype.
    targets: [N] int, column index (out of [0, V): no hit).
    temperature: logits are divided by it. with_entropy: if False, ent is zeros.
    with_sum_sq: if False, lsq is -inf.
    floor: None or [N] float32 logit floor (`xla_chunked.floor_mask`).
    softcap: None or the logit soft-cap (`xla_chunked.soft_cap`), applied before temperature.
    block_n, block_v: block sizes (multiples of 8 and 128). interpret: run on CPU.
  """
  n, d = hidden.shape
  v = weight.shape[1]
  bn, bv = _block(n, block_n, 8), _block(v, block_v, 128)
  floor_args = _floor_args(floor, n)
  kernel = functools.partial(_forward_kernel, inv_t=1.0 / temperature, v_total=v, bv=bv,
                             with_entropy=with_entropy, with_sum_sq=with_sum_sq,
                             has_floor=bool(floor_args), softcap=softcap)
  row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
  out = pl.pallas_call(
      kernel,
      grid=(pl.cdiv(n, bn), pl.cdiv(v, bv)),
      in_specs=[pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
                pl.BlockSpec((d, bv), lambda i, j: (0, j)), row] + [row] * len(floor_args),
      out_specs=[row] * 4,
      out_shape=[jax.ShapeDtypeStruct((n, 1), jnp.float32)] * 4,
      scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32)] * 5,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
      name="token_logprobs_fwd",
  )(hidden, weight, targets.astype(jnp.int32).reshape(n, 1), *floor_args)
  return tuple(o[:, 0] for o in out)


def forward_reference(hidden, weight, targets, *, temperature, with_entropy=True,
                      with_sum_sq=False, floor=None, softcap=None, block_n=BLOCK_N,
                      block_v=BLOCK_V, interpret=False):
  """Pure-jnp `forward` (materialises the [N, V] logits)."""
  del block_n, block_v, interpret
  targets = targets.astype(jnp.int32)
  x = jnp.dot(hidden, weight, preferred_element_type=jnp.float32)  # [N, V]
  z = xla_chunked.soft_cap(x, softcap) / temperature
  z = xla_chunked.apply_floor(z, targets, floor)
  return xla_chunked.tile_stats(z, targets, with_entropy=with_entropy, with_sum_sq=with_sum_sq)


def _grad_kernel(h_ref, w_ref, t_ref, *refs, inv_t, v_total, bv, with_lp, with_ent,
                 has_floor, softcap):
  """dx of one [bn, bv] tile: c_lp (onehot - p) + c_ent p (ez - z), times 1 - tanh(x / cap)^2
  with a soft-cap, zero past V (and, with a floor, zero on the columns it drops: p =
  exp(NEG - lse) = 0 there).

  refs: [f_ref (floor, when has_floor)], lse_ref, ez_ref, clp_ref, cent_ref, gz_ref.
  """
  f_ref, refs = _floor_ref(refs, has_floor)
  lse_ref, ez_ref, clp_ref, cent_ref, gz_ref = refs
  j = pl.program_id(1)
  x = jnp.dot(h_ref[...], w_ref[...], preferred_element_type=jnp.float32)  # [bn, bv]
  capped = xla_chunked.soft_cap(x, softcap)
  z = capped * inv_t
  col = j * bv + lax.broadcasted_iota(jnp.int32, z.shape, 1)
  if f_ref is not None:
    z = jnp.where((z >= f_ref[...]) | (col == t_ref[...]), z, NEG)
  p = jnp.exp(z - lse_ref[...])
  gz = jnp.zeros_like(z)
  if with_lp:
    gz += clp_ref[...] * (jnp.where(col == t_ref[...], 1.0, 0.0) - p)
  if with_ent:
    gz += cent_ref[...] * p * (ez_ref[...] - z)
  if softcap is not None:
    gz *= xla_chunked.soft_cap_slope(capped, softcap)
  gz_ref[...] = jnp.where(col < v_total, gz, 0.0).astype(gz_ref.dtype)


def grad_logits(hidden, weight, targets, rows, *, temperature, with_lp=True, with_ent=True,
                out_dtype=None, floor=None, softcap=None, block_n=BLOCK_N, block_v=BLOCK_V,
                interpret=False):
  """Fused gradient with respect to the raw logits hidden @ weight, [N, V] in out_dtype.

  Args:
    hidden: [N, D]. weight: [D, V]. targets: [N] int column index.
    rows: `xla_chunked.Rows` of [N] float32 (lse, ez, coef_lp, coef_ent).
    with_lp / with_ent: include the log-prob / entropy term.
    out_dtype: result dtype (default hidden's). floor: None or [N] float32 logit floor.
    softcap: None or the logit soft-cap; the gradient is still with respect to the raw logits.
    block_n, block_v, interpret: as in `forward`.
  """
  n, d = hidden.shape
  v = weight.shape[1]
  bn, bv = _block(n, block_n, 8), _block(v, block_v, 128)
  floor_args = _floor_args(floor, n)
  kernel = functools.partial(_grad_kernel, inv_t=1.0 / temperature, v_total=v, bv=bv,
                             with_lp=with_lp, with_ent=with_ent, has_floor=bool(floor_args),
                             softcap=softcap)
  row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
  return pl.pallas_call(
      kernel,
      grid=(pl.cdiv(n, bn), pl.cdiv(v, bv)),
      in_specs=[pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
                pl.BlockSpec((d, bv), lambda i, j: (0, j))] + [row] * (5 + len(floor_args)),
      out_specs=pl.BlockSpec((bn, bv), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((n, v), out_dtype or hidden.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=interpret,
      name="token_logprobs_grad",
  )(hidden, weight, targets.astype(jnp.int32).reshape(n, 1), *floor_args,
    *(r.astype(jnp.float32).reshape(n, 1) for r in rows))


def grad_logits_reference(hidden, weight, targets, rows, *, temperature, with_lp=True,
                          with_ent=True, out_dtype=None, floor=None, softcap=None,
                          block_n=BLOCK_N, block_v=BLOCK_V, interpret=False):
  """Pure-jnp `grad_logits`."""
  del block_n, block_v, interpret
  return xla_chunked.grad_logits_reference(
      hidden, weight, targets.astype(jnp.int32), rows, temperature=temperature,
      with_lp=with_lp, with_ent=with_ent, out_dtype=out_dtype, floor=floor, softcap=softcap)
