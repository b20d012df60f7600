"""Token log-probs (entropies, log sum p^2) from final hidden states and the LM head, one op.

Shape letters: N tokens, D model width, V vocab.

`token_logprobs(hidden [N, D], weight [D, V], targets [N])` returns log softmax(z)[target]
for z = hidden @ weight / temperature without materialising [N, V] logits in training; with
`logit_softcap` (Gemma 2's final-logit soft-cap) z = cap * tanh(hidden @ weight / cap) /
temperature instead (`xla_chunked.soft_cap`):

  impl="xla"     chunked online log-sum-exp (`xla_chunked`), any backend.
  impl="pallas"  fused kernels: Triton on GPU (`pallas_gpu`), Mosaic on TPU (`pallas_tpu`),
                 the TPU kernels in interpret mode on CPU (slow; for tests).
  impl="auto"    pallas on GPU/TPU, xla on CPU (chosen per platform at lowering time, so a
                 function exported for "cuda" or "tpu" on a CPU host gets the kernels).
  impl="naive"   materialises the logits and differentiates with autodiff (reference only).
  impl="pallas_gpu" / "pallas_tpu" force one kernel family (interpret mode on CPU).

Gradients come from a `jax.custom_vjp` whose backward recomputes logits tile by tile and
accumulates dhidden / dweight in float32 (see `xla_chunked` for the formulas). Zero
cotangents (an unused entropy, an unperturbed weight) skip their share of the work. Under a
soft-cap the gradient with respect to the raw logits x is the one with respect to z times
dz/dx = (1 - tanh(x / cap)^2) / T, applied tile by tile as well. Without a cap, None travels all
the way down and the compiled program is the one without the feature (no tanh).

On request the same pass also gives each row's entropy (differentiable) and log sum_v p_v^2 (the
log collision probability, no gradient; WPO's weights, `algorithms.forward`).

An optional per-row `logit_floor` [N] replays a sampler's top-k / top-p mask: row n
normalises over K_n = {v : z_v >= floor_n} ∪ {target_n} (z tempered, after any soft-cap).
Every path masks the other columns to `NEG` tile by tile (see `xla_chunked.floor_mask`).
Without a floor, None travels all the way down and the compiled program is the one without
the feature.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
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
  with_sum_sq: bool = False
  softcap: float | None = None  # logit soft-cap, None for none


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
    kw = dict(temperature=spec.temperature, with_entropy=spec.with_entropy,
              with_sum_sq=spec.with_sum_sq, softcap=spec.softcap)
    if flavor is None:
      fn = functools.partial(xla_chunked.forward, **kw)
    else:
      module = pallas_gpu if flavor == "pallas_gpu" else pallas_tpu
      fn = functools.partial(module.forward, interpret=interpret, **kw)
    return lambda h, w, t, floor: fn(h, w, t, floor=floor)
  return make


def _backward_fn(spec, with_lp, with_ent, dh_dtype, dw_dtype):
  def make(flavor, interpret):
    grad_kw = dict(temperature=spec.temperature, with_lp=with_lp, with_ent=with_ent,
                   softcap=spec.softcap)
    chunks = {}
    if flavor is None:
      grad_fn = functools.partial(xla_chunked.grad_logits_reference, **grad_kw)
    else:
      module = pallas_gpu if flavor == "pallas_gpu" else pallas_tpu
      grad_fn = functools.partial(module.grad_logits, interpret=interpret, **grad_kw)
      chunks = dict(token_chunk=PALLAS_TOKEN_CHUNK, vocab_chunk=PALLAS_VOCAB_CHUNK)
    fn = functools.partial(
        xla_chunked.backward, grad_fn, need_dh=spec.need_dh, need_dw=spec.need_dw,
        dh_dtype=dh_dtype, dw_dtype=dw_dtype, **chunks)
    return lambda h, w, t, rows, floor: fn(h, w, t, rows, floor=floor)
  return make


def forward_stats(hidden, weight, targets, spec, floor=None):
  """(lse, ent, tz, lsq), each [N] float32, for a column-local targets array (see `xla_chunked`).

  floor: None or [N] float32 tempered-logit floor (columns below it, bar the target, are
  out; see `xla_chunked.floor_mask`).
  """
  return _per_platform(_forward_fn(spec), spec.impl, hidden, weight, targets, floor)


def backward_grads(hidden, weight, targets, rows, spec, *, with_lp, with_ent, dh_dtype=None,
                   dw_dtype=None, floor=None):
  """(dhidden [N, D] or None, dweight [D, V] or None) from `xla_chunked.Rows` (and floor)."""
  make = _backward_fn(spec, with_lp, with_ent, dh_dtype or hidden.dtype,
                      dw_dtype or weight.dtype)
  return _per_platform(make, spec.impl, hidden, weight, targets, rows, floor)


def finish_stats(lse, ent, tz, lsq, floor):
  """(lse, ent, tz, log sum p^2) from merged statistics. Entropy and log sum p^2 are 0 where the floor
  kept no column (an ignored target above every logit): such a row's merged lse is NEG, the rest the
  junk of an all-NEG row."""
  log_sum_sq = lsq - 2.0 * lse
  if floor is None:
    return lse, ent, tz, log_sum_sq
  kept = lse > 0.5 * xla_chunked.NEG
  return lse, jnp.where(kept, ent, 0.0), tz, jnp.where(kept, log_sum_sq, 0.0)


def cotangent_rows(targets, lse, ent, g_lp, g_ent, temperature):
  """`xla_chunked.Rows` and the (with_lp, with_ent) flags from the output cotangents."""
  with_lp = not isinstance(g_lp, SymbolicZero)
  with_ent = not isinstance(g_ent, SymbolicZero)
  zeros = jnp.zeros_like(lse)
  coef_lp = jnp.where(targets >= 0, g_lp, 0.0) / temperature if with_lp else zeros
  coef_ent = g_ent.astype(jnp.float32) / temperature if with_ent else zeros
  return xla_chunked.Rows(lse, lse - ent, coef_lp, coef_ent), with_lp, with_ent


def _stats(hidden, weight, targets, floor, spec):
  return finish_stats(*forward_stats(hidden, weight, targets, spec, floor), floor)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(hidden, weight, targets, floor, spec):
  lse, ent, tz, log_sum_sq = _stats(hidden, weight, targets, floor, spec)
  return jnp.where(targets >= 0, tz - lse, 0.0), ent, log_sum_sq


def _fused_fwd(hidden, weight, targets, floor, spec):
  h, w, t = hidden.value, weight.value, targets.value
  f = None if floor is None else floor.value
  lse, ent, tz, log_sum_sq = _stats(h, w, t, f, spec)
  logp = jnp.where(t >= 0, tz - lse, 0.0)
  spec = dataclasses.replace(spec, need_dh=hidden.perturbed, need_dw=weight.perturbed)
  return (logp, ent, log_sum_sq), (h, w, t, f, lse, ent, spec)


def _fused_bwd(_, res, cotangents):
  h, w, t, f, lse, ent, spec = res
  g_lp, g_ent, _ = cotangents  # log sum p^2 is returned without gradient
  rows, with_lp, with_ent = cotangent_rows(t, lse, ent, g_lp, g_ent, spec.temperature)
  with_ent = with_ent and spec.with_entropy
  if not (with_lp or with_ent) or not (spec.need_dh or spec.need_dw):
    return None, None, None, None
  dh, dw = backward_grads(h, w, t, rows, spec, with_lp=with_lp, with_ent=with_ent, floor=f)
  return dh, dw, None, None  # the floor is data: no gradient


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def naive_token_logprobs(hidden, weight, targets, *, temperature=1.0, logit_floor=None,
                         logit_softcap=None, return_entropy=False, return_log_sum_sq=False):
  """Reference: materialises float32 [N, V] logits; gradients by autodiff. Same contract."""
  x = jnp.dot(hidden, weight, preferred_element_type=jnp.float32)  # [N, V]
  z = xla_chunked.soft_cap(x, logit_softcap) / temperature
  if logit_floor is not None:
    keep = xla_chunked.floor_mask(z, targets, logit_floor)  # [N, V]
    z = jnp.where(keep, z, xla_chunked.NEG)
  logp_all = jax.nn.log_softmax(z, axis=-1)  # [N, V]
  picked = jnp.take_along_axis(logp_all, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
  logp = jnp.where(targets >= 0, picked, 0.0)
  ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  log_sum_sq = lax.stop_gradient(jax.nn.logsumexp(2.0 * logp_all, axis=-1))
  if logit_floor is not None:
    kept = jnp.any(keep, axis=-1)
    ent, log_sum_sq = jnp.where(kept, ent, 0.0), jnp.where(kept, log_sum_sq, 0.0)
  return asked_outputs(logp, ent, log_sum_sq, return_entropy, return_log_sum_sq)


def asked_outputs(logp, ent, log_sum_sq, return_entropy, return_log_sum_sq):
  """logp alone, or (logp, [entropy], [log sum p^2]) as asked."""
  extras = [x for x, asked in ((ent, return_entropy), (log_sum_sq, return_log_sum_sq)) if asked]
  return (logp, *extras) if extras else logp


def _static_softcap(logit_softcap):
  """logit_softcap as a Python float, or None; one-line errors."""
  if logit_softcap is None:
    return None
  if isinstance(logit_softcap, jax.core.Tracer):
    raise TypeError("token_logprobs: logit_softcap must be a Python number or None (it is "
                    "static)")
  try:
    kind = np.asarray(logit_softcap).dtype if np.ndim(logit_softcap) == 0 else None
  except ValueError:  # e.g. a ragged list
    kind = None
  if kind is None or not (np.issubdtype(kind, np.floating) or np.issubdtype(kind, np.integer)):
    shape = getattr(logit_softcap, "shape", None)
    got = (f"{logit_softcap!r}" if isinstance(logit_softcap, (str, bool)) else
           f"{getattr(logit_softcap, 'dtype', '')}{list(shape)}" if shape is not None else
           type(logit_softcap).__name__)
    raise ValueError(f"token_logprobs: logit_softcap must be a number > 0 or None; got {got}")
  cap = float(logit_softcap)
  if not 0.0 < cap < float("inf"):
    raise ValueError(f"token_logprobs: logit_softcap must be a finite number > 0 or None; "
                     f"got {cap}")
  return cap


def check_inputs(hidden, weight, targets, temperature, impl, logit_floor=None,
                 logit_softcap=None):
  """Validates shapes, dtypes and options with one-line errors; returns (targets, temperature,
  logit_floor, logit_softcap) with targets int32, the floor float32 (or None) and the soft-cap
  a Python float (or None)."""
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
  if logit_floor is not None:
    shape, dtype = getattr(logit_floor, "shape", None), getattr(logit_floor, "dtype", None)
    if shape != hidden.shape[:1] or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      got = f"{dtype}{list(shape)}" if shape is not None else type(logit_floor).__name__
      raise ValueError(f"token_logprobs: logit_floor must be a float array [N={hidden.shape[0]}]"
                       f" (or None); got {got}")
    logit_floor = logit_floor.astype(jnp.float32)
  return targets.astype(jnp.int32), temperature, logit_floor, _static_softcap(logit_softcap)


def token_logprobs(hidden, weight, targets, *, temperature=1.0, logit_floor=None,
                   logit_softcap=None, return_entropy=False, return_log_sum_sq=False,
                   impl="auto"):
  """Log-probabilities of the target tokens under softmax(logits / temperature), logits =
  hidden @ weight, soft-capped when logit_softcap is given.

  Args:
    hidden: [N, D] final hidden states (bf16 or f32).
    weight: [D, V] LM head (for a tied embedding, pass its transpose).
    targets: [N] integer token ids in [0, V); a negative id marks an ignored position:
      log-prob 0 and no gradient from it. Its entropy is still computed (and differentiated).
    temperature: static Python float > 0; log-probs and entropy are of logits / temperature.
    logit_floor: None (the full softmax) or [N] float: the sampler's smallest kept tempered
      logit per row (top-k / top-p replay). Row n then normalises over {v : logits[n, v] /
      temperature >= logit_floor[n]} (logits soft-capped if logit_softcap is given) plus its
      target (so a target a rounding error below the floor still counts); -inf means no
      truncation. Log-probs, entropy and gradients are those of that renormalised
      distribution; the floor gets no gradient. A row that keeps no column (only possible
      with an ignored target) has log-prob 0, entropy 0 and no gradient.
    logit_softcap: None (no cap) or a static Python float cap > 0: the logits are
      cap * tanh(hidden @ weight / cap) (Gemma 2's `final_logit_softcapping`, 30.0;
      `xla_chunked.soft_cap`) before the temperature and the floor, tile by tile (never
      materialised); log-probs, entropy, log sum p^2 and gradients (with respect to hidden
      and weight, through the tanh) are those of the capped logits.
    return_entropy: also return the entropy of softmax(logits / temperature) (restricted as
      above when logit_floor is given).
    return_log_sum_sq: also return log sum_v p_v^2 of the same distribution, without gradient
      (WPO's weights, Zhou et al. 2024 Eq. 2). Costs one more multiply-add per logit.
    impl: "auto", "pallas", "xla", "naive" (see the module docstring).

  Returns:
    logp [N] float32, or (logp [N], [entropy [N]], [log sum p^2 [N]]) float32, the ones asked for.
  """
  targets, temperature, logit_floor, logit_softcap = check_inputs(
      hidden, weight, targets, temperature, impl, logit_floor, logit_softcap)
  if impl == "naive":
    return naive_token_logprobs(hidden, weight, targets, temperature=temperature,
                                logit_floor=logit_floor, logit_softcap=logit_softcap,
                                return_entropy=return_entropy,
                                return_log_sum_sq=return_log_sum_sq)
  dtype = jnp.result_type(hidden.dtype, weight.dtype)
  spec = OpSpec(impl, temperature, bool(return_entropy), with_sum_sq=bool(return_log_sum_sq),
                softcap=logit_softcap)
  out = _fused(hidden.astype(dtype), weight.astype(dtype), targets, logit_floor, spec)
  return asked_outputs(*out, return_entropy, return_log_sum_sq)
