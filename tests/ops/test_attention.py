"""ops.attention: the blockwise "xla" and the "naive" impls against a float64 NumPy reference
(output and dq, dk, dv), compiled temp memory, the Pallas kernels in interpret mode, the dispatch
table, and lowering of the kernel paths for TPU and CUDA on this CPU host."""

import dataclasses
import functools
import importlib.util
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.ops import attention as attention_mod
from jaxalign.ops import attention_triton, attention_xla
from jaxalign.ops import pallas_gpu
from jaxalign.ops.attention import Call, attention, kernel_blocker, route

pytestmark = [
    pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning"),
]
H = 8
# Tolerances on max |got - want| / max |want| for the output and each gradient.
TOL = {np.dtype(jnp.float32): 2e-5, np.dtype(jnp.bfloat16): 3e-2}
TRITON = pallas_gpu.CUSTOM_CALL_TARGET


def as_f64(x):
  """Array (bf16 included) -> float64 NumPy, exactly (float64 input is kept as is)."""
  if isinstance(x, np.ndarray) and x.dtype == np.float64:
    return x
  return np.asarray(np.asarray(x, dtype=np.float32), dtype=np.float64)


def reference(q, k, v, g, q_pos, k_pos, q_seg, k_seg, *, window=None, softcap=None):
  """Float64 attention and the gradients of sum(g * out), written from the definition.

  Args: q, g [B, T, N, H]; k, v [B, S, K, H]; q_pos, q_seg [B, T]; k_pos, k_seg [B, S].
  Returns: dict of float64 out, dq [B, T, N, H], dk, dv [B, S, K, H] and seen [B, T, N] (the query
  sees at least one key).
  """
  q, k, v, g = (as_f64(x) for x in (q, k, v, g))
  b, t, n, h = q.shape
  kh = k.shape[2]
  ke, ve = (np.repeat(x, n // kh, axis=2) for x in (k, v))  # [B, S, N, H]: head n -> kv n // G
  x = np.einsum("btnh,bsnh->bnts", q, ke) / np.sqrt(h)
  th = np.tanh(x / softcap) if softcap else None
  s = softcap * th if softcap else x
  qp, kp = np.asarray(q_pos)[:, None, :, None], np.asarray(k_pos)[:, None, None, :]
  q_seg, k_seg = np.asarray(q_seg)[:, None, :, None], np.asarray(k_seg)[:, None, None, :]
  mask = (k_seg != 0) & (q_seg == k_seg) & (kp <= qp)  # [B, 1, T, S]
  if window is not None:
    mask &= qp - kp < window
  s = np.where(mask, s, -np.inf)
  m = np.max(s, -1, keepdims=True)
  e = np.exp(s - np.where(np.isfinite(m), m, 0.0))  # 0 where masked
  denom = e.sum(-1, keepdims=True)
  p = e / np.where(denom > 0, denom, 1.0)  # [B, N, T, S]; rows with no visible key are 0
  dp = np.einsum("btnh,bsnh->bnts", g, ve)
  dx = p * (dp - np.sum(p * dp, -1, keepdims=True)) / np.sqrt(h)  # softmax Jacobian
  if softcap:
    dx *= 1.0 - th**2
  grouped = lambda y: y.reshape(b, -1, kh, n // kh, h).sum(3)  # sum the G heads of a kv head
  return {"out": np.einsum("bnts,bsnh->btnh", p, ve),
          "dq": np.einsum("bnts,bsnh->btnh", dx, ke),
          "dk": grouped(np.einsum("bnts,btnh->bsnh", dx, q)),
          "dv": grouped(np.einsum("bnts,btnh->bsnh", p, g)),
          "seen": np.moveaxis(np.broadcast_to(mask.any(-1), (b, n, t)), 1, 2)}


def rel_err(got, want):
  return float(np.max(np.abs(as_f64(got) - want)) / max(np.max(np.abs(want)), 1e-30))


def arange(b, t):
  return np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()


def segs(*rows):
  """Segment-id rows from runs: segs([(1, 5), (0, 3)]) = [[1, 1, 1, 1, 1, 0, 0, 0]]."""
  return np.asarray([sum(([i] * n for i, n in row), []) for row in rows], np.int32)


def make_case(seed, *, t=24, s=None, n=4, kh=2, b=2, dtype=jnp.float32, q_scale=1.0, **kw):
  """Random q, k, v, g (NumPy) and training-shaped masks (arange positions, all-ones segments);
  kw overrides any field (segment ids, positions, window, softcap, block_q, block_k)."""
  s = t if s is None else s
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, np.float32).astype(dtype)
  case = dict(q=(normal(b, t, n, H) * q_scale).astype(dtype), k=normal(b, s, kh, H),
              v=normal(b, s, kh, H), g=normal(b, t, n, H),
              q_positions=arange(b, t), k_positions=arange(b, s),
              q_segment_ids=np.ones((b, t), np.int32), k_segment_ids=np.ones((b, s), np.int32),
              window=None, softcap=None, block_q=16, block_k=8)  # ragged: 24 = 16 + 8
  case.update(kw)
  return case


def training(seg, **kw):
  return make_case(1, t=seg.shape[1], b=seg.shape[0], q_segment_ids=seg, k_segment_ids=seg, **kw)


def decode_case():
  """T=1 against 16 cache slots: row 0 a left-padded prompt (slots 0-3 empty) and unwritten tail
  slots; row 1 a full cache whose slots 10-15 hold positions after the query's (not visible)."""
  valid = segs([(0, 4), (1, 7), (0, 5)], [(1, 16)])
  k_pos = np.stack([np.maximum(np.arange(16) - 4, 0), np.arange(16)]).astype(np.int32)
  return make_case(2, t=1, s=16, k_positions=k_pos, k_segment_ids=valid,
                   q_positions=np.asarray([[6], [9]], np.int32),
                   q_segment_ids=np.ones((2, 1), np.int32))


def prefill_case():
  """T=6 prompt tokens written into slots 0-5 of a 16-slot cache (row 0 left-padded by 2)."""
  valid = segs([(0, 2), (1, 4), (0, 10)], [(1, 6), (0, 10)])
  k_pos = np.concatenate([np.asarray([[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]),
                          np.zeros((2, 10))], axis=1).astype(np.int32)
  return make_case(3, t=6, s=16, k_positions=k_pos, k_segment_ids=valid,
                   q_positions=k_pos[:, :6], q_segment_ids=np.ones((2, 6), np.int32), window=4)


PACKED = segs([(1, 9), (2, 7), (3, 5), (0, 3)], [(1, 12), (2, 12)])
ONES = dict(q_segment_ids=np.ones((2, 24), np.int32), k_segment_ids=np.ones((2, 24), np.int32))
RAGGED = segs([(0, 3), (1, 30), (2, 4)], [(1, 37)])
# name -> (case, overrides that remove the feature under test: the reference must change). Every
# case has ragged blocks (T = 24 = 16 + 8 with block_q 16; T = 37 = 2 * 16 + 5).
CASES = {
    "right_padding": (lambda: training(segs([(1, 17), (0, 7)], [(1, 24)])), ONES),
    "left_padding_and_empty_row": (lambda: training(segs([(0, 6), (1, 18)], [(0, 24)])), ONES),
    "packed": (lambda: training(PACKED), ONES),
    "window_gqa_k2_ragged_t37_block16": (lambda: training(RAGGED, window=5, block_k=16),
                                         dict(window=None)),
    "softcap_mqa_k1": (lambda: training(PACKED, kh=1, softcap=1.5, q_scale=3.0),
                       dict(softcap=None)),
    "decode": (decode_case, dict(k_positions=np.zeros((2, 16), np.int32))),
    "prefill": (prefill_case, dict(window=None)),
    "bf16": (lambda: training(PACKED, dtype=jnp.bfloat16, window=9), dict(window=None)),
}
MASK_KEYS = ("q_positions", "k_positions", "q_segment_ids", "k_segment_ids")


def ref_of(case, **overrides):
  c = {**case, **overrides}
  return reference(c["q"], c["k"], c["v"], c["g"], *(c[x] for x in MASK_KEYS),
                   window=c["window"], softcap=c["softcap"])


@functools.partial(jax.jit, static_argnames=("impl", "softcap", "block_q", "block_k"))
def out_and_grads(q, k, v, g, masks, window, *, impl, softcap=None, block_q=16, block_k=8):
  """(out, dq, dk, dv) of sum(g * attention(...)) for one impl; window None or traced."""
  def f(q, k, v):
    return attention(q, k, v, **dict(zip(MASK_KEYS, masks)), window=window, softcap=softcap,
                     impl=impl, block_q=block_q, block_k=block_k)
  out, vjp = jax.vjp(f, q, k, v)
  return (out, *vjp(g))


def run_case(case, impl, window=None):
  """out_and_grads of a case dict (its window as a traced int32 scalar, or `window`)."""
  window = case["window"] if window is None else window
  return out_and_grads(case["q"], case["k"], case["v"], case["g"],
                       tuple(case[x] for x in MASK_KEYS),
                       None if window is None else jnp.int32(window), impl=impl,
                       softcap=case["softcap"], block_q=case["block_q"], block_k=case["block_k"])


def check_against_reference(got, want, dtype):
  """All four arrays within TOL of the float64 reference; unseen queries exactly 0; finite."""
  for name, x in zip(("out", "dq", "dk", "dv"), got):
    assert x.dtype == dtype and bool(jnp.all(jnp.isfinite(x))), name
    err, tol = rel_err(x, want[name]), TOL[np.dtype(dtype)]
    assert err < tol, f"{name}: rel err {err:.2e} >= {tol}"
  assert not np.any(np.asarray(got[0], np.float32)[~want["seen"]])  # padding queries: output 0


@pytest.mark.parametrize("name", list(CASES))
def test_xla_and_naive_match_float64_reference(name):
  """Output and dq, dk, dv of both impls within TOL of float64 (windows passed traced here; static
  int windows go through the kernel and "auto" tests)."""
  make, without = CASES[name]
  case = make()
  want = ref_of(case)
  if without is not None:  # the feature under test changes the answer
    assert np.max(np.abs(ref_of(case, **without)["out"] - want["out"])) > 0.05
  for impl in ("naive", "xla"):
    check_against_reference(run_case(case, impl), want, case["q"].dtype)


def test_empty_rows_are_zero_with_finite_grads():
  case = CASES["left_padding_and_empty_row"][0]()
  assert not ref_of(case)["seen"][1].any()  # row 1 is all padding
  for impl in ("naive", "xla"):
    out, dq, dk, dv = run_case(case, impl)
    assert not np.any(out[1]) and not np.any(dq[1]) and not np.any(dk[1]) and not np.any(dv[1])
    assert np.any(dq[0]) and np.all(np.isfinite(dq))


def test_traced_window_under_jit():
  """A layer scan passes per-layer windows as data: one compiled function, several windows."""
  case = CASES["window_gqa_k2_ragged_t37_block16"][0]()
  for impl in ("xla", "naive", "auto"):
    outs = []
    for window in (3, 2**30):
      got = run_case(case, impl, window=window)
      check_against_reference(got, ref_of(case, window=window), jnp.float32)
      outs.append(got[0])
    assert float(jnp.max(jnp.abs(outs[0] - outs[1]))) > 0.05
  assert np.allclose(ref_of(case, window=2**30)["out"], ref_of(case, window=None)["out"])


def test_reference_gradient_matches_finite_differences():
  """The float64 reference's analytic gradients against central differences (soft-cap, GQA)."""
  case = make_case(7, t=5, b=1, n=2, kh=1, softcap=2.0, window=3, q_scale=2.0,
                   q_segment_ids=segs([(1, 3), (2, 2)]), k_segment_ids=segs([(1, 3), (2, 2)]))
  want = ref_of(case)
  eps = 1e-6
  for name in ("q", "k", "v"):
    x = as_f64(case[name])
    idx = np.unravel_index(np.argmax(np.abs(want["d" + name])), x.shape)
    for sign_idx in (idx, (0,) * x.ndim):
      hi, lo = x.copy(), x.copy()
      hi[sign_idx] += eps
      lo[sign_idx] -= eps
      f = lambda y: np.sum(as_f64(case["g"]) * ref_of(case, **{name: y})["out"])
      np.testing.assert_allclose((f(hi) - f(lo)) / (2 * eps), want["d" + name][sign_idx],
                                 rtol=1e-6, atol=1e-8)


def test_block_table_skips_only_blocks_without_visible_pairs():
  """Causal / window / empty-cache block pairs are skipped, and never a pair with a visible key."""
  spec = attention_xla.FlashSpec(scale=1.0, softcap=None, has_window=True, block_q=16,
                                 block_k=16)
  table = jax.jit(attention_xla.block_table, static_argnums=5)
  pos, ones = arange(1, 64), np.ones((1, 64), np.int32)
  np.testing.assert_array_equal(table(pos, ones, pos, ones, None, spec), np.tri(4, dtype=bool))
  band = np.tri(4, dtype=bool) & ~np.tri(4, k=-2, dtype=bool)  # t - s < 17: this and the last
  np.testing.assert_array_equal(table(pos, ones, pos, ones, jnp.int32(17), spec), band)
  valid = np.concatenate([np.ones((1, 20), np.int32), np.zeros((1, 44), np.int32)], axis=1)
  decode = table(np.full((1, 1), 16, np.int32), np.ones((1, 1), np.int32), pos, valid, None,
                 dataclasses.replace(spec, block_q=1))  # sees slot 16 only in block 1
  np.testing.assert_array_equal(decode, [[True, True, False, False]])  # unwritten slots skipped
  case = training(np.concatenate([PACKED, PACKED[::-1]], axis=1), window=11)  # T = 48
  mask = attention_xla.visible(*(case[x] for x in MASK_KEYS[0::2] + MASK_KEYS[1::2]), 11)
  got = table(*(case[x] for x in MASK_KEYS[0::2] + MASK_KEYS[1::2]), jnp.int32(11), spec)
  needed = np.asarray(mask).reshape(2, 3, 16, 3, 16).any(axis=(0, 2, 4))
  assert np.all(got >= needed) and not np.all(got)


def _temp_bytes(impl, t):
  b, n, kh = 1, 2, 1

  def loss(q, k, v):
    pos, seg = arange(b, t), jnp.ones((b, t), jnp.int32)
    out = attention(q, k, v, q_positions=pos, k_positions=pos, q_segment_ids=seg,
                    k_segment_ids=seg, impl=impl, block_q=128, block_k=128)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  q = jax.ShapeDtypeStruct((b, t, n, 16), jnp.float32)
  kv = jax.ShapeDtypeStruct((b, t, kh, 16), jnp.float32)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_xla_temp_memory_grows_linearly_in_t():
  """Forward + backward temp memory: xla ~2x per doubling of T, naive ~4x (the [T, S] logits)."""
  xla = [_temp_bytes("xla", t) for t in (1024, 2048)]
  naive = [_temp_bytes("naive", t) for t in (1024, 2048)]
  print(f"temp bytes xla {xla} ratio {xla[1] / xla[0]:.2f}; "
        f"naive {naive} ratio {naive[1] / naive[0]:.2f}")
  assert xla[1] < 2.3 * xla[0], xla
  assert naive[1] > 3 * naive[0], naive
  assert xla[1] * 8 < naive[1]


def _kernel_case(t, n, kh, b=1, **kw):
  """Training-shaped: packed documents with left and right padding in row 0."""
  seg = segs(*([[(0, 5), (1, t // 2 - 5), (2, t // 2 - 7), (0, 7)], [(1, t)]] * b)[:b])
  return make_case(8, t=t, b=b, n=n, kh=kh, q_segment_ids=seg, k_segment_ids=seg, **kw)


def shared_masks(impl, **kw):
  """attention(q, k, v, pos, seg) with q and k sharing the positions and segment-id arrays (the
  training layout the kernels need)."""
  def f(q, k, v, pos, seg):
    return attention(q, k, v, q_positions=pos, k_positions=pos, q_segment_ids=seg,
                     k_segment_ids=seg, impl=impl, **kw)
  return f


def _kernel_args(case):
  return case["q"], case["k"], case["v"], case["q_positions"], case["q_segment_ids"]


# name -> the features of a Triton-kernel case (T = 64 in blocks of 16: window 20 skips key blocks).
TRITON_CASES = {
    "causal": {},
    "softcap": dict(softcap=1.5, q_scale=3.0),
    "window": dict(window=20),
    "window_softcap": dict(window=20, softcap=2.0, q_scale=3.0),
    "window_softcap_g3": dict(window=20, softcap=2.0, q_scale=3.0, n=6),
}


def pallas_gpu_vs_naive(case):
  """(got, want): out, dq, dk, dv of the Triton kernel (interpret mode, blocks of 16) and of
  "naive"."""
  q, k, v, pos, seg = _kernel_args(case)
  results = []
  for impl in ("pallas_gpu", "naive"):
    f = jax.jit(shared_masks(impl, window=case["window"], softcap=case["softcap"], block_q=16))
    out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, pos, seg), q, k, v)
    results.append((out, *vjp(case["g"])))
  return results


def assert_close(got, want):
  for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_pallas_gpu_kernel_interpreted_matches_naive(name):
  """Our Triton flash kernel (`attention_triton`) in Pallas interpret mode on CPU, forward and
  dq, dk, dv against "naive" in float32: GQA (N=4 or 6, K=2), packed documents with left and right
  padding, soft-cap, window (each feature changes the answer)."""
  kw = dict(TRITON_CASES[name])
  case = _kernel_case(64, kw.pop("n", 4), 2, b=2, **kw)
  got, want = pallas_gpu_vs_naive(case)
  assert_close(got, want)
  check_against_reference(got, ref_of(case), jnp.float32)
  for feature in ("window", "softcap"):
    if case[feature] is not None:
      assert np.max(np.abs(ref_of(case, **{feature: None})["out"] - as_f64(want[0]))) > 0.05


def test_pallas_gpu_softcap_derivative_where_tanh_saturates(monkeypatch):
  """Logits with median |x| ~6x the cap (three quarters have |tanh| > 0.99): the soft-cap's
  1 - tanh^2 makes dq and dk unlike the uncapped ones. The kernel matches naive, and the same
  kernel without that factor misses dq and dk by more than their size."""
  case = _kernel_case(32, 4, 2, b=2, softcap=1.0, q_scale=10.0)
  got, want = pallas_gpu_vs_naive(case)
  assert_close(got, want)
  uncapped = ref_of(case, softcap=None)
  assert rel_err(want[1], uncapped["dq"]) > 0.5 and rel_err(want[2], uncapped["dk"]) > 0.5
  monkeypatch.setattr(attention_triton, "_dlogits",
                      lambda p, dp, delta, th, spec: p * (dp - delta[:, None]) * spec.scale)
  wrong, _ = pallas_gpu_vs_naive(case)
  assert rel_err(wrong[1], as_f64(want[1])) > 1 and rel_err(wrong[2], as_f64(want[2])) > 1


def _export(fn, platform, *args):
  """StableHLO text of jax.export for one platform (CUDA: an abstract H100, Triton allowed)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    if platform == "cuda":
      checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)]
      with jax.sharding.use_abstract_mesh(pallas_gpu.abstract_cuda_mesh()):
        exp = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
    else:
      exp = jax.export.export(jax.jit(fn), platforms=[platform])(*args)
  assert exp.platforms == (platform,)
  return exp.mlir_module()


@pytest.mark.parametrize("impl,platform,call", [("splash", "tpu", "tpu_custom_call"),
                                                ("pallas_gpu", "cuda", TRITON),
                                                ("auto", "tpu", "tpu_custom_call"),
                                                ("auto", "cuda", TRITON)])
def test_kernel_paths_lower_for_tpu_and_cuda(monkeypatch, impl, platform, call):
  """Forward and gradient of the kernel paths export on this CPU host with Gemma 2's window and
  soft-cap ("auto": the platform switch picks the kernel once the problem is not tiny)."""
  monkeypatch.setattr(attention_mod, "NAIVE_MAX_SCORES", 0)
  args = _kernel_args(_kernel_case(256, 4, 2, b=2, dtype=jnp.bfloat16))
  f = shared_masks(impl, window=64, softcap=50.0)

  def grad(q, k, v, pos, seg):
    loss = lambda q, k, v: jnp.sum(f(q, k, v, pos, seg).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  assert call in _export(f, platform, *args)
  assert _export(grad, platform, *args).count(call) >= 2  # forward + backward kernels


@pytest.mark.parametrize("n,kh,h", [(8, 4, 256), (6, 2, 96)])  # Gemma 2 2B; G = 3, H padded
def test_triton_kernel_lowers_for_cuda_with_gemma_heads(n, kh, h):
  """Forward and the three backward Triton kernels (forward again, dk / dv, dq) export for CUDA
  with Gemma 2's window and soft-cap at real head dims, and for a group of 3 heads."""
  b, t = 2, 512
  x = lambda heads: jax.ShapeDtypeStruct((b, t, heads, h), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
  f = shared_masks("pallas_gpu", window=128, softcap=50.0)

  def grad(q, k, v, pos, seg):
    loss = lambda q, k, v: jnp.sum(f(q, k, v, pos, seg).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  assert _export(f, "cuda", x(n), x(kh), x(kh), ids, ids).count(TRITON) == 1
  assert _export(grad, "cuda", x(n), x(kh), x(kh), ids, ids).count(TRITON) == 3


def test_auto_runs_xla_on_cpu_when_kernels_are_possible(monkeypatch):
  """Not tiny, training-shaped: "auto" is a platform switch whose CPU branch is the xla path."""
  monkeypatch.setattr(attention_mod, "NAIVE_MAX_SCORES", 0)
  case = _kernel_case(128, 4, 2, window=16)
  f = jax.jit(shared_masks("auto", window=16, block_q=64, block_k=64))
  q, k, v, pos, seg = _kernel_args(case)
  out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, pos, seg), q, k, v)
  check_against_reference((out, *vjp(case["g"])), ref_of(case), jnp.float32)


def test_cudnn_lowers_for_cuda_or_says_why():
  """cuDNN's wrapper reads the cuDNN version while tracing; without jax's CUDA plugin (this CPU
  host) that fails, and the op says so in one line."""
  f = shared_masks("cudnn", window=32)
  args = _kernel_args(_kernel_case(128, 4, 2, dtype=jnp.bfloat16))
  plugin = any(importlib.util.find_spec(m) for m in ("jax_cuda13_plugin", "jax_cuda12_plugin"))
  if plugin:
    assert "cudnn" in _export(f, "cuda", *args)
  else:
    with pytest.raises(RuntimeError, match="impl='cudnn'.*cuDNN is not detected"):
      _export(f, "cuda", *args)


def _call(**kw):
  base = dict(b=8, t=4096, s=4096, n=32, h=128, dtype=jnp.bfloat16, self_attention=True,
              window=None, traced_window=False, softcap=None, block_q=512)
  return Call(**{**base, **kw})


def test_auto_routing_table():
  assert route(_call()) == {"default": "xla", "tpu": "splash", "cuda": "pallas_gpu"}
  gemma2 = {"default": "xla", "tpu": "splash", "cuda": "pallas_gpu"}
  assert route(_call(softcap=50.0, window=4096)) == gemma2  # soft-capped sliding layer
  assert route(_call(softcap=50.0)) == gemma2  # soft-capped global layer
  assert route(_call(traced_window=True)) == {"default": "xla"}
  assert route(_call(t=1, self_attention=False)) == {"default": "naive"}  # decode step
  assert route(_call(t=1000, s=8192, self_attention=False)) == {"default": "xla"}  # prefill
  assert route(_call(t=4000, s=4000)) == {"default": "xla", "cuda": "pallas_gpu"}  # 4000 % 128
  assert route(_call(b=1, n=4, t=256, s=256)) == {"default": "naive"}  # tiny
  assert "T divisible by 16" in kernel_blocker("pallas_gpu", _call(t=4008, s=4008))
  assert "block_q >= 16" in kernel_blocker("pallas_gpu", _call(block_q=8))
  assert kernel_blocker("cudnn", _call(dtype=jnp.float32)) is not None
  assert kernel_blocker("cudnn", _call(window=128)) is None


def test_explicit_kernel_that_cannot_take_the_call_raises():
  case = decode_case()
  masks = dict(zip(MASK_KEYS, (case[x] for x in MASK_KEYS)))
  with pytest.raises(ValueError, match="impl='splash'.*T == S"):
    attention(case["q"], case["k"], case["v"], **masks, impl="splash")
  with pytest.raises(ValueError, match="N % K"):
    attention(case["q"][:, :, :3], case["k"], case["v"], **masks)
  with pytest.raises(ValueError, match="impl="):
    attention(case["q"], case["k"], case["v"], **masks, impl="flash")


@pytest.mark.parametrize("impl", ["splash", "pallas_gpu"])
def test_kernel_runs_per_shard_under_a_mesh(impl):
  """The TPU splash / our Triton kernel in Pallas interpret mode on CPU (window, soft-cap, GQA,
  packed and padded rows) under sharding.use_mesh: it runs inside shard_map (batch over data x
  fsdp, heads over tensor), matches the reference, and the compiled program has no all-gather of
  the sharded inputs (without the shard_map the partitioner gathers them around the kernel)."""
  from jax.sharding import NamedSharding  # noqa: PLC0415

  from jaxalign import sharding  # noqa: PLC0415
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  case = _kernel_case(128, 4, 2, b=4, window=40, softcap=5.0)
  x_sharding = NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor"))
  b_sharding = NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  q, k, v, pos, seg = (jax.device_put(x, x_sharding if x.ndim == 4 else b_sharding)
                       for x in _kernel_args(case))
  with sharding.use_mesh(mesh):
    f = jax.jit(shared_masks(impl, window=40, softcap=5.0))
    out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, pos, seg), q, k, v)
    got = (out, *vjp(case["g"]))
    hlo = f.lower(q, k, v, pos, seg).compile().as_text()
  check_against_reference(got, ref_of(case), jnp.float32)
  assert "all-gather" not in hlo
