"""Pallas kernels (interpret mode) against their jnp references, the chunked XLA loops with
small chunks, and lowering of the kernels for CUDA (Triton) and TPU (Mosaic) via jax.export;
with and without a logit soft-cap."""

import base64
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.ops import pallas_gpu, pallas_tpu, token_logprobs, xla_chunked

N, D, V = 47, 33, 1003
# Small blocks so that every grid has several steps and a ragged tail in N, D and V.
BLOCKS = {"tpu": (pallas_tpu, dict(block_n=16, block_v=128)),
          "gpu": (pallas_gpu, dict(block_n=16, block_v=64, block_k=16))}
DTYPES = [jnp.float32, jnp.bfloat16]
pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
TRITON = pallas_gpu.CUSTOM_CALL_TARGET  # "__gpu$xla.gpu.triton"
CAP = 5.0  # a logit soft-cap that bends logits of order 1-5


def _rows(ref, stats, seed):
  lse, ent = stats[:2]
  _, _, _, g_lp, g_ent = ref.make_inputs(seed, N, 1, 1, jnp.float32)
  return xla_chunked.Rows(lse, lse - ent, g_lp, g_ent)


@pytest.mark.parametrize("flavor", ["tpu", "gpu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("with_entropy,softcap", [(True, None), (False, None), (True, CAP)],
                         ids=["ent", "no-ent", "ent-cap5"])
def test_forward_kernel_matches_reference(ref, flavor, dtype, with_entropy, softcap):
  """(lse, ent, tz, lsq); the entropy and log sum exp(2z) only when asked for (zeros, -inf otherwise)."""
  module, blocks = BLOCKS[flavor]
  hidden, weight, targets, _, _ = ref.make_inputs(1, N, D, V, dtype)
  kw = dict(temperature=0.8, with_entropy=with_entropy, with_sum_sq=with_entropy,
            softcap=softcap, **blocks)
  got = module.forward(hidden, weight, targets, interpret=True, **kw)
  want = module.forward_reference(hidden, weight, targets, **kw)
  for g, w in zip(got, want):
    assert g.shape == (N,) and g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, rtol=2e-6, atol=2e-5)
  if not with_entropy:
    assert not np.any(np.asarray(got[1])) and np.all(np.asarray(got[3]) == -np.inf)
  if softcap is not None:  # capped logits: lse differs from the uncapped one
    plain = module.forward_reference(hidden, weight, targets, **dict(kw, softcap=None))
    assert np.max(np.abs(np.asarray(got[0]) - np.asarray(plain[0]))) > 0.1


