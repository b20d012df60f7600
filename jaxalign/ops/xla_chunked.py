"""Chunked XLA token log-probs: online log-sum-exp forward, recomputing backward.

Shape letters: N tokens, D model width, V vocab; n, v are the sizes of one chunk or tile.

Every path works on tempered logits z = soft_cap(x) / temperature of the raw logits
x = hidden @ weight, computed one [n, v] tile at a time, where soft_cap(x) = cap * tanh(x / cap)
with a logit soft-cap (Gemma 2's final_logit_softcapping) and soft_cap(x) = x without one. Every
path keeps four float32 statistics per row:

  lse  log sum_j exp(z_j)                     (log partition function)
  ent  -sum_j p_j log p_j, p = softmax(z)     (entropy)
  tz   z[target] if the target column lies in the tile, else 0
  lsq  log sum_j exp(2 z_j)                   (so log sum_j p_j^2 = lsq - 2 lse: WPO's weights)

ent and lsq are computed only when asked for (zeros / -inf otherwise); lsq gets no gradient.

Tiles over disjoint column ranges merge exactly (`merge_stats`), which is what the online
log-sum-exp over vocab chunks, the Pallas kernels and the vocab-parallel op all use.

The backward pass needs, per row, lse, ez = E_p[z] = lse - ent and two cotangent
coefficients, and recomputes each tile's logits. With c_lp = g_lp * [target >= 0] / T and
c_ent = g_ent / T, the gradient with respect to the raw logits x = hidden @ weight is

  dx = (c_lp * (onehot(target) - p) + c_ent * p * (ez - z)) * s,

(d entropy / dz_k = p_k (E_p[z] - z_k)) where s = T dz/dx is 1 without a cap and
1 - tanh(x / cap)^2 = 1 - (soft_cap(x) / cap)^2 with one (`soft_cap_slope`; the 1 / T is in the
coefficients). dhidden = dx @ weight^T and dweight = hidden^T @ dx are accumulated in float32.
cap=None skips the tanh and the slope entirely: the program is the one without the feature.

With a logit floor f [N] (top-k / top-p replay), row n keeps K_n = {j : z_j >= f_n} plus its
target column: every tile sets the other logits to NEG before the statistics (and before the
gradient), so p is the softmax restricted to K_n, its entropy and E_p[z] are over K_n, and the
formulas above hold unchanged (a masked column has p = 0 exactly, and 0 * (ez - NEG) = 0).
floor=None skips the masking entirely.
"""

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Rows of the XLA path are processed this many at a time, vocab columns this many at a time:
# one [1024, 4096] float32 tile is 16 MiB.
TOKEN_CHUNK = 1024
VOCAB_CHUNK = 4096
NEG = -1e30  # masked logit: exp(NEG - m) == 0 and 0 * NEG == 0, unlike -inf


def soft_cap(x, cap):
  """cap * tanh(x / cap) (Gemma 2's final-logit soft-cap); x itself when cap is None.

  Args:
    x: array of raw logits. cap: None or a Python float > 0 (static).
  """
  if cap is None:
    return x
  return cap * jnp.tanh(x / cap)


def soft_cap_slope(capped, cap):
  """d soft_cap(x) / dx = 1 - tanh(x / cap)^2, from capped = soft_cap(x, cap) (cap not None)."""
  th = capped / cap
  return 1.0 - th * th


class Rows(NamedTuple):
  """Per-row inputs of the backward pass, each [N] float32."""
  lse: jax.Array  # log partition function of the tempered logits
  ez: jax.Array  # E_p[z] = lse - entropy
  coef_lp: jax.Array  # g_logprob * [target >= 0] / temperature
  coef_ent: jax.Array  # g_entropy / temperature


