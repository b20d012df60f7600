"""token_logprobs: every impl against a float64 NumPy reference (values and both gradients),
with and without a logit soft-cap."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.ops import token_logprobs

ODD = (47, 33, 1003)  # N, D, V: nothing a multiple of a block
MID = (300, 64, 9000)  # two full XLA vocab chunks and a tail; several kernel blocks
# (max error / max |reference|) allowed: logp and entropy, gradients.
TOL = {jnp.float32: (1e-5, 2e-5), jnp.bfloat16: (1e-4, 1e-2)}
CAP = 5.0  # a logit soft-cap that matters for logits of order 1-5 (Gemma 2 uses 30)


def _run(impl, hidden, weight, targets, g_lp, g_ent, temperature, with_entropy, softcap=None):
  """(outputs, (dh, dw)) of sum(g_lp * logp) [+ sum(g_ent * ent)], jitted. With the entropy the
  op also returns log sum p^2, and the loss adds it: it must contribute no gradient."""

  def loss(h, w):
    out = token_logprobs(h, w, targets, temperature=temperature, logit_softcap=softcap,
                         return_entropy=with_entropy, return_log_sum_sq=with_entropy, impl=impl)
    if with_entropy:
      logp, ent, log_sum_sq = out
      return jnp.sum(g_lp * logp) + jnp.sum(g_ent * ent) + jnp.sum(log_sum_sq), out
    return jnp.sum(g_lp * out), (out,)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
  grads, outs = grad(hidden, weight)
  return outs, grads


@pytest.mark.parametrize("impl", ["naive", "xla", "pallas", "pallas_gpu", "auto"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape,temperature,with_entropy,softcap",
                         [(ODD, 0.7, True, None), (ODD, 1.0, False, None),
                          (MID, 1.3, True, None), (ODD, 0.6, True, CAP)],
                         ids=["odd-T0.7-ent", "odd-T1", "mid-T1.3-ent", "odd-T0.6-ent-cap5"])
def test_matches_float64_reference(ref, impl, dtype, shape, temperature, with_entropy, softcap):
  seed = zlib.crc32(f"{impl}{dtype.__name__}{shape}{temperature}".encode())
  hidden, weight, targets, g_lp, g_ent = ref.make_inputs(seed, *shape, dtype)
  if not with_entropy:
    g_ent = jnp.zeros_like(g_ent)
  outs, (dh, dw) = _run(impl, hidden, weight, targets, g_lp, g_ent, temperature,
                        with_entropy, softcap)
  want = ref.reference(hidden, weight, targets, temperature, g_lp, g_ent, softcap)
  tol_out, tol_grad = TOL[dtype]
  assert outs[0].dtype == jnp.float32 and outs[0].shape == (shape[0],)
  assert ref.rel_err(outs[0], want["logp"]) < tol_out
  assert np.all(np.asarray(outs[0])[np.asarray(targets) < 0] == 0.0)
  if with_entropy:
    assert outs[1].dtype == jnp.float32 and outs[2].dtype == jnp.float32
    assert ref.rel_err(outs[1], want["ent"]) < tol_out
    assert ref.rel_err(outs[2], want["log_sum_sq"]) < tol_out
  assert dh.dtype == dtype and dw.dtype == dtype
  assert ref.rel_err(dh, want["dh"]) < tol_grad
  assert ref.rel_err(dw, want["dw"]) < tol_grad
  if softcap is not None:  # the cap matters here: far from the uncapped numbers
    plain = ref.reference(hidden, weight, targets, temperature, g_lp, g_ent)
    for name, got in (("logp", outs[0]), ("ent", outs[1]), ("log_sum_sq", outs[2]), ("dh", dh),
                      ("dw", dw)):
      assert ref.rel_err(got, plain[name]) > 0.05, name


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_entropy_only_and_hidden_only_gradients(ref, impl):
  """Symbolic-zero paths: an unused log-prob cotangent, a weight that is not differentiated."""
  hidden, weight, targets, g_lp, g_ent = ref.make_inputs(3, *ODD, jnp.float32)

  def ent_loss(h):
    _, ent = token_logprobs(h, weight, targets, temperature=0.9, return_entropy=True,
                            impl=impl)
    return jnp.sum(g_ent * ent)

  dh = jax.jit(jax.grad(ent_loss))(hidden)
  want = ref.reference(hidden, weight, targets, 0.9, jnp.zeros_like(g_lp), g_ent)
  assert ref.rel_err(dh, want["dh"]) < 2e-5


@pytest.mark.parametrize("impl", ["naive", "xla", "pallas"])
def test_log_sum_sq_alone_and_without_gradient(ref, impl):
  """return_log_sum_sq without the entropy: (logp, log sum p^2); a loss on it alone has zero gradient (it
  is WPO's detached weight), and asking for it leaves the log-probs the same (up to float32 rounding: the
  programs fuse differently)."""
  hidden, weight, targets, _, _ = ref.make_inputs(9, *ODD, jnp.float32)
  logp, log_sum_sq = token_logprobs(hidden, weight, targets, temperature=0.7, return_log_sum_sq=True,
                                    impl=impl)
  want = ref.reference(hidden, weight, targets, 0.7, jnp.zeros(ODD[0]), jnp.zeros(ODD[0]))
  assert ref.rel_err(log_sum_sq, want["log_sum_sq"]) < 1e-5
  assert np.all(np.asarray(log_sum_sq) <= 1e-6)  # sum p^2 <= 1
  np.testing.assert_allclose(logp, token_logprobs(hidden, weight, targets, temperature=0.7, impl=impl),
                             rtol=1e-6, atol=1e-6)
  dh, dw = jax.grad(lambda h, w: jnp.sum(token_logprobs(h, w, targets, return_log_sum_sq=True,
                                                        impl=impl)[1]), argnums=(0, 1))(hidden, weight)
  assert not np.any(np.asarray(dh)) and not np.any(np.asarray(dw))


@pytest.mark.parametrize("softcap", [None, 1.5])
def test_reference_gradients_match_finite_differences(ref, softcap):
  """The float64 reference's analytic gradients are right (central differences), through the
  soft-cap's tanh too (a cap of 1.5 bends logits of order 1-5 hard)."""
  hidden, weight, targets, g_lp, g_ent = ref.make_inputs(5, 5, 4, 7, jnp.float32)
  h, w = ref.as_f64(hidden), ref.as_f64(weight)
  want = ref.reference(h, w, targets, 0.8, g_lp, g_ent, softcap)

  def loss(h_, w_):
    r = ref.reference(h_, w_, targets, 0.8, g_lp, g_ent, softcap)
    return np.sum(ref.as_f64(g_lp) * r["logp"]) + np.sum(ref.as_f64(g_ent) * r["ent"])

  numeric = ref.central_differences(loss, h, w, eps=1e-6)
  for name in ("dh", "dw"):
    np.testing.assert_allclose(want[name], numeric[name], rtol=1e-6, atol=1e-8)
  if softcap is not None:  # the capped logits and log-probs are those of cap * tanh(x / cap)
    z = softcap * np.tanh(h @ w / softcap) / 0.8
    logp_all = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    t = np.asarray(targets)
    np.testing.assert_allclose(want["logp"], np.where(t >= 0, logp_all[np.arange(5), t], 0.0))
    plain = ref.reference(h, w, targets, 0.8, g_lp, g_ent)
    assert np.max(np.abs(want["logp"] - plain["logp"])) > 0.1


