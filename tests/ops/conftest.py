"""Fixtures for tests/ops: a float64 NumPy reference for token log-probs, independent of
jaxalign.ops, and random inputs."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def as_f64(x):
  """Array (bf16 included) -> float64 NumPy, exactly."""
  if isinstance(x, np.ndarray) and x.dtype == np.float64:
    return x
  return np.asarray(np.asarray(x, dtype=np.float32), dtype=np.float64)


def reference(hidden, weight, targets, temperature, g_lp, g_ent, softcap=None):
  """Log-probs, entropies, log sum_v p_v^2 and the gradients of sum(g_lp * logp) + sum(g_ent * ent).

  Args: hidden [N, D], weight [D, V], targets [N] (negative = ignored), temperature,
    g_lp, g_ent [N] cotangents, softcap: None or the logit soft-cap (logits
    c = softcap * tanh(x / softcap) of the raw x = hidden @ weight).
  Returns: dict of float64 arrays: logp [N], ent [N], log_sum_sq [N], dh [N, D], dw [D, V].
  """
  h, w = as_f64(hidden), as_f64(weight)
  t = np.asarray(targets)
  n = h.shape[0]
  x = h @ w  # [N, V] raw logits
  if softcap is None:
    c, dc_dx = x, 1.0
  else:
    th = np.tanh(x / softcap)
    c, dc_dx = softcap * th, 1.0 - th * th
  z = c / temperature  # [N, V]
  zmax = z.max(axis=1, keepdims=True)
  logz = zmax + np.log(np.exp(z - zmax).sum(axis=1, keepdims=True))  # [N, 1]
  logp_all = z - logz
  p = np.exp(logp_all)
  valid = t >= 0
  logp = np.where(valid, logp_all[np.arange(n), np.maximum(t, 0)], 0.0)
  ent = -(p * logp_all).sum(axis=1)
  onehot = np.zeros_like(z)
  onehot[np.arange(n)[valid], t[valid]] = 1.0
  # d logp / dz = onehot - p;  d ent / dz_k = -p_k (log p_k + ent).
  dz = (as_f64(g_lp) * valid)[:, None] * (onehot - p)
  dz -= as_f64(g_ent)[:, None] * p * (logp_all + ent[:, None])
  dx = dz * dc_dx / temperature  # chain rule: dz/dx = (1 - tanh(x / cap)^2) / T
  return {"logp": logp, "ent": ent, "log_sum_sq": np.log((p * p).sum(axis=1)), "dh": dx @ w.T,
          "dw": h.T @ dx}


def rel_err(actual, expected):
  """max |actual - expected| / max |expected|."""
  actual, expected = as_f64(actual), as_f64(expected)
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def central_differences(loss, hidden, weight, eps):
  """{"dh", "dw"}: float64 central differences of loss(hidden, weight) in every element of each."""
  out = {}
  for name, x in (("dh", hidden), ("dw", weight)):
    num = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
      up, dn = x.copy(), x.copy()
      up[idx] += eps
      dn[idx] -= eps
      num[idx] = (loss(*((up, weight) if name == "dh" else (hidden, up)))
                  - loss(*((dn, weight) if name == "dh" else (hidden, dn)))) / (2 * eps)
    out[name] = num
  return out


def make_inputs(seed, n, d, v, dtype, ignore_frac=0.2):
  """Random hidden [N, D], weight [D, V] (logits of order 1-5), targets with ~ignore_frac
  negative (ignored) ids, and cotangents g_lp, g_ent [N] float32."""
  k = jax.random.split(jax.random.key(seed), 6)
  hidden = jax.random.normal(k[0], (n, d), jnp.float32).astype(dtype)
  weight = (jax.random.normal(k[1], (d, v), jnp.float32) * (1.5 / np.sqrt(d))).astype(dtype)
  targets = jax.random.randint(k[2], (n,), 0, v)
  ignored = jax.random.uniform(k[3], (n,)) < ignore_frac
  targets = jnp.where(ignored, jnp.where(jnp.arange(n) % 2 == 0, -1, -100), targets)
  g_lp = jax.random.normal(k[4], (n,), jnp.float32)
  g_ent = jax.random.normal(k[5], (n,), jnp.float32)
  return hidden, weight, targets, g_lp, g_ent


@pytest.fixture
def ref():
  """reference(...), rel_err(...), make_inputs(...), as_f64(...), central_differences(...)."""
  return types.SimpleNamespace(reference=reference, rel_err=rel_err, make_inputs=make_inputs,
                               as_f64=as_f64, central_differences=central_differences)