def tile_stats(z, targets, *, with_entropy=True, with_sum_sq=False):
  """(lse, ent, tz, lsq) of one tile of tempered logits.

  Args:
    z: [n, v] float32 tempered logits.
    targets: [n] int, column index inside this tile (anything outside [0, v) is no hit).
    with_entropy: if False, ent is returned as zeros.
    with_sum_sq: if False, lsq is returned as -inf (the empty sum).

  Returns:
    lse, ent, tz, lsq: each [n] float32.
  """
  m = jnp.max(z, axis=-1, keepdims=True)  # [n, 1]
  e = jnp.exp(z - m)  # [n, v]
  s = jnp.sum(e, axis=-1)  # [n]
  lse = m[:, 0] + jnp.log(s)
  if with_entropy:
    ent = jnp.log(s) - jnp.sum(e * (z - m), axis=-1) / s
  else:
    ent = jnp.zeros_like(lse)
  col = lax.broadcasted_iota(jnp.int32, z.shape, 1)
  tz = jnp.sum(jnp.where(col == targets[:, None], z, 0.0), axis=-1)
  if with_sum_sq:  # sum exp(2 z) = exp(2 m) sum e^2, every term <= 1
    lsq = 2.0 * m[:, 0] + jnp.log(jnp.sum(e * e, axis=-1))
  else:
    lsq = jnp.full_like(lse, -jnp.inf)
  return lse, ent, tz, lsq


def floor_mask(z, targets, floor):
  """[n, v] bool: the columns a logit floor keeps, z >= floor or the target column.

  Args:
    z: [n, v] float32 tempered logits. targets: [n] int, column inside this tile.
    floor: [n] float32 (-inf keeps every column).
  """
  col = lax.broadcasted_iota(jnp.int32, z.shape, 1)
  return (z >= floor.reshape(-1, 1)) | (col == targets.reshape(-1, 1))


def apply_floor(z, targets, floor):
  """z [n, v] with the columns `floor_mask` drops set to NEG; z itself when floor is None."""
  if floor is None:
    return z
  return jnp.where(floor_mask(z, targets, floor), z, NEG)


def merge_stats(a, b):
  """Merges (lse, ent, tz, lsq) of two disjoint column ranges; an lse of -inf is the empty range.

  The entropy of a mixture: H = sum_k w_k (H_k - log w_k) with w_k = exp(lse_k - lse).
  """
  lse_a, ent_a, tz_a, lsq_a = a
  lse_b, ent_b, tz_b, lsq_b = b
  lse = jnp.logaddexp(lse_a, lse_b)

  def part(lse_k, ent_k):
    log_w = lse_k - lse
    return jnp.where(jnp.isfinite(log_w), jnp.exp(log_w) * (ent_k - log_w), 0.0)

  return lse, part(lse_a, ent_a) + part(lse_b, ent_b), tz_a + tz_b, jnp.logaddexp(lsq_a, lsq_b)


def empty_stats(n):
  """Statistics of an empty column range for n rows."""
  empty = jnp.full((n,), -jnp.inf, jnp.float32)
  return empty, jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32), empty


def grad_logits_reference(hidden, weight, targets, rows, *, temperature, with_lp=True,
                          with_ent=True, out_dtype=None, floor=None, softcap=None):
  """Gradient with respect to the raw logits hidden @ weight of one [n, v] tile (pure jnp).

  Args:
    hidden: [n, D]. weight: [D, v]. targets: [n] int, column inside this tile.
    rows: `Rows` of [n] float32. with_lp / with_ent: include the log-prob / entropy term.
    out_dtype: dtype of the result (default: hidden's dtype, the dtype of the matmuls).
    floor: None or [n] float32 logit floor (see `floor_mask`); dropped columns get 0.
    softcap: None or the logit soft-cap (see `soft_cap`); the tile's gradient is then
      multiplied by `soft_cap_slope`.

  Returns:
    [n, v] gradient in out_dtype.
  """
  x = jnp.dot(hidden, weight, preferred_element_type=jnp.float32)  # [n, v]
  capped = soft_cap(x, softcap)
  if floor is None and softcap is None:
    z = x / temperature
  else:  # tempered exactly as `forward` does, so both passes keep the same columns
    z = apply_floor(capped * (1.0 / temperature), targets, floor)
  slope = None if softcap is None else soft_cap_slope(capped, softcap)
  gz = grad_from_logits(z, targets, rows, with_lp=with_lp, with_ent=with_ent, slope=slope)
  return gz.astype(out_dtype or hidden.dtype)


