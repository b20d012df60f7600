"""token_logprobs(..., logit_floor=f): top-k / top-p replay, every impl against float64 NumPy.

Row n normalises over K_n = {v : z_v >= f_n} ∪ {target_n} (z tempered logits, after the
logit soft-cap when there is one). The floors are put in the middle of wide gaps between a
row's sorted logits, so float32 rounding cannot move a column across them (except where a
target is deliberately below its floor).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxalign.ops import (pallas_gpu, pallas_tpu, token_logprobs, vocab_parallel_token_logprobs,
                          xla_chunked)

N, D, V = 20, 24, 1002  # no multiple of a block: row, width and vocab tails everywhere
TEMPERATURE = 0.8
TOL_OUT, TOL_GRAD = 1e-5, 2e-5  # max error / max |reference|, as for float32 elsewhere
CAP = 5.0  # a logit soft-cap that bends logits of order 1-5 (Gemma 2 uses 30)
pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")


def capped_logits(h, w, temperature, softcap):
  """(z, dz/dx * T): float64 tempered logits of the raw x = h @ w, soft-capped when softcap is
  given (z = softcap * tanh(x / softcap) / T), and the tanh's slope (1 without a cap)."""
  x = h @ w
  if softcap is None:
    return x / temperature, 1.0
  th = np.tanh(x / softcap)
  return softcap * th / temperature, 1.0 - th * th


def restricted_reference(hidden, weight, targets, floor, temperature, g_lp, g_ent,
                         softcap=None):
  """Float64 log-probs, entropies and gradients of sum(g_lp logp) + sum(g_ent ent) under the
  softmax restricted to K_n; a row with an empty K_n has log-prob 0, entropy 0, no gradient.
  With softcap, z is the capped tempered logits and the gradients go through the tanh.

  Returns: dict of logp [N], ent [N], log_sum_sq [N] (log sum p^2 over K_n, 0 for an empty K_n), dh [N, D],
  dw [D, V] and keep [N, V] (bool).
  """
  h, w = np.asarray(hidden, np.float64), np.asarray(weight, np.float64)
  t, f = np.asarray(targets), np.asarray(floor, np.float64)
  n = h.shape[0]
  z, slope = capped_logits(h, w, temperature, softcap)  # [N, V]
  valid = t >= 0
  onehot = np.zeros_like(z)
  onehot[np.arange(n)[valid], t[valid]] = 1.0
  keep = (z >= f[:, None]) | (onehot > 0)
  nonempty = keep.any(axis=1)
  zk = np.where(keep, z, -np.inf)
  zmax = np.where(nonempty, zk.max(axis=1), 0.0)[:, None]
  lse = zmax + np.log(np.maximum(np.exp(zk - zmax).sum(axis=1, keepdims=True), 1e-300))
  p = np.where(keep, np.exp(zk - lse), 0.0)  # [N, V]
  logp_all = np.where(keep, z - lse, 0.0)
  logp = np.where(valid, logp_all[np.arange(n), np.maximum(t, 0)], 0.0)
  ent = -(p * logp_all).sum(axis=1)
  # On K_n: d logp / dz = onehot - p;  d ent / dz_k = -p_k (log p_k + ent). Zero off K_n.
  dz = (np.asarray(g_lp, np.float64) * valid)[:, None] * (onehot - p)
  dz -= np.asarray(g_ent, np.float64)[:, None] * p * (logp_all + ent[:, None])
  dz *= nonempty[:, None]
  dx = dz * slope / temperature
  log_sum_sq = np.where(nonempty, np.log(np.maximum((p * p).sum(axis=1), 1e-300)), 0.0)
  return {"logp": logp, "ent": ent, "log_sum_sq": log_sum_sq, "dh": dx @ w.T, "dw": h.T @ dx, "keep": keep}


def rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def _floor_keeping(row, k, min_gap=1e-2):
  """A floor between the k-th and (k+1)-th largest logit of `row` (k grows until the gap
  between them is at least min_gap); returns (floor, k)."""
  s = np.sort(row)[::-1]
  k = min(k, len(s) - 1)
  while s[k - 1] - s[k] < min_gap and k < len(s) - 1:
    k += 1
  return float(s[k - 1] + s[k]) / 2, k


