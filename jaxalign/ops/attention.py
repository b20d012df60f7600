"""Memory-efficient grouped-query attention with position / segment masks: one op, several impls.

Shape letters: B batch, T queries, S keys, N query heads, K kv heads (N % K == 0), G = N // K,
H head dim. Query head n uses kv head n // G.

Mask: query t sees key s iff k_seg[s] != 0, q_seg[t] == k_seg[s], k_pos[s] <= q_pos[t] and, with a
window, q_pos[t] - k_pos[s] < window. Training passes positions arange(T) and the batch's segment
ids (0 = padding, 1, 2, ... packed documents); KV-cache decoding passes the cache slots' positions,
the valid flag (0/1) as k_segment_ids and all-ones q_segment_ids. A query with no visible key gets
output 0 (and finite gradients).

impl:
  "naive"       reference einsum; materialises float32 [B, K, G, T, S] (`attention_xla`).
  "xla"         blockwise online softmax with a recomputing custom_vjp (FlashAttention /
                FlashAttention-2 in plain JAX, `attention_xla`); O(T * block) memory; any mask,
                traced windows, soft-cap, decode and prefill.
  "splash"      TPU Pallas splash attention; "pallas_gpu": our Pallas Triton flash attention
                (`attention_triton`: GQA, static window, soft-cap);
  "cudnn"       cuDNN via jax.nn.dot_product_attention. Contracts in `attention_kernels`; each
                kernel's limits (and so every fall-back reason) are in `kernel_blocker`. On a CPU
                host the Pallas kernels run interpreted (tests only).
  "auto"        `route`: tiny problems (NAIVE_MAX_SCORES) -> naive; otherwise, per lowering
                platform (`lax.platform_dependent`, so exporting for TPU / CUDA from a CPU host
                gets the kernels), the platform's kernel in AUTO_KERNEL (TPU: splash, CUDA:
                pallas_gpu) when `kernel_blocker` has no objection, else xla. Decode / prefill
                (cache positions), traced windows and ragged lengths thus go to xla. cudnn is
                never picked automatically.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxalign.ops import attention_kernels as kernels
from jaxalign.ops import attention_triton
from jaxalign.ops import attention_xla

IMPLS = ("auto", "xla", "naive", "splash", "pallas_gpu", "cudnn")
# "auto" uses the naive path when B * N * T * S is at most this (64 MiB of float32 logits): one
# fused computation beats the block loops there (single decode steps, tiny test models).
NAIVE_MAX_SCORES = 2**24
# The kernel "auto" tries on each lowering platform (others: xla). cudnn is left out: it masks
# padding only as per-row lengths, so whether it covers a batch (one right-padded document per
# row) depends on the segment-id *values*, which are not known when the function is traced.
AUTO_KERNEL = {"tpu": "splash", "cuda": "pallas_gpu"}


class Call(NamedTuple):
  """The static facts of one call: what the dispatch looks at, and the impls' options."""
  b: int
  t: int
  s: int
  n: int
  h: int
  dtype: jnp.dtype
  self_attention: bool  # T == S and q / k share the positions and the segment-id arrays
  window: int | None  # the window when static (a Python int), else None
  traced_window: bool
  softcap: float | None
  scale: float = 1.0
  block_q: int = 512
  block_k: int = 512


class Masks(NamedTuple):
  """The mask inputs: positions and segment ids [B, T] / [B, S] int32, window None / int / []."""
  q_pos: jax.Array
  k_pos: jax.Array
  q_seg: jax.Array
  k_seg: jax.Array
  window: jax.Array | int | None


def _needs_self_attention(call):
  if not call.self_attention:  # decode / prefill (cache positions) and cross-attention
    return ("the kernels mask by token index: they need T == S and the same positions and "
            "segment-id arrays for q and k")
  if call.traced_window:  # the kernels compile their mask
    return "a traced window needs impl 'xla' or 'naive'"
  return None