def grad_from_logits(z, targets, rows, *, with_lp, with_ent, slope=None):
  """dx of one tile from its tempered logits z [n, v]; rows are [n] (or [n, 1]) float32.

  slope: None (no soft-cap) or [n, v] float32 `soft_cap_slope` of the tile, T dz/dx; the
  gradient with respect to z (times 1 / T, folded into the rows' coefficients) is multiplied
  by it element-wise.
  """
  lse, ez, coef_lp, coef_ent = (r.reshape(-1, 1) for r in rows)
  p = jnp.exp(z - lse)  # [n, v]
  gz = jnp.zeros_like(z)
  if with_lp:
    col = lax.broadcasted_iota(jnp.int32, z.shape, 1)
    onehot = (col == targets.reshape(-1, 1)).astype(jnp.float32)
    gz = gz + coef_lp * (onehot - p)
  if with_ent:
    gz = gz + coef_ent * p * (ez - z)
  if slope is not None:
    gz = gz * slope
  return gz


def _pad_rows(x, n_pad, value=0):
  return jnp.pad(x, [(0, n_pad)] + [(0, 0)] * (x.ndim - 1), constant_values=value)


def _pad_floor(floor, n_pad, shape):
  """The [N] floor padded with -inf and reshaped to `shape`; None stays None."""
  if floor is None:
    return None
  return _pad_rows(floor.astype(jnp.float32), n_pad, -jnp.inf).reshape(shape)


