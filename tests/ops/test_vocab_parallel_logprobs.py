"""vocab_parallel_token_logprobs on 8 fake CPU devices: mesh (data 2, fsdp 2, tensor 2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxalign.ops import token_logprobs, vocab_parallel_token_logprobs

N, D, V = 48, 33, 1002  # 12 tokens and 501 vocab columns per shard
TOL = {jnp.float32: (1e-5, 2e-5), jnp.bfloat16: (1e-4, 1e-2)}
CAP = 5.0  # a logit soft-cap that bends logits of order 1-5 (Gemma 2 uses 30)


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) == 8, "tests/conftest.py must give 8 fake CPU devices"
  return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _sharded_inputs(ref, mesh, seed, dtype):
  hidden, weight, targets, g_lp, g_ent = ref.make_inputs(seed, N, D, V, dtype)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  tok = P(("data", "fsdp"))
  return (put(hidden, P(("data", "fsdp"), None)), put(weight, P(None, "tensor")),
          put(targets, tok), put(g_lp, tok), put(g_ent, tok))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("softcap", [None, CAP], ids=["nocap", "cap5"])
def test_vocab_parallel_matches_unsharded_reference(ref, mesh, impl, dtype, softcap):
  hidden, weight, targets, g_lp, g_ent = _sharded_inputs(ref, mesh, 11, dtype)
  temperature = 0.8

  def loss(h, w):  # log sum p^2 has no gradient: adding it changes nothing below
    logp, ent, log_sum_sq = vocab_parallel_token_logprobs(
        h, w, targets, mesh, temperature=temperature, logit_softcap=softcap, return_entropy=True,
        return_log_sum_sq=True, impl=impl)
    return jnp.sum(g_lp * logp) + jnp.sum(g_ent * ent) + jnp.sum(log_sum_sq), (logp, ent, log_sum_sq)

  (dh, dw), (logp, ent, log_sum_sq) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(hidden, weight)
  want = ref.reference(hidden, weight, targets, temperature, g_lp, g_ent, softcap)
  tol_out, tol_grad = TOL[dtype]
  assert ref.rel_err(logp, want["logp"]) < tol_out
  assert ref.rel_err(ent, want["ent"]) < tol_out
  assert ref.rel_err(log_sum_sq, want["log_sum_sq"]) < tol_out
  assert dh.dtype == dtype and dw.dtype == dtype
  assert ref.rel_err(dh, want["dh"]) < tol_grad
  assert ref.rel_err(dw, want["dw"]) < tol_grad
  assert dw.sharding.is_equivalent_to(weight.sharding, 2)
  assert logp.sharding.is_equivalent_to(targets.sharding, 1)
  if softcap is not None:  # the cap matters here: far from the uncapped numbers
    plain = ref.reference(hidden, weight, targets, temperature, g_lp, g_ent)
    assert ref.rel_err(logp, plain["logp"]) > 0.05 and ref.rel_err(dw, plain["dw"]) > 0.05


def test_vocab_parallel_equals_single_device_op(ref, mesh):
  """Log-probs only (no entropy), default temperature: same numbers as the unsharded op."""
  hidden, weight, targets, g_lp, _ = _sharded_inputs(ref, mesh, 12, jnp.float32)

  def loss(fn, h, w):
    return jnp.sum(g_lp * fn(h, w))

  sharded = lambda h, w: vocab_parallel_token_logprobs(h, w, targets, mesh, impl="xla")
  single = lambda h, w: token_logprobs(h, w, targets, impl="xla")
  got = jax.jit(jax.value_and_grad(lambda h, w: loss(sharded, h, w), argnums=(0, 1)))(
      hidden, weight)
  want = jax.value_and_grad(lambda h, w: loss(single, h, w), argnums=(0, 1))(
      np.asarray(hidden), np.asarray(weight))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_vocab_parallel_rejects_uneven_vocab(ref, mesh):
  hidden, weight, targets, _, _ = ref.make_inputs(0, N, D, 1001, jnp.float32)
  with pytest.raises(ValueError, match="V=1001 must divide"):
    vocab_parallel_token_logprobs(hidden, weight, targets, mesh)


def test_vocab_parallel_checks_the_softcap(ref, mesh):
  hidden, weight, targets, _, _ = ref.make_inputs(0, N, D, V, jnp.float32)
  with pytest.raises(ValueError, match="logit_softcap must be a finite number > 0"):
    vocab_parallel_token_logprobs(hidden, weight, targets, mesh, logit_softcap=-1.0)