def _splash_blocker(call):
  if kernels.splash_block(call.t, call.block_q) is None:  # Mosaic tiles are lane multiples
    return f"splash needs gcd(T, block_q) a multiple of {kernels.SPLASH_LANES} (T={call.t})"
  return None


def _pallas_gpu_blocker(call):
  if attention_triton.blocks(call.t, call.block_q) is None:  # smallest Triton dot: 16
    return (f"pallas_gpu needs T divisible by {attention_triton.MIN_BLOCK} and block_q >= "
            f"{attention_triton.MIN_BLOCK} (T={call.t}, block_q={call.block_q})")
  return None


def _cudnn_blocker(call):
  if call.softcap is not None:
    return "cudnn has no logit soft-cap"
  if call.dtype not in (jnp.bfloat16, jnp.float16) or call.h % 8:  # cuDNN flash attention
    return "cudnn needs bf16 / f16 inputs and a head dim multiple of 8"
  return None


# kernel -> its own constraints, checked after `_needs_self_attention`.
BLOCKERS = {"splash": _splash_blocker, "pallas_gpu": _pallas_gpu_blocker,
            "cudnn": _cudnn_blocker}


def kernel_blocker(impl, call):
  """Why `impl` cannot take `call` (a one-line reason), or None when it can ("xla" and "naive"
  take every call)."""
  if impl not in BLOCKERS:
    return None
  return _needs_self_attention(call) or BLOCKERS[impl](call)


def route(call):
  """{lowering platform: impl} for impl="auto" ("default": every other platform)."""
  if call.b * call.n * call.t * call.s <= NAIVE_MAX_SCORES:
    return {"default": "naive"}
  table = {"default": "xla"}
  for platform, kernel in AUTO_KERNEL.items():
    if kernel_blocker(kernel, call) is None:
      table[platform] = kernel
  return table


def _naive(q, k, v, m, call):
  return attention_xla.naive_attention(q, k, v, m.q_pos, m.k_pos, m.q_seg, m.k_seg, m.window,
                                       scale=call.scale, softcap=call.softcap)


def _xla(q, k, v, m, call):
  spec = attention_xla.FlashSpec(scale=call.scale, softcap=call.softcap,
                                 has_window=m.window is not None,
                                 block_q=min(call.block_q, call.t),
                                 block_k=min(call.block_k, call.s))
  w = jnp.asarray(0 if m.window is None else m.window, jnp.int32)
  return attention_xla.flash(q, k, v, m.q_pos, m.k_pos, m.q_seg, m.k_seg, w, spec)


def _splash(q, k, v, m, call):
  fn = functools.partial(kernels.splash_attention, window=call.window, scale=call.scale,
                         softcap=call.softcap, block=kernels.splash_block(call.t, call.block_q))
  return kernels.per_shard(fn, q, k.astype(q.dtype), v.astype(q.dtype), m.q_seg)


def _pallas_gpu(q, k, v, m, call):
  fn = functools.partial(kernels.pallas_gpu_attention, window=call.window, scale=call.scale,
                         softcap=call.softcap, block=call.block_q)
  return kernels.per_shard(fn, q, k.astype(q.dtype), v.astype(q.dtype), m.q_seg)


def _cudnn(q, k, v, m, call):
  return kernels.cudnn_attention(q, k.astype(q.dtype), v.astype(q.dtype), m.q_seg,
                                 window=call.window, scale=call.scale)


IMPL_FNS = {"naive": _naive, "xla": _xla, "splash": _splash, "pallas_gpu": _pallas_gpu,
            "cudnn": _cudnn}


