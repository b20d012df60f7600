"""Pallas GPU (Triton) kernels for token log-probs, each with a pure-jnp reference.

Shape letters: N tokens, D model width, V vocab (of this call's weight slice).

Triton programs run in parallel (no sequential grid axis), and every loaded tile must have a
power-of-two size of at least 16 per dot operand dim, so the kernels loop inside a program:

* `forward`: grid (N / bn,). A program owns bn tokens and walks the whole vocab in bv-wide
  tiles; each tile's [bn, bv] logits are accumulated over D in bk-wide slices (float32 dot
  accumulation) and folded into an online log-sum-exp held in registers.
* `grad_logits`: grid (N / bn, V / bv); a program recomputes one tile (same D loop) and writes
  the gradient with respect to the raw logits in the input dtype. `xla_chunked.backward` calls
  it per vocab chunk and does the two weight/hidden matmuls in XLA (cuBLAS).

Tails: blocks are rounded up (D to a multiple of bk, V to a multiple of bv inside the
forward's whole-weight block), which on GPU become bounds-masked loads and in interpret mode
NaN padding; every load past D is masked to 0, columns past V get a large negative logit via
`where`, and rows past N are dropped on store.

A logit floor (optional [N] float32 input, a (bn,) block like the targets) sets the columns
below it, bar the target, to NEG as well (see `xla_chunked.floor_mask`); without one the
kernels take no floor input and do no masking.

A logit soft-cap (static) makes both kernels use z = cap * tanh(x / cap) / T for the raw tile
x = h @ w (`xla_chunked.soft_cap`, in registers), and the grad kernel multiplies its tile by
1 - tanh(x / cap)^2 (`xla_chunked.soft_cap_slope`; the 1 / T is in the row coefficients).
Without one (None) the kernels compute no tanh.

`jax.export(..., platforms=["cuda"])` lowers these on a machine without a GPU when an abstract
CUDA device is in scope (see `abstract_cuda_mesh`).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxalign.ops import xla_chunked

# Untuned defaults (no GPU was available when this was written); powers of two >= 16.
BLOCK_N = 64  # tokens per program
BLOCK_V = 128  # vocab columns per tile
BLOCK_K = 64  # model-width slice per dot
NUM_WARPS = 4
NEG = -1e30  # masked logit: exp(NEG - m) == 0 and 0 * NEG == 0, unlike -inf
CUSTOM_CALL_TARGET = plgpu.CUSTOM_CALL_TARGET_NAME


def _pow2_block(size, block):
  """Block size: `block`, or the next power of two >= max(size, 16) when that is smaller."""
  if block < 16 or block & (block - 1):
    raise ValueError(f"GPU block {block} must be a power of two >= 16")
  return min(block, max(16, pl.next_power_of_2(size)))


def _round_up(x, m):
  return -(-x // m) * m


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def _tile_logits(h_ref, w_ref, c0, *, d, bk, bv, inv_t, softcap):
  """[bn, bv] tempered logits of columns [c0, c0 + bv) of the blocks, summed over D, and the
  capped raw logits (None without a soft-cap): z = soft_cap(x) / T."""
  bn = h_ref.shape[0]
  prec = _precision(h_ref.dtype)

  def body(k, acc):
    kk = k * bk + lax.broadcasted_iota(jnp.int32, (bn, bk), 1)
    h = plgpu.load(h_ref.at[:, pl.ds(k * bk, bk)], mask=kk < d, other=0.0)  # [bn, bk]
    kr = k * bk + lax.broadcasted_iota(jnp.int32, (bk, bv), 0)
    w = plgpu.load(w_ref.at[pl.ds(k * bk, bk), pl.ds(c0, bv)], mask=kr < d, other=0.0)
    return acc + jnp.dot(h, w, preferred_element_type=jnp.float32, precision=prec)

  acc = lax.fori_loop(0, pl.cdiv(d, bk), body, jnp.zeros((bn, bv), jnp.float32))
  if softcap is None:
    return acc * inv_t, None
  capped = xla_chunked.soft_cap(acc, softcap)
  return capped * inv_t, capped


def _floor_ref(refs, has_floor):
  """(f_ref or None, the remaining refs) from the refs after the targets."""
  return (refs[0], refs[1:]) if has_floor else (None, refs)


def _keep_floor(z, col, t, f):
  """[bn, bv] bool: z >= the row's floor f [bn] or the target column t [bn]."""
  return (z >= f[:, None]) | (col == t[:, None])


