"""Token log-probs (and entropies) from final hidden states and the LM head, one op.

Shape letters: N tokens, D model width, V vocab.

`token_logprobs(hidden [N, D], weight [D, V], targets [N])` returns log softmax(z)[target]
for z = hidden @ weight / temperature without materialising [N, V] logits in training:

  impl="xla"     chunked online log-sum-exp (`xla_chunked`), any backend.
  impl="pallas"  fused kernels: Triton on GPU (`pallas_gpu`), Mosaic on TPU (`pallas_tpu`),
                 the TPU kernels in interpret mode on CPU (slow; for tests).
  impl="auto"    pallas on GPU/TPU, xla on CPU (chosen per platform at lowering time, so a
                 function exported for "cuda" or "tpu" on a CPU host gets the kernels).
  impl="naive"   materialises the logits and differentiates with autodiff (reference only).
  impl="pallas_gpu" / "pallas_tpu" force one kernel family (interpret mode on CPU).

Gradients come from a `jax.custom_vjp` whose backward recomputes logits tile by tile and
accumulates dhidden / dweight in float32 (see `xla_chunked` for the formulas). Zero
cotangents (an unused entropy, an unperturbed weight) skip their share of the work.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jaxalign.ops import pallas_gpu, pallas_tpu, xla_chunked

IMPLS = ("auto", "pallas", "xla", "naive", "pallas_gpu", "pallas_tpu")
# Backward of the Pallas path: one XLA loop step per vocab chunk (the kernel writes a
# [min(N, PALLAS_TOKEN_CHUNK), PALLAS_VOCAB_CHUNK] gradient tile in the input dtype).
PALLAS_TOKEN_CHUNK = 16384
PALLAS_VOCAB_CHUNK = 4096


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class OpSpec:
  """Static configuration of one op call (also a pytree leaf-free residual)."""
  impl: str
  temperature: float
  with_entropy: bool
  need_dh: bool = True
  need_dw: bool = True


def _flavors(impl):
  """Kernel family per lowering platform; None means the XLA path."""
  if impl == "xla":
    return {"default": None}
  if impl in ("pallas_gpu", "pallas_tpu"):
    return {"cpu": impl, "default": impl}
  on_cpu = None if impl == "auto" else "pallas_tpu"  # "pallas" on CPU: TPU kernels, interpreted
  return {"cpu": on_cpu, "cuda": "pallas_gpu", "rocm": "pallas_gpu", "tpu": "pallas_tpu",
          "default": on_cpu}


def _per_platform(make, impl, *args):
  """Calls make(flavor, interpret)(*args) for the lowering platform's flavor (CPU interprets)."""
  flavors = _flavors(impl)
  if set(flavors.values()) == {None}:
    return make(None, False)(*args)
  branches = {p: make(f, p == "cpu") for p, f in flavors.items()}
  return lax.platform_dependent(*args, **branches)


def _forward_fn(spec):
  def make(flavor, interpret):
    kw = dict(temperature=spec.temperature, with_entropy=spec.with_entropy)
    if flavor is None:
      return functools.partial(xla_chunked.forward, **kw)
    module = pallas_gpu if flavor == "pallas_gpu" else pallas_tpu
    return functools.partial(module.forward, interpret=interpret, **kw)
  return make


def _backward_fn(spec, with_lp, with_ent, dh_dtype, dw_dtype):
  def make(flavor, interpret):
    grad_kw = dict(temperature=spec.temperature, with_lp=with_lp, with_ent=with_ent)
    chunks = {}
    if flavor is None:
      grad_fn = functools.partial(xla_chunked.grad_logits_reference, **grad_kw)
    else:
      module = pallas_gpu if flavor == "pallas_gpu" else pallas_tpu
      grad_fn = functools.partial(module.grad_logits, interpret=interpret, **grad_kw)
      chunks = dict(token_chunk=PALLAS_TOKEN_CHUNK, vocab_chunk=PALLAS_VOCAB_CHUNK)
    return functools.partial(
        xla_chunked.backward, grad_fn, need_dh=spec.need_dh, need_dw=spec.need_dw,
        dh_dtype=dh_dtype, dw_dtype=dw_dtype, **chunks)
  return make


def forward_stats(hidden, weight, targets, spec):
  """(lse, ent, tz), each [N] float32, for a column-local targets array (see `xla_chunked`)."""
  return _per_platform(_forward_fn(spec), spec.impl, hidden, weight, targets)


def backward_grads(hidden, weight, targets, rows, spec, *, with_lp, with_ent, dh_dtype=None,
                   dw_dtype=None):
  """(dhidden [N, D] or None, dweight [D, V] or None) from `xla_chunked.Rows`."""
  make = _backward_fn(spec, with_lp, with_ent, dh_dtype or hidden.dtype,
                      dw_dtype or weight.dtype)
  return _per_platform(make, spec.impl, hidden, weight, targets, rows)