def test_ignored_targets_give_zero_and_no_gradient(ref):
  hidden, weight, _, _, _ = ref.make_inputs(7, 16, 8, 50, jnp.float32)
  targets = jnp.full((16,), -1)

  def loss(h, w):
    return jnp.sum(token_logprobs(h, w, targets, impl="xla"))

  logp = token_logprobs(hidden, weight, targets, impl="xla")
  dh, dw = jax.grad(loss, argnums=(0, 1))(hidden, weight)
  assert np.all(np.asarray(logp) == 0.0)
  assert not np.any(np.asarray(dh)) and not np.any(np.asarray(dw))


@pytest.mark.parametrize("kwargs,error", [
    (dict(impl="fast"), "impl='fast'"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(logit_softcap=0.0), "logit_softcap must be a finite number > 0 or None; got 0.0"),
    (dict(logit_softcap=-30), "logit_softcap must be a finite number > 0 or None; got -30.0"),
    (dict(logit_softcap=float("inf")), "logit_softcap must be a finite number > 0 .* got inf"),
    (dict(logit_softcap=float("nan")), "logit_softcap must be a finite number > 0 .* got nan"),
    (dict(logit_softcap="30"), "logit_softcap must be a number > 0 or None; got '30'"),
    (dict(logit_softcap=True), "logit_softcap must be a number > 0 or None; got True"),
    (dict(logit_softcap=np.full((2, 2), 30.0)), r"logit_softcap .* got float64\[2, 2\]"),
])
def test_bad_options_fail_with_one_line_errors(ref, kwargs, error):
  hidden, weight, targets, _, _ = ref.make_inputs(0, 8, 4, 16, jnp.float32)
  with pytest.raises(ValueError, match=error) as info:
    token_logprobs(hidden, weight, targets, **kwargs)
  assert "\n" not in str(info.value)


def test_softcap_accepts_concrete_numbers(ref):
  """An int, a NumPy or a concrete JAX scalar is a cap like the Python float it equals."""
  hidden, weight, targets, _, _ = ref.make_inputs(0, 8, 4, 16, jnp.float32)
  want = token_logprobs(hidden, weight, targets, logit_softcap=2.0, impl="xla")
  for cap in (2, np.float32(2.0), jnp.asarray(2.0)):
    np.testing.assert_array_equal(token_logprobs(hidden, weight, targets, logit_softcap=cap,
                                                 impl="xla"), want)


def test_bad_shapes_and_traced_temperature_fail(ref):
  hidden, weight, targets, _, _ = ref.make_inputs(0, 8, 4, 16, jnp.float32)
  with pytest.raises(ValueError, match=r"hidden \[N, D\] and weight \[D, V\]"):
    token_logprobs(hidden, weight.T, targets)
  with pytest.raises(ValueError, match="targets must be integer"):
    token_logprobs(hidden, weight, targets.astype(jnp.float32))
  with pytest.raises(TypeError, match="temperature must be a Python number"):
    jax.jit(lambda t: token_logprobs(hidden, weight, targets, temperature=t))(1.0)
  with pytest.raises(TypeError, match=r"logit_softcap must be a Python number or None \(it is "
                     r"static\)") as info:
    jax.jit(lambda c: token_logprobs(hidden, weight, targets, logit_softcap=c))(30.0)
  assert "\n" not in str(info.value)
