"""Fused attention kernels (JAX's splash and cuDNN, our Triton `attention_triton`) behind the
`ops.attention` contract.

Shape letters: B batch, T queries, S keys, N query heads, K kv heads, G = N // K, H head dim.

The kernels build their mask from token *indices* (causal: s <= t; window: t - s < w) and one
segment-id array, not from positions. They are therefore used only for self-attention calls
(T == S, q and k share the positions and segment-id arrays) whose positions increase by one per
token inside each document (arange, or restarting per packed document); then the index mask equals
the position mask of `attention_xla.visible`. In splash and cudnn padding (segment 0) queries see
only padding keys, which keeps every softmax row non-empty (the diagonal); their outputs are zeroed
afterwards. pallas_gpu applies the full rule (padding keys are never visible) and returns 0 itself.

  splash      TPU Pallas splash attention (`make_splash_mqa`, one kernel per kv head: GQA without
              repeating k/v), causal or local mask, segment ids, logit soft-cap.
  pallas_gpu  our Pallas Triton flash attention (`attention_triton`): causal, static window,
              segment ids, logit soft-cap, GQA without repeating k/v.
  cudnn       `jax.nn.dot_product_attention(implementation="cudnn")`: causal, window, GQA; padding
              only as per-row lengths, so it assumes each row is ONE right-padded document
              (segment ids 1...1 0...0); no soft-cap: jax 0.12's cuDNN attention
              (`jax._src.cudnn.fused_attention_stablehlo`) has no logit soft-cap option. Tracing
              needs the CUDA plugin (cuDNN version).

On a CPU host the Pallas kernels run in interpret mode (slow; for tests), chosen per lowering
platform so that `jax.export(..., platforms=["tpu"/"cuda"])` still gets the real kernels.

XLA's SPMD partitioner cannot split a Pallas custom call (it would gather the whole batch on every
device), so under `sharding.use_mesh` the Pallas kernels run inside `jax.shard_map` (`per_shard`):
batch over the rules' "batch" axes, heads over the "q_heads" / "kv_heads" axes when both split
alike (else heads stay whole). cuDNN's custom call has its own partitioning rules.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from jaxalign import sharding
from jaxalign.ops import attention_triton

SPLASH_LANES = 128  # splash blocks must be multiples of the TPU lane width


def _on_each_platform(make, *args):
  """make(interpret)(*args): interpreted on CPU, the compiled kernel elsewhere."""
  return lax.platform_dependent(*args, cpu=make(True), default=make(False))


def per_shard(fn, q, k, v, seg):
  """fn(q, k, v, seg) -> [B, T, N, H], run per shard of the active `sharding.use_mesh` mesh.

  q [B, T, N, H], k / v [B, T, K, H], seg [B, T]. Outside a multi-device mesh with active rules
  this is fn(q, k, v, seg).
  """
  mesh = jax.sharding.get_abstract_mesh()
  rules = sharding.active_rules()
  if rules is None or mesh.empty or mesh.size == 1:
    return fn(q, k, v, seg)
  q_spec = sharding.logical_to_spec(("batch", None, "q_heads", None), q.shape, mesh, rules)
  k_spec = sharding.logical_to_spec(("batch", None, "kv_heads", None), k.shape, mesh, rules)
  heads = q_spec[2] if q_spec[2] == k_spec[2] else None  # shard i of q heads uses kv shard i
  x_spec, seg_spec = P(q_spec[0], None, heads, None), P(q_spec[0], None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, seg_spec),
                       out_specs=x_spec, check_vma=False)(q, k, v, seg)


def _zero_padding_queries(out, q_seg):
  """out [B, T, N, H] with rows of segment 0 set to 0."""
  return jnp.where((q_seg != 0)[:, :, None, None], out, 0).astype(out.dtype)


def _make_splash_kernel(t, g, window, softcap, block, interpret):
  """A `make_splash_mqa` kernel for G query heads sharing one kv head, sequence length T."""
  if window is None:
    mask = splash.CausalMask((t, t))
  else:
    mask = splash.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mqa(splash.MultiHeadMask([mask] * g), block_sizes=sizes,
                                head_shards=1, q_seq_shards=1, attn_logits_soft_cap=softcap,
                                interpret=interpret)


@functools.lru_cache(maxsize=64)
def _concrete_splash_kernel(*key):
  """The kernel with its block-sparsity tables as NumPy constants (built eagerly, cached).

  jax.Array constants closed over by a differentiated jit become extra arguments, which
  `jax.export` (jax 0.12) cannot unflatten; NumPy constants are embedded instead.
  """
  with jax.ensure_compile_time_eval():
    return jax.tree.map(np.asarray, _make_splash_kernel(*key))


def _splash_kernel(*key):
  try:
    return _concrete_splash_kernel(*key)
  except ValueError:  # no device to evaluate on (only an abstract mesh, e.g. exporting for CUDA)
    return _make_splash_kernel(*key)  # tables stay traced constants


def splash_block(t, block):
  """The splash block size for sequence length T: gcd(T, block) (None if not a lane multiple)."""
  b = math.gcd(t, block)
  return b if b % SPLASH_LANES == 0 else None


def splash_attention(q, k, v, seg, *, window, scale, softcap, block):
  """Splash attention. q [B, T, N, H], k / v [B, T, K, H], seg [B, T] int32 (shared by q and k),
  window None or a Python int, block as from `splash_block`. Returns [B, T, N, H] in q.dtype."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  qh = jnp.transpose((q * scale).astype(q.dtype).reshape(b, t, kh, n // kh, h),
                     (0, 2, 3, 1, 4))  # [B, K, G, T, H]
  kt, vt = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))  # [B, K, T, H]

  def make(interpret):
    kernel = _splash_kernel(t, n // kh, window, softcap, block, interpret)

    def one_row(q_b, k_b, v_b, seg_b):  # [K, G, T, H], [K, T, H], [K, T, H], [T]
      ids = splash.SegmentIds(q=seg_b, kv=seg_b)
      return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=ids))(q_b, k_b, v_b)

    return jax.vmap(one_row)

  out = _on_each_platform(make, qh, kt, vt, seg)  # [B, K, G, T, H]
  out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, h)
  return _zero_padding_queries(out, seg)