def cotangent_rows(targets, lse, ent, g_lp, g_ent, temperature):
  """`xla_chunked.Rows` and the (with_lp, with_ent) flags from the output cotangents."""
  with_lp = not isinstance(g_lp, SymbolicZero)
  with_ent = not isinstance(g_ent, SymbolicZero)
  zeros = jnp.zeros_like(lse)
  coef_lp = jnp.where(targets >= 0, g_lp, 0.0) / temperature if with_lp else zeros
  coef_ent = g_ent.astype(jnp.float32) / temperature if with_ent else zeros
  return xla_chunked.Rows(lse, lse - ent, coef_lp, coef_ent), with_lp, with_ent


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(hidden, weight, targets, spec):
  lse, ent, tz = forward_stats(hidden, weight, targets, spec)
  return jnp.where(targets >= 0, tz - lse, 0.0), ent


def _fused_fwd(hidden, weight, targets, spec):
  h, w, t = hidden.value, weight.value, targets.value
  lse, ent, tz = forward_stats(h, w, t, spec)
  logp = jnp.where(t >= 0, tz - lse, 0.0)
  spec = dataclasses.replace(spec, need_dh=hidden.perturbed, need_dw=weight.perturbed)
  return (logp, ent), (h, w, t, lse, ent, spec)


def _fused_bwd(_, res, cotangents):
  h, w, t, lse, ent, spec = res
  rows, with_lp, with_ent = cotangent_rows(t, lse, ent, *cotangents, spec.temperature)
  with_ent = with_ent and spec.with_entropy
  if not (with_lp or with_ent) or not (spec.need_dh or spec.need_dw):
    return None, None, None
  dh, dw = backward_grads(h, w, t, rows, spec, with_lp=with_lp, with_ent=with_ent)
  return dh, dw, None


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def naive_token_logprobs(hidden, weight, targets, *, temperature=1.0, return_entropy=False):
  """Reference: materialises float32 [N, V] logits; gradients by autodiff. Same contract."""
  z = jnp.dot(hidden, weight, preferred_element_type=jnp.float32) / temperature  # [N, V]
  logp_all = jax.nn.log_softmax(z, axis=-1)  # [N, V]
  picked = jnp.take_along_axis(logp_all, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
  logp = jnp.where(targets >= 0, picked, 0.0)
  if not return_entropy:
    return logp
  return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


def check_inputs(hidden, weight, targets, temperature, impl):
  """Validates shapes, dtypes and options with one-line errors; returns (targets, temperature)."""
  if impl not in IMPLS:
    raise ValueError(f"token_logprobs: impl={impl!r}; expected one of {IMPLS}")
  if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[0]:
    raise ValueError(f"token_logprobs: need hidden [N, D] and weight [D, V]; got "
                     f"{hidden.shape} and {weight.shape}")
  if targets.shape != hidden.shape[:1] or not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"token_logprobs: targets must be integer [N={hidden.shape[0]}]; got "
                     f"{targets.dtype}{list(targets.shape)}")
  try:
    temperature = float(temperature)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise TypeError("token_logprobs: temperature must be a Python number (it is static)")
  if not temperature > 0:
    raise ValueError(f"token_logprobs: temperature must be > 0; got {temperature}")
  return targets.astype(jnp.int32), temperature


def token_logprobs(hidden, weight, targets, *, temperature=1.0, return_entropy=False,
                   impl="auto"):
  """Log-probabilities of the target tokens under softmax(hidden @ weight / temperature).

  Args:
    hidden: [N, D] final hidden states (bf16 or f32).
    weight: [D, V] LM head (for a tied embedding, pass its transpose).
    targets: [N] integer token ids in [0, V); a negative id marks an ignored position:
      log-prob 0 and no gradient from it. Its entropy is still computed (and differentiated).
    temperature: static Python float > 0; log-probs and entropy are of logits / temperature.
    return_entropy: also return the entropy of softmax(logits / temperature).
    impl: "auto", "pallas", "xla", "naive" (see the module docstring).

  Returns:
    logp [N] float32, or (logp [N], entropy [N]) float32 when return_entropy.
  """
  targets, temperature = check_inputs(hidden, weight, targets, temperature, impl)
  if impl == "naive":
    return naive_token_logprobs(hidden, weight, targets, temperature=temperature,
                                return_entropy=return_entropy)
  dtype = jnp.result_type(hidden.dtype, weight.dtype)
  spec = OpSpec(impl, temperature, bool(return_entropy))
  logp, ent = _fused(hidden.astype(dtype), weight.astype(dtype), targets, spec)
  return (logp, ent) if return_entropy else logp