def check_inputs(q, k, v, positions, segment_ids, window, softcap, impl, blocks):
  """Validates shapes and options with one-line errors; returns (window, softcap)."""
  if impl not in IMPLS:
    raise ValueError(f"attention: impl={impl!r}; expected one of {IMPLS}")
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] \
      or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
    raise ValueError(f"attention: need q [B, T, N, H] and k, v [B, S, K, H] with N % K == 0; got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  names = ("q_positions", "k_positions", "q_segment_ids", "k_segment_ids")
  shapes = (q.shape[:2], k.shape[:2]) * 2
  for name, x, shape in zip(names, positions + segment_ids, shapes):
    if x.shape != shape or not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"attention: {name} must be integer {list(shape)}; got "
                       f"{x.dtype}{list(x.shape)}")
  if isinstance(window, int | np.integer):
    window = int(window)
  elif window is not None and not (isinstance(window, jax.Array) and window.shape == ()):
    raise TypeError(f"attention: window must be None, an int or an int32 scalar; got {window!r}")
  if isinstance(window, int) and window < 1:
    raise ValueError(f"attention: window must be >= 1; got {window}")
  if min(blocks) < 1:
    raise ValueError(f"attention: block_q and block_k must be >= 1; got {blocks}")
  if softcap is not None and not float(softcap) > 0:
    raise ValueError(f"attention: softcap must be > 0; got {softcap}")
  return window, None if softcap is None else float(softcap)


def attention(q, k, v, *, q_positions, k_positions, q_segment_ids, k_segment_ids, window=None,
              softcap=None, scale=None, impl="auto", block_q=512, block_k=512) -> jax.Array:
  """Grouped-query attention softmax(mask(cap(scale * q k^T))) v without a [T, S] score matrix.

  Args:
    q: [B, T, N, H] queries. k, v: [B, S, K, H] keys and values, N a multiple of K.
    q_positions, q_segment_ids: [B, T] int32. k_positions, k_segment_ids: [B, S] int32
      (segment 0 = padding / an empty cache slot); see the module docstring for the mask.
    window: None, a Python int, or a traced int32 scalar (only impls "xla" / "naive"; pass a
      large value such as 2**30 for "no window"): key s is visible iff q_pos - k_pos < window.
    softcap: None or a float: logits become softcap * tanh(logits / softcap) (Gemma 2).
    scale: logit scale; default H**-0.5.
    impl: "auto", "xla", "naive", "splash", "pallas_gpu", "cudnn" (module docstring).
    block_q, block_k: block sizes of "xla" (clipped to T / S; ragged tails are padded); the
      kernels use blocks dividing T: splash gcd(T, block_q), pallas_gpu powers of two up to
      block_q (`attention_triton.blocks`).

  For self-attention pass the *same* arrays as q_ and k_positions and as q_ and k_segment_ids:
  that (with T == S) is what lets "auto" use the fused kernels, which mask by token index and so
  assume positions that step by one inside each document (arange, or restarting per document).

  Returns:
    [B, T, N, H] in q.dtype; 0 for a query that sees no key.
  """
  positions, segment_ids = (q_positions, k_positions), (q_segment_ids, k_segment_ids)
  window, softcap = check_inputs(q, k, v, positions, segment_ids, window, softcap, impl,
                                (int(block_q), int(block_k)))
  masks = Masks(*(x.astype(jnp.int32) for x in positions + segment_ids), window)
  static_window = window is None or isinstance(window, int)
  call = Call(b=q.shape[0], t=q.shape[1], s=k.shape[1], n=q.shape[2], h=q.shape[3], dtype=q.dtype,
              self_attention=q.shape[1] == k.shape[1] and q_positions is k_positions
              and q_segment_ids is k_segment_ids,
              window=window if static_window else None, traced_window=not static_window,
              softcap=softcap, scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
              block_q=int(block_q), block_k=int(block_k))
  if impl != "auto":
    reason = kernel_blocker(impl, call)
    if reason:
      raise ValueError(f"attention(impl={impl!r}): {reason}; use impl='auto' or 'xla'")
    table = {"default": impl}
  else:
    table = route(call)
  v = v.astype(k.dtype)
  if len(set(table.values())) == 1:
    return IMPL_FNS[table["default"]](q, k, v, masks, call)
  branches = {p: functools.partial(lambda f, q, k, v: f(q, k, v, masks, call), IMPL_FNS[i])
              for p, i in table.items()}
  return lax.platform_dependent(q, k, v, **branches)