def pallas_gpu_attention(q, k, v, seg, *, window, scale, softcap, block):
  """Pallas Triton flash attention (`attention_triton`). q [B, T, N, H], k / v [B, T, K, H],
  seg [B, T] int32 (shared by q and k), window None or a Python int, softcap None or a float,
  block as in `attention_triton.blocks`. Returns [B, T, N, H] in q.dtype."""
  def make(interpret):
    return functools.partial(attention_triton.flash_attention, scale=scale, softcap=softcap,
                             window=window, blocks=attention_triton.blocks(q.shape[1], block),
                             interpret=interpret)

  return _on_each_platform(make, q, k, v, seg)


def cudnn_attention(q, k, v, seg, *, window, scale):
  """cuDNN flash attention for one right-padded document per row. q [B, T, N, H] (bf16 / f16),
  k / v [B, T, K, H], seg [B, T] int32 (1...1 0...0), window None or a Python int."""
  lengths = jnp.sum(seg != 0, axis=1, dtype=jnp.int32)  # [B]
  local = None if window is None else (window - 1, 0)
  try:
    out = jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, query_seq_lengths=lengths,
        key_value_seq_lengths=lengths, local_window_size=local, implementation="cudnn")
  except RuntimeError as e:  # e.g. "cuDNN is not detected." on a host without the CUDA plugin
    raise RuntimeError(f"attention(impl='cudnn'): {e} (needs jax's CUDA plugin with cuDNN; "
                       "use impl='auto' or 'xla')") from e
  return _zero_padding_queries(out, seg)