def _forward_kernel(h_ref, w_ref, t_ref, *refs, d, v_total, bk, bv, inv_t, with_entropy,
                    with_sum_sq, has_floor, softcap):
  """One program: bn tokens against the whole vocab (online log-sum-exp over bv tiles).

  refs: [f_ref (floor, when has_floor)], lse_ref, ent_ref, tz_ref, lsq_ref.
  """
  f_ref, (lse_ref, ent_ref, tz_ref, lsq_ref) = _floor_ref(refs, has_floor)
  bn = h_ref.shape[0]
  t = t_ref[...]  # [bn]
  f = None if f_ref is None else f_ref[...]  # [bn]

  def body(j, carry):
    m_old, s_old, e_old, tz_old, q_old = carry  # each [bn]
    z, _ = _tile_logits(h_ref, w_ref, j * bv, d=d, bk=bk, bv=bv, inv_t=inv_t,
                        softcap=softcap)  # [bn, bv]
    col = j * bv + lax.broadcasted_iota(jnp.int32, (bn, bv), 1)
    keep = col < v_total
    if f is not None:
      keep &= _keep_floor(z, col, t, f)
    z = jnp.where(keep, z, NEG)
    m_new = jnp.maximum(m_old, jnp.max(z, axis=1))
    alpha = jnp.exp(m_old - m_new)
    e = jnp.exp(z - m_new[:, None])
    s_new = alpha * s_old + jnp.sum(e, axis=1)
    e_new = e_old
    if with_entropy:
      e_new = (alpha * (e_old + (m_old - m_new) * s_old)
               + jnp.sum(e * (z - m_new[:, None]), axis=1))
    q_new = alpha * alpha * q_old + jnp.sum(e * e, axis=1) if with_sum_sq else q_old
    tz_new = tz_old + jnp.sum(jnp.where(col == t[:, None], z, 0.0), axis=1)
    return m_new, s_new, e_new, tz_new, q_new

  zeros = jnp.zeros((bn,), jnp.float32)
  init = (jnp.full((bn,), NEG, jnp.float32), zeros, zeros, zeros, zeros)
  m, s, e, tz, q = lax.fori_loop(0, pl.cdiv(v_total, bv), body, init)
  log_s = jnp.log(s)
  lse_ref[...] = m + log_s
  ent_ref[...] = log_s - e / s if with_entropy else zeros
  tz_ref[...] = tz
  lsq_ref[...] = 2.0 * m + jnp.log(q) if with_sum_sq else jnp.full((bn,), -jnp.inf, jnp.float32)


def _floor_args(floor):
  """The floor as an [N] float32 kernel input: [] without one."""
  return [] if floor is None else [floor.astype(jnp.float32)]


def forward(hidden, weight, targets, *, temperature, with_entropy=True, with_sum_sq=False,
            floor=None, softcap=None, block_n=BLOCK_N, block_v=BLOCK_V, block_k=BLOCK_K,
            num_warps=NUM_WARPS, interpret=False):
  """Fused (lse, ent, tz, lsq) of the tempered logits (see `xla_chunked`), each [N] float32.

  Args:
    hidden: [N, D] bf16 or f32. weight: [D, V] same dtype.
    targets: [N] int, column index (out of [0, V): no hit).
    temperature: logits are divided by it. with_entropy: if False, ent is zeros.
    with_sum_sq: if False, lsq is -inf.
    floor: None or [N] float32 logit floor (`xla_chunked.floor_mask`).
    softcap: None or the logit soft-cap (`xla_chunked.soft_cap`), applied before temperature.
    block_n, block_v, block_k: powers of two >= 16. num_warps: Triton warps per program.
    interpret: run on CPU.
  """
  n, d = hidden.shape
  v = weight.shape[1]
  bn, bv, bk = _pow2_block(n, block_n), _pow2_block(v, block_v), _pow2_block(d, block_k)
  d_pad, v_pad = _round_up(d, bk), _round_up(v, bv)
  floor_args = _floor_args(floor)
  kernel = functools.partial(_forward_kernel, d=d, v_total=v, bk=bk, bv=bv,
                             inv_t=1.0 / temperature, with_entropy=with_entropy,
                             with_sum_sq=with_sum_sq, has_floor=bool(floor_args),
                             softcap=softcap)
  row = pl.BlockSpec((bn,), lambda i: (i,))
  return tuple(pl.pallas_call(
      kernel,
      grid=(pl.cdiv(n, bn),),
      in_specs=[pl.BlockSpec((bn, d_pad), lambda i: (i, 0)),
                pl.BlockSpec((d_pad, v_pad), lambda i: (0, 0)), row] + [row] * len(floor_args),
      out_specs=[row] * 4,
      out_shape=[jax.ShapeDtypeStruct((n,), jnp.float32)] * 4,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
      interpret=interpret,
      name="token_logprobs_fwd",
  )(hidden, weight, targets.astype(jnp.int32), *floor_args))


def forward_reference(hidden, weight, targets, *, temperature, with_entropy=True,
                      with_sum_sq=False, floor=None, softcap=None, block_n=BLOCK_N,
                      block_v=BLOCK_V, block_k=BLOCK_K, num_warps=NUM_WARPS, interpret=False):
  """Pure-jnp `forward` (materialises the [N, V] logits)."""
  del block_n, block_v, block_k, num_warps, interpret
  targets = targets.astype(jnp.int32)
  x = jnp.dot(hidden, weight, preferred_element_type=jnp.float32)  # [N, V]
  z = xla_chunked.soft_cap(x, softcap) / temperature
  z = xla_chunked.apply_floor(z, targets, floor)
  return xla_chunked.tile_stats(z, targets, with_entropy=with_entropy, with_sum_sq=with_sum_sq)