def make_case(seed, n=N, d=D, v=V, temperature=TEMPERATURE, softcap=None):
  """hidden, weight, targets, floor, g_lp, g_ent (float32 / int32) covering every row kind;
  the floors are placed among the (soft-capped, with softcap) tempered logits."""
  rng = np.random.default_rng(seed)
  hidden = rng.standard_normal((n, d)).astype(np.float32)
  weight = (rng.standard_normal((d, v)) * (2.0 / np.sqrt(d))).astype(np.float32)
  z, _ = capped_logits(hidden.astype(np.float64), weight.astype(np.float64), temperature,
                       softcap)
  order = np.argsort(-z, axis=1)  # [N, V], most likely first
  targets = rng.integers(0, v, n)
  floor = np.full(n, -np.inf)
  for i in range(n):
    kind = i % 10
    if kind == 0:  # no truncation, valid target
      continue
    if kind == 1:  # no truncation, ignored target
      targets[i] = -1
      continue
    if kind == 2:  # keeps exactly one token, the target: log-prob 0
      floor[i], _ = _floor_keeping(z[i], 1)
      targets[i] = order[i, 0]
    elif kind == 3:  # keeps one token; the target lies far below the floor (still counted)
      floor[i], _ = _floor_keeping(z[i], 1)
      targets[i] = order[i, v // 2]
    elif kind == 4:  # top-5 with the target inside
      floor[i], k = _floor_keeping(z[i], 5)
      targets[i] = order[i, k - 1]
    elif kind == 5:  # top-40, target below the floor
      floor[i], k = _floor_keeping(z[i], 40)
      targets[i] = order[i, min(k + 3, v - 1)]
    elif kind == 6:  # top-60, ignored target
      floor[i], _ = _floor_keeping(z[i], 60)
      targets[i] = -100
    elif kind == 7:  # a floor above every logit and an ignored target: nothing is kept
      floor[i] = z[i].max() + 1.0
      targets[i] = -1
    elif kind == 8:
      # The target was the sampler's last kept token, and its recomputed logit lands a few
      # float32 ulps below the floor: still counted, the 29 tokens above it too.
      k, s = min(30, v - 1), np.sort(z[i])[::-1]
      while min(s[k - 2] - s[k - 1], s[k - 1] - s[k]) < 1e-2 and k < v - 1:
        k += 1
      targets[i] = order[i, k - 1]
      floor[i] = np.float32(z[i, targets[i]]) * (1 + np.sign(z[i, targets[i]]) * 4e-7)
    else:  # a wide truncation (top-p like), target anywhere
      floor[i], _ = _floor_keeping(z[i], int(rng.integers(v // 10, v * 6 // 10)))
  g_lp = rng.standard_normal(n).astype(np.float32)
  g_ent = rng.standard_normal(n).astype(np.float32)
  return (jnp.asarray(hidden), jnp.asarray(weight), jnp.asarray(targets, jnp.int32),
          jnp.asarray(floor, jnp.float32), jnp.asarray(g_lp), jnp.asarray(g_ent))


def _value_and_grads(fn, hidden, weight, g_lp, g_ent):
  """((logp, ent, log_sum_sq), (dh, dw)) of sum(g_lp * logp) + sum(g_ent * ent) (+ sum(log_sum_sq), which has
  no gradient), jitted."""

  def loss(h, w):
    logp, ent, log_sum_sq = fn(h, w)
    return jnp.sum(g_lp * logp) + jnp.sum(g_ent * ent) + jnp.sum(log_sum_sq), (logp, ent, log_sum_sq)

  grads, outs = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(hidden, weight)
  return outs, grads


def _check(outs, grads, want, targets):
  logp, ent, log_sum_sq = outs
  dh, dw = grads
  assert logp.dtype == jnp.float32 and logp.shape == (N,)
  assert np.all(np.isfinite(logp)) and np.all(np.isfinite(ent)) and np.all(np.isfinite(log_sum_sq))
  assert rel_err(logp, want["logp"]) < TOL_OUT
  assert rel_err(ent, want["ent"]) < TOL_OUT
  assert rel_err(log_sum_sq, want["log_sum_sq"]) < TOL_OUT
  assert rel_err(dh, want["dh"]) < TOL_GRAD
  assert rel_err(dw, want["dw"]) < TOL_GRAD
  t = np.asarray(targets)
  assert np.all(np.asarray(logp)[t < 0] == 0.0)
  np.testing.assert_allclose(np.asarray(logp)[2::10], 0.0, atol=1e-6)  # one kept token


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) == 8, "tests/conftest.py must give 8 fake CPU devices"
  return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


@pytest.mark.parametrize("softcap", [None, 1.5])
def test_reference_is_right(ref, softcap):
  """The float64 reference: its gradients match central differences (through the soft-cap's
  tanh too), its truncated rows are a restricted softmax, and it equals the full softmax with
  no floor (the conftest reference, which has its own soft-cap)."""
  hidden, weight, targets, floor, g_lp, g_ent = make_case(1, n=10, d=3, v=9, temperature=0.7,
                                                          softcap=softcap)
  h, w = np.asarray(hidden, np.float64), np.asarray(weight, np.float64)
  want = restricted_reference(h, w, targets, floor, 0.7, g_lp, g_ent, softcap)

  def loss(h_, w_):
    r = restricted_reference(h_, w_, targets, floor, 0.7, g_lp, g_ent, softcap)
    return np.sum(np.float64(g_lp) * r["logp"]) + np.sum(np.float64(g_ent) * r["ent"])

  numeric = ref.central_differences(loss, h, w, eps=1e-7)
  for name in ("dh", "dw"):
    np.testing.assert_allclose(want[name], numeric[name], rtol=1e-5, atol=1e-7)
  z = h @ w / 0.7 if softcap is None else softcap * np.tanh(h @ w / softcap) / 0.7
  full = restricted_reference(h, w, targets, np.full(10, -np.inf), 0.7, g_lp, g_ent, softcap)
  independent = ref.reference(h, w, targets, 0.7, g_lp, g_ent, softcap)
  for name in ("logp", "ent", "log_sum_sq", "dh", "dw"):
    np.testing.assert_allclose(full[name], independent[name], rtol=1e-12, atol=1e-12)
  logz = np.log(np.exp(z).sum(axis=1))
  t = np.asarray(targets)
  picked = z[np.arange(10), np.maximum(t, 0)]
  np.testing.assert_allclose(full["logp"], np.where(t >= 0, picked - logz, 0.0))
  assert want["keep"][2].sum() == 1 and want["keep"][3].sum() == 2 and not want["keep"][7].any()
  assert want["logp"][2] == 0.0 and want["ent"][2] == 0.0 and want["ent"][7] == 0.0


@pytest.mark.parametrize("impl,softcap",
                         [("naive", None), ("xla", None), ("pallas_tpu", None),
                          ("pallas_gpu", None), ("naive", CAP), ("xla", CAP),
                          ("pallas_tpu", CAP), ("pallas_gpu", CAP)])
def test_op_matches_float64_reference(impl, softcap):
  hidden, weight, targets, floor, g_lp, g_ent = make_case(2, v=V + 1,
                                                          softcap=softcap)  # V = 1003 here
  fn = functools.partial(token_logprobs, targets=targets, temperature=TEMPERATURE,
                         logit_floor=floor, logit_softcap=softcap, return_entropy=True,
                         return_log_sum_sq=True, impl=impl)
  outs, grads = _value_and_grads(lambda h, w: fn(h, w), hidden, weight, g_lp, g_ent)
  want = restricted_reference(hidden, weight, targets, floor, TEMPERATURE, g_lp, g_ent, softcap)
  _check(outs, grads, want, targets)


@pytest.mark.parametrize("impl,softcap", [("xla", None), ("pallas", None), ("xla", CAP)])
def test_vocab_parallel_matches_float64_reference(mesh, impl, softcap):
  """Vocab sharded over 2 devices (501 columns each), tokens over 4: each shard masks its own
  columns; rows whose kept set lies in one shard leave the other with an empty range."""
  hidden, weight, targets, floor, g_lp, g_ent = make_case(3, softcap=softcap)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  tok = P(("data", "fsdp"))
  hidden, weight = put(hidden, P(("data", "fsdp"), None)), put(weight, P(None, "tensor"))
  targets, floor, g_lp, g_ent = (put(x, tok) for x in (targets, floor, g_lp, g_ent))
  fn = functools.partial(vocab_parallel_token_logprobs, targets=targets, mesh=mesh,
                         temperature=TEMPERATURE, logit_floor=floor, logit_softcap=softcap,
                         return_entropy=True, return_log_sum_sq=True, impl=impl)
  outs, grads = _value_and_grads(lambda h, w: fn(h, w), hidden, weight, g_lp, g_ent)
  want = restricted_reference(hidden, weight, targets, floor, TEMPERATURE, g_lp, g_ent, softcap)
  _check(outs, grads, want, targets)
  assert outs[0].sharding.is_equivalent_to(targets.sharding, 1)


# Small chunks and blocks: several token and vocab steps, each with a ragged tail.
# (forward, tile gradient, keywords of the forward, keywords of the tile gradient)
TPU_BLOCKS = dict(block_n=8, block_v=128, interpret=True)
GPU_BLOCKS = dict(block_n=16, block_v=64, block_k=16, interpret=True)
SMALL = {"xla": (xla_chunked.forward, xla_chunked.grad_logits_reference,
                 dict(token_chunk=8, vocab_chunk=128), {}),
         "tpu": (pallas_tpu.forward, pallas_tpu.grad_logits, TPU_BLOCKS, TPU_BLOCKS),
         "gpu": (pallas_gpu.forward, pallas_gpu.grad_logits, GPU_BLOCKS, GPU_BLOCKS)}


@pytest.mark.parametrize("flavor,softcap", [("xla", None), ("tpu", None), ("tpu", CAP)])
def test_small_tiles_pipeline_matches_float64_reference(flavor, softcap):
  """Forward statistics and `xla_chunked.backward` with a floor, tiles far smaller than the
  op's defaults (padded rows get a -inf floor and coefficient 0)."""
  fwd, grad_fn, fwd_kw, grad_kw = SMALL[flavor]
  hidden, weight, targets, floor, g_lp, g_ent = make_case(4, softcap=softcap)
  fwd = functools.partial(fwd, temperature=TEMPERATURE, floor=floor, softcap=softcap, **fwd_kw)
  lse, ent, tz, lsq = jax.jit(functools.partial(fwd, with_sum_sq=True))(hidden, weight, targets)
  want = restricted_reference(hidden, weight, targets, floor, TEMPERATURE, g_lp, g_ent, softcap)
  nonempty = want["keep"].any(axis=1)
  ent = jnp.where(nonempty, ent, 0.0)  # the op zeroes empty rows (`token_logprobs.finish_stats`)
  logp = jnp.where(targets >= 0, tz - lse, 0.0)
  assert rel_err(logp, want["logp"]) < TOL_OUT
  assert rel_err(ent, want["ent"]) < TOL_OUT
  assert rel_err(jnp.where(nonempty, lsq - 2 * lse, 0.0), want["log_sum_sq"]) < TOL_OUT
  rows = xla_chunked.Rows(lse, lse - ent,
                          jnp.where(targets >= 0, g_lp, 0.0) / TEMPERATURE, g_ent / TEMPERATURE)
  grad_fn = functools.partial(grad_fn, temperature=TEMPERATURE, softcap=softcap, **grad_kw)
  backward = functools.partial(xla_chunked.backward, grad_fn, floor=floor, token_chunk=8,
                               vocab_chunk=256)
  dh, dw = jax.jit(backward)(hidden, weight, targets, rows)
  assert rel_err(dh, want["dh"]) < TOL_GRAD
  assert rel_err(dw, want["dw"]) < TOL_GRAD


def test_floor_changes_the_result_and_gets_no_gradient():
  """Truncated rows with a kept set smaller than the vocab have strictly larger log-probs
  than without the floor (their normaliser lost terms); the floor's own gradient is 0."""
  hidden, weight, targets, floor, _, _ = make_case(5)
  full = token_logprobs(hidden, weight, targets, temperature=TEMPERATURE, impl="xla")
  cut = token_logprobs(hidden, weight, targets, temperature=TEMPERATURE, logit_floor=floor,
                       impl="xla")
  truncated = np.isfinite(np.asarray(floor)) & (np.asarray(targets) >= 0)
  assert truncated.sum() >= 8
  assert np.all(np.asarray(cut)[truncated] > np.asarray(full)[truncated] + 1e-3)
  untouched = np.isneginf(np.asarray(floor))
  np.testing.assert_allclose(np.asarray(cut)[untouched], np.asarray(full)[untouched],
                             rtol=1e-6, atol=1e-6)

  def loss(f):
    logp, ent = token_logprobs(hidden, weight, targets, temperature=TEMPERATURE,
                               logit_floor=f, return_entropy=True, impl="xla")
    return jnp.sum(logp) + jnp.sum(ent)

  assert not np.any(np.asarray(jax.grad(loss)(floor)))


def test_no_floor_is_todays_op():
  """logit_floor=None compiles to the op without a floor (no masking constant anywhere), and
  a floor of -inf everywhere gives the same numbers (up to float32 rounding: the two programs
  fuse differently)."""
  hidden, weight, targets, _, g_lp, g_ent = make_case(6)

  def op(**floor_kw):
    return lambda h, w: token_logprobs(h, w, targets, temperature=TEMPERATURE,
                                       return_entropy=True, return_log_sum_sq=True, impl="xla",
                                       **floor_kw)

  got_none = _value_and_grads(op(logit_floor=None), hidden, weight, g_lp, g_ent)
  got_inf = _value_and_grads(op(logit_floor=jnp.full((N,), -jnp.inf)), hidden, weight, g_lp,
                             g_ent)
  for a, b in zip(jax.tree.leaves(got_none), jax.tree.leaves(got_inf)):
    assert rel_err(b, a) < 2e-6
  lowered = functools.partial(_lowered, hidden=hidden, weight=weight)
  for wrap in (lambda f: f, _grad_of):
    text = lowered(wrap(op(logit_floor=None)))
    assert text == lowered(wrap(op()))
    assert "1.000000e+30" not in text  # NEG, the masked logit, only comes with a floor
  assert "1.000000e+30" in lowered(_grad_of(op(logit_floor=-jnp.ones(N))))


def _grad_of(f):
  """The gradient (w.r.t. hidden and weight) of the summed log-probs and entropies of an op f(h, w)."""
  return jax.grad(lambda h, w: jnp.sum(f(h, w)[0]) + jnp.sum(f(h, w)[1]), argnums=(0, 1))


def _lowered(f, hidden, weight):
  """StableHLO text of f(hidden, weight), jitted."""
  return jax.jit(f).lower(hidden, weight).as_text()


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_no_softcap_is_todays_op(impl):
  """logit_softcap=None compiles to the op without a cap (no tanh anywhere, forward and
  gradient, the XLA path and the interpreted kernels alike); a cap adds the tanh to both, and
  a cap far above every logit gives the uncapped numbers (up to float32 rounding)."""
  hidden, weight, targets, floor, g_lp, g_ent = make_case(6)

  def op(**cap_kw):
    return lambda h, w: token_logprobs(h, w, targets, temperature=TEMPERATURE, logit_floor=floor,
                                       return_entropy=True, return_log_sum_sq=True, impl=impl,
                                       **cap_kw)

  lowered = functools.partial(_lowered, hidden=hidden, weight=weight)
  for wrap in (lambda f: f, _grad_of):
    text = lowered(wrap(op(logit_softcap=None)))
    assert text == lowered(wrap(op()))
    assert "tanh" not in text
    assert "tanh" in lowered(wrap(op(logit_softcap=30.0)))
  if impl == "xla":
    got_none = _value_and_grads(op(), hidden, weight, g_lp, g_ent)
    got_huge = _value_and_grads(op(logit_softcap=1e4), hidden, weight, g_lp, g_ent)
    got_cap = _value_and_grads(op(logit_softcap=CAP), hidden, weight, g_lp, g_ent)
    for a, b, c in zip(jax.tree.leaves(got_none), jax.tree.leaves(got_huge),
                       jax.tree.leaves(got_cap)):
      assert rel_err(b, a) < 1e-5
      assert rel_err(c, a) > 1e-2


@pytest.mark.parametrize("floor,error", [
    (np.zeros((N, 1), np.float32), r"logit_floor must be a float array \[N=20\]"),
    (np.zeros(N + 1, np.float32), r"got float32\[21\]"),
    (np.zeros(N, np.int32), r"got int32\[20\]"),
    ([0.0] * N, r"got list"),
])
def test_bad_floor_fails_with_one_line_error(floor, error):
  hidden, weight = jnp.zeros((N, 4)), jnp.zeros((4, 16))
  targets = jnp.zeros((N,), jnp.int32)
  with pytest.raises(ValueError, match=error) as info:
    token_logprobs(hidden, weight, targets, logit_floor=floor)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_floor_kernels_lower_for_gpu_and_tpu(platform):
  """The op's gradient with a floor, exported on this CPU host for CUDA (Triton) and TPU
  (Mosaic): both kernels take the floor input and lower."""
  hidden, weight, targets, floor, g_lp, g_ent = make_case(8)

  def grad(h, w):
    def loss(h, w):
      logp, ent = token_logprobs(h, w, targets, temperature=TEMPERATURE, logit_floor=floor,
                                 return_entropy=True, impl="pallas")
      return jnp.sum(g_lp * logp) + jnp.sum(g_ent * ent)
    return jax.grad(loss, argnums=(0, 1))(h, w)

  if platform == "cuda":
    call = pallas_gpu.CUSTOM_CALL_TARGET
    checks = [jax.export.DisabledSafetyCheck.custom_call(call)]
    with jax.sharding.use_abstract_mesh(pallas_gpu.abstract_cuda_mesh()):
      exported = jax.export.export(jax.jit(grad), platforms=["cuda"],
                                   disabled_checks=checks)(hidden, weight)
  else:
    call = "tpu_custom_call"
    exported = jax.export.export(jax.jit(grad), platforms=["tpu"])(hidden, weight)
  text = exported.mlir_module()
  assert text.count(call) >= 2  # forward and grad-logits kernels