@pytest.mark.parametrize("flavor", ["tpu", "gpu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("with_lp,with_ent,softcap",
                         [(True, True, None), (True, False, None), (False, True, None),
                          (True, True, CAP)], ids=["lp-ent", "lp", "ent", "lp-ent-cap5"])
def test_grad_logits_kernel_matches_reference(ref, flavor, dtype, with_lp, with_ent, softcap):
  module, blocks = BLOCKS[flavor]
  hidden, weight, targets, _, _ = ref.make_inputs(2, N, D, V, dtype)
  stats = module.forward_reference(hidden, weight, targets, temperature=1.2, softcap=softcap)
  kw = dict(temperature=1.2, with_lp=with_lp, with_ent=with_ent, out_dtype=jnp.float32,
            softcap=softcap, **blocks)
  rows = _rows(ref, stats, 3)
  got = module.grad_logits(hidden, weight, targets, rows, interpret=True, **kw)
  want = module.grad_logits_reference(hidden, weight, targets, rows, **kw)
  assert got.shape == (N, V) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  if softcap is not None:  # the tanh's slope scales the tile: not the uncapped gradient
    plain = module.grad_logits_reference(hidden, weight, targets, rows, **dict(kw, softcap=None))
    assert np.max(np.abs(np.asarray(got) - np.asarray(plain))) > 1e-2


@pytest.mark.parametrize("flavor", ["xla", "tpu", "gpu"])
@pytest.mark.parametrize("softcap", [None, CAP], ids=["nocap", "cap5"])
def test_chunked_pipeline_with_small_chunks_matches_float64(ref, flavor, softcap):
  """Forward stats + xla_chunked.backward with many token and vocab chunks and tails."""
  hidden, weight, targets, g_lp, g_ent = ref.make_inputs(4, N, D, V, jnp.float32)
  temperature = 0.9
  if flavor == "xla":
    fwd = functools.partial(xla_chunked.forward, token_chunk=16, vocab_chunk=128)
    grad_fn = xla_chunked.grad_logits_reference
  else:
    module, blocks = BLOCKS[flavor]
    fwd = functools.partial(module.forward, interpret=True, **blocks)
    grad_fn = functools.partial(module.grad_logits, interpret=True, **blocks)
  lse, ent, tz, lsq = fwd(hidden, weight, targets, temperature=temperature, with_sum_sq=True,
                          softcap=softcap)
  want = ref.reference(hidden, weight, targets, temperature, g_lp, g_ent, softcap)
  logp = jnp.where(targets >= 0, tz - lse, 0.0)
  np.testing.assert_allclose(logp, want["logp"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, want["ent"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lsq - 2 * lse, want["log_sum_sq"], rtol=1e-5, atol=1e-5)
  rows = xla_chunked.Rows(lse, lse - ent, jnp.where(targets >= 0, g_lp, 0.0) / temperature,
                          g_ent / temperature)
  grad_fn = functools.partial(grad_fn, temperature=temperature, softcap=softcap)
  dh, dw = xla_chunked.backward(grad_fn, hidden, weight, targets, rows, token_chunk=16,
                                vocab_chunk=256)
  assert ref.rel_err(dh, want["dh"]) < 2e-5
  assert ref.rel_err(dw, want["dw"]) < 2e-5


def _export(fn, platform, *args):
  """StableHLO text of jax.export for one platform (CUDA: an abstract H100, Triton allowed)."""
  if platform == "cuda":
    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)]
    with jax.sharding.use_abstract_mesh(pallas_gpu.abstract_cuda_mesh()):
      exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
  else:
    exported = jax.export.export(jax.jit(fn), platforms=[platform])(*args)
  assert exported.platforms == (platform,)
  return exported.mlir_module()


KERNEL_CALL = {"cuda": TRITON, "tpu": "tpu_custom_call"}


def _kernel_bodies(text, platform):
  """The exported kernels' bodies as bytes: Triton IR (CUDA, escaped inline as `ir`) or Mosaic
  bytecode (TPU, base64 in the backend config's `body`)."""
  if platform == "cuda":
    return [b.encode() for b in re.findall(r'ir = "([^"]*)"', text)]
  body = r"\\22body\\22: \\22([A-Za-z0-9+/=]+)\\22"
  return [base64.b64decode(b) for b in re.findall(body, text)]


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("impl,softcap", [("pallas", None), ("auto", None), ("pallas", 30.0)],
                         ids=["pallas", "auto", "pallas-cap30"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_op_forward_and_gradient_lower_for_gpu_and_tpu(ref, platform, impl, softcap, dtype):
  """The public op, forward and gradient, exported on this CPU host for CUDA and TPU: the
  platform switch picks the kernels, and lowering them must succeed (log sum p^2 included,
  and the soft-cap's tanh in both kernels)."""
  hidden, weight, targets, g_lp, g_ent = ref.make_inputs(5, N, D, V, dtype)

  def fwd(h, w):
    return token_logprobs(h, w, targets, temperature=0.7, logit_softcap=softcap,
                          return_entropy=True, return_log_sum_sq=True, impl=impl)

  def grad(h, w):
    def loss(h, w):
      logp, ent, _ = fwd(h, w)
      return jnp.sum(g_lp * logp) + jnp.sum(g_ent * ent)
    return jax.grad(loss, argnums=(0, 1))(h, w)

  for fn, n_calls in ((fwd, 1), (grad, 2)):  # the gradient: forward + grad-logits kernels
    text = _export(fn, platform, hidden, weight)
    assert text.count(KERNEL_CALL[platform]) >= n_calls
    bodies = _kernel_bodies(text, platform)  # every kernel has the cap's tanh, or none does
    assert len(bodies) >= n_calls
    assert all((b"tanh" in body) == (softcap is not None) for body in bodies)


@pytest.mark.parametrize("flavor,platform", [("gpu", "cuda"), ("tpu", "tpu")])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_kernels_with_ragged_blocks_lower(ref, flavor, platform, dtype):
  """Kernels with small blocks and ragged tails in N, D and V lower for their target."""
  module, blocks = BLOCKS[flavor]
  hidden, weight, targets, _, _ = ref.make_inputs(6, N, D, V, dtype)
  stats = module.forward_reference(hidden, weight, targets, temperature=1.0)
  rows = _rows(ref, stats, 7)
  fwd = functools.partial(module.forward, temperature=1.0, **blocks)
  grad = functools.partial(module.grad_logits, temperature=1.0, **blocks)
  assert KERNEL_CALL[platform] in _export(fwd, platform, hidden, weight, targets)
  assert KERNEL_CALL[platform] in _export(grad, platform, hidden, weight, targets, rows)


def test_tpu_block_rules_are_enforced():
  hidden = jnp.zeros((64, 8), jnp.float32)
  with pytest.raises(ValueError, match="multiple of 128"):
    pallas_tpu.forward(hidden, jnp.zeros((8, 512)), jnp.zeros((64,), jnp.int32),
                       temperature=1.0, block_v=100, interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    pallas_gpu.forward(hidden, jnp.zeros((8, 512)), jnp.zeros((64,), jnp.int32),
                       temperature=1.0, block_n=24, interpret=True)


@pytest.mark.parametrize("impl,has_kernel", [("auto", False), ("xla", False), ("pallas", True)])
def test_auto_picks_xla_on_cpu(ref, impl, has_kernel):
  """On a CPU lowering, "auto" uses the XLA path; "pallas" runs the (interpreted) kernels."""
  hidden, weight, targets, _, _ = ref.make_inputs(8, 16, 8, 256, jnp.float32)
  fn = jax.jit(lambda h, w: token_logprobs(h, w, targets, impl=impl))
  text = fn.lower(hidden, weight).as_text(debug_info=True)
  assert ("token_logprobs_fwd" in text) == has_kernel