def _grad_kernel(h_ref, w_ref, t_ref, *refs, d, v_total, bk, bv, inv_t, with_lp, with_ent,
                 has_floor, softcap):
  """dx of one [bn, bv] tile: c_lp (onehot - p) + c_ent p (ez - z), times 1 - tanh(x / cap)^2
  with a soft-cap, zero past V (and, with a floor, zero on the columns it drops: p =
  exp(NEG - lse) = 0 there).

  refs: [f_ref (floor, when has_floor)], lse_ref, ez_ref, clp_ref, cent_ref, gz_ref.
  """
  f_ref, (lse_ref, ez_ref, clp_ref, cent_ref, gz_ref) = _floor_ref(refs, has_floor)
  bn = h_ref.shape[0]
  j = pl.program_id(1)
  z, capped = _tile_logits(h_ref, w_ref, 0, d=d, bk=bk, bv=bv, inv_t=inv_t,
                           softcap=softcap)  # [bn, bv]
  col = j * bv + lax.broadcasted_iota(jnp.int32, (bn, bv), 1)
  if f_ref is not None:
    z = jnp.where(_keep_floor(z, col, t_ref[...], f_ref[...]), z, NEG)
  p = jnp.exp(z - lse_ref[...][:, None])
  gz = jnp.zeros_like(z)
  if with_lp:
    onehot = jnp.where(col == t_ref[...][:, None], 1.0, 0.0)
    gz += clp_ref[...][:, None] * (onehot - p)
  if with_ent:
    gz += cent_ref[...][:, None] * p * (ez_ref[...][:, None] - z)
  if softcap is not None:
    gz *= xla_chunked.soft_cap_slope(capped, softcap)
  gz_ref[...] = jnp.where(col < v_total, gz, 0.0).astype(gz_ref.dtype)


def grad_logits(hidden, weight, targets, rows, *, temperature, with_lp=True, with_ent=True,
                out_dtype=None, floor=None, softcap=None, block_n=BLOCK_N, block_v=BLOCK_V,
                block_k=BLOCK_K, num_warps=NUM_WARPS, interpret=False):
  """Fused gradient with respect to the raw logits hidden @ weight, [N, V] in out_dtype.

  Args:
    hidden: [N, D]. weight: [D, V]. targets: [N] int column index.
    rows: `xla_chunked.Rows` of [N] float32 (lse, ez, coef_lp, coef_ent).
    with_lp / with_ent: include the log-prob / entropy term. out_dtype: default hidden's.
    floor: None or [N] float32 logit floor.
    softcap: None or the logit soft-cap; the gradient is still with respect to the raw logits.
    block_n, block_v, block_k, num_warps, interpret: as in `forward`.
  """
  n, d = hidden.shape
  v = weight.shape[1]
  bn, bv, bk = _pow2_block(n, block_n), _pow2_block(v, block_v), _pow2_block(d, block_k)
  d_pad = _round_up(d, bk)
  floor_args = _floor_args(floor)
  kernel = functools.partial(_grad_kernel, d=d, v_total=v, bk=bk, bv=bv,
                             inv_t=1.0 / temperature, with_lp=with_lp, with_ent=with_ent,
                             has_floor=bool(floor_args), softcap=softcap)
  row = pl.BlockSpec((bn,), lambda i, j: (i,))
  return pl.pallas_call(
      kernel,
      grid=(pl.cdiv(n, bn), pl.cdiv(v, bv)),
      in_specs=[pl.BlockSpec((bn, d_pad), lambda i, j: (i, 0)),
                pl.BlockSpec((d_pad, bv), lambda i, j: (0, j))] + [row] * (5 + len(floor_args)),
      out_specs=pl.BlockSpec((bn, bv), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((n, v), out_dtype or hidden.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
      interpret=interpret,
      name="token_logprobs_grad",
  )(hidden, weight, targets.astype(jnp.int32), *floor_args,
    *(r.astype(jnp.float32) for r in rows))


def grad_logits_reference(hidden, weight, targets, rows, *, temperature, with_lp=True,
                          with_ent=True, out_dtype=None, floor=None, softcap=None,
                          block_n=BLOCK_N, block_v=BLOCK_V, block_k=BLOCK_K,
                          num_warps=NUM_WARPS, interpret=False):
  """Pure-jnp `grad_logits`."""
  del block_n, block_v, block_k, num_warps, interpret
  return xla_chunked.grad_logits_reference(
      hidden, weight, targets.astype(jnp.int32), rows, temperature=temperature,
      with_lp=with_lp, with_ent=with_ent, out_dtype=out_dtype, floor=floor, softcap=softcap)


def abstract_cuda_mesh(device_kind="NVIDIA H100 80GB HBM3"):
  """An abstract one-device CUDA mesh: under `jax.sharding.use_abstract_mesh(...)` the Triton
  lowering reads the target GPU from it, so `jax.export(..., platforms=["cuda"])` works on a
  machine without a GPU."""
  device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=132, platform="cuda")
  return jax.sharding.AbstractMesh((1,), ("_gpu",), (jax.sharding.AxisType.Explicit,),
                                   abstract_device=device)