def forward(hidden, weight, targets, *, temperature, with_entropy=True, with_sum_sq=False,
            floor=None, softcap=None, token_chunk=TOKEN_CHUNK, vocab_chunk=VOCAB_CHUNK):
  """(lse, ent, tz, lsq), each [N] float32, without materialising [N, V] logits.

  Args:
    hidden: [N, D]. weight: [D, V]. targets: [N] int column index (out of range: no hit).
    temperature: logits are divided by it. with_entropy: if False, ent is zeros.
    with_sum_sq: if False, lsq is -inf.
    floor: None or [N] float32 tempered-logit floor: the statistics are over the columns
      `floor_mask` keeps (a row that keeps none gets lse = NEG).
    softcap: None or the logit soft-cap: z = soft_cap(hidden @ weight, softcap) / temperature.
    token_chunk, vocab_chunk: tile size; the live temporaries are a few [token_chunk,
      vocab_chunk] float32 arrays.
  """
  n, d = hidden.shape
  bn = min(token_chunk, n)
  nt = -(-n // bn)
  h = _pad_rows(hidden, nt * bn - n).reshape(nt, bn, d)  # [nt, bn, D]
  t = _pad_rows(targets.astype(jnp.int32), nt * bn - n, -1).reshape(nt, bn)
  f = _pad_floor(floor, nt * bn - n, (nt, bn))

  def one_token_chunk(args):
    h_c, t_c, f_c = args
    inv_t = 1.0 / temperature

    def tile(stats, col0, width):
      w_c = lax.dynamic_slice_in_dim(weight, col0, width, axis=1)  # [D, width]
      x = jnp.dot(h_c, w_c, preferred_element_type=jnp.float32)  # [bn, width]
      z = soft_cap(x, softcap) * inv_t
      z = apply_floor(z, t_c - col0, f_c)
      return merge_stats(stats, tile_stats(z, t_c - col0, with_entropy=with_entropy,
                                           with_sum_sq=with_sum_sq))

    return _fold_vocab(tile, empty_stats(bn), weight.shape[1], vocab_chunk)

  stats = lax.map(one_token_chunk, (h, t, f))  # 4 x [nt, bn]
  return tuple(s.reshape(-1)[:n] for s in stats)


def _fold_vocab(step, carry, v, vocab_chunk):
  """carry = step(carry, col0, width) over consecutive column ranges covering [0, v)."""
  cv = min(vocab_chunk, v)
  n_full, tail = divmod(v, cv)
  carry = lax.fori_loop(0, n_full, lambda i, c: step(c, i * cv, cv), carry)
  if tail:
    carry = step(carry, n_full * cv, tail)
  return carry


# (hidden [n, D], weight [D, v], targets [n], rows[, floor=[n]]) -> [n, v]
GradFn = Callable[..., jax.Array]


def backward(grad_fn: GradFn, hidden, weight, targets, rows: Rows, *, floor=None, need_dh=True,
             need_dw=True, dh_dtype=None, dw_dtype=None, token_chunk=TOKEN_CHUNK,
             vocab_chunk=VOCAB_CHUNK):
  """dhidden [N, D] and dweight [D, V] (None where not needed), recomputing logits per tile.

  The outer loop runs over vocab chunks, the inner one over token chunks; `grad_fn` gives
  the tile's dx (e.g. `grad_logits_reference` or a Pallas kernel), and both matmuls with dx
  accumulate in float32 (dhidden across vocab chunks, dweight across token chunks).

  Args:
    grad_fn: tile gradient, called as grad_fn(h [n, D], w [D, v], targets [n], rows), with
      floor=[n] added when there is a floor.
    hidden, weight, targets, floor: as in `forward`. rows: `Rows` of [N] float32.
    need_dh, need_dw: which gradients to compute.
    dh_dtype, dw_dtype: result dtypes (default: the input's).
    token_chunk, vocab_chunk: tile size.
  """
  n, d = hidden.shape
  v = weight.shape[1]
  bn = min(token_chunk, n)
  nt = -(-n // bn)
  pad = nt * bn - n
  h = _pad_rows(hidden, pad).reshape(nt, bn, d)  # [nt, bn, D]
  t = _pad_rows(targets.astype(jnp.int32), pad, -1).reshape(nt, bn)
  r = Rows(*(_pad_rows(x, pad).reshape(nt, bn) for x in rows))  # padded rows: coef 0
  f = _pad_floor(floor, pad, (nt, bn))

  def vocab_step(carry, col0, width):
    dh, dw = carry
    w_c = lax.dynamic_slice_in_dim(weight, col0, width, axis=1)  # [D, width]

    def token_step(dw_c, xs):
      h_t, t_t, r_t, f_t = xs
      floor_kw = {} if f_t is None else dict(floor=f_t)
      gz = grad_fn(h_t, w_c, t_t - col0, r_t, **floor_kw)  # [bn, width]
      dh_t = None
      if need_dh:  # [bn, D]
        dh_t = lax.dot_general(gz, w_c, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
      if need_dw:  # [D, width]
        dw_c = dw_c + lax.dot_general(h_t, gz, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
      return dw_c, dh_t

    dw_c0 = jnp.zeros((d, width), jnp.float32) if need_dw else None
    dw_c, dh_parts = lax.scan(token_step, dw_c0, (h, t, r, f))
    if need_dh:
      dh = dh + dh_parts
    if need_dw:
      dw = lax.dynamic_update_slice_in_dim(dw, dw_c.astype(dw.dtype), col0, axis=1)
    return dh, dw

  dh0 = jnp.zeros((nt, bn, d), jnp.float32) if need_dh else None
  dw0 = jnp.zeros((d, v), dw_dtype or weight.dtype) if need_dw else None
  dh, dw = _fold_vocab(vocab_step, (dh0, dw0), v, vocab_chunk)
  if need_dh:
    dh = dh.reshape(nt * bn, d)[:n].astype(dh_dtype or hidden.dtype)
  return dh, dw


def xla_grad_fn(*, temperature, with_lp, with_ent, softcap=None):
  """The jnp tile gradient used by the XLA path, in `backward`'s grad_fn form."""
  return functools.partial(grad_logits_reference, temperature=temperature,
                           with_lp=with_lp, with_ent=with_ent, softcap=softcap)
