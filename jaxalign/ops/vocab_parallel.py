"""Vocab-parallel token log-probs: LM head sharded over vocab, tokens over data axes.

Shape letters: N tokens, D model width, V vocab; a shard holds N / |token axes| tokens and
V / |vocab axis| columns.

Inside `jax.shard_map` each shard runs the single-device op's forward on its vocab slice
(targets shifted to the slice's columns) and gets partial (lse, ent, tz, lsq); they merge exactly
across the vocab axis with pmaxes and psums:

  lse = M + log sum_k exp(lse_k - M),  M = max_k lse_k
  ent = sum_k w_k (ent_k - log w_k),   w_k = exp(lse_k - lse)
  tz  = sum_k tz_k                      (the target column lives in one shard)
  lsq = log-sum-exp over k of lsq_k, as lse (only when log sum p^2 is asked for)

The backward (a custom_vjp around both shard_maps) gives each shard the global lse and
E_p[z]; a shard's dhidden is a partial sum over its columns (psum over the vocab axis) and
its dweight slice a partial sum over its tokens (psum over the token axes), both in float32.

A logit floor [N] is sharded like the targets: every shard masks its own columns against
its rows' floors (a shard that keeps none of a row's columns has lse_k = NEG, weight 0 in the
merge), so the merged statistics are those of the restricted softmax.

A logit soft-cap is element-wise, so every shard caps its own columns (z = cap * tanh(x / cap)
/ T, forward and backward, as in `xla_chunked`) and the merges above are unchanged.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

# The package re-exports the function under the module's name, so import names, not the module.
from jaxalign.ops.token_logprobs import (OpSpec, asked_outputs, backward_grads, check_inputs,
                                         cotangent_rows, finish_stats, forward_stats)


@dataclasses.dataclass(frozen=True)
class _Layout:
  mesh: jax.sharding.Mesh
  vocab_axis: str
  token_axes: tuple[str, ...]

  def specs(self):
    """PartitionSpecs of hidden [N, D], weight [D, V] and per-token [N] arrays."""
    return (P(self.token_axes, None), P(None, self.vocab_axis), P(self.token_axes))


def _local_targets(targets, v_local, vocab_axis):
  """Targets as columns of this shard's vocab slice (negative ids stay out of range)."""
  return jnp.where(targets >= 0, targets - lax.axis_index(vocab_axis) * v_local, -1)


def _logsumexp_over(x, axis):
  m = lax.pmax(x, axis)
  return m + jnp.log(lax.psum(jnp.exp(x - m), axis))


def _merge_over(stats, axis, with_sum_sq):
  lse_k, ent_k, tz_k, lsq_k = stats
  lse = _logsumexp_over(lse_k, axis)
  log_w = lse_k - lse
  ent = lax.psum(jnp.exp(log_w) * (ent_k - log_w), axis)
  lsq = _logsumexp_over(lsq_k, axis) if with_sum_sq else lsq_k
  return lse, ent, lax.psum(tz_k, axis), lsq


def _forward(hidden, weight, targets, floor, layout, spec):
  h_spec, w_spec, t_spec = layout.specs()

  def local(h, w, t, f):
    t_local = _local_targets(t, w.shape[1], layout.vocab_axis)
    stats = forward_stats(h, w, t_local, spec, f)
    return _merge_over(stats, layout.vocab_axis, spec.with_sum_sq)

  in_specs = (h_spec, w_spec, t_spec, t_spec)  # the floor (or None) is split like the targets
  stats = jax.shard_map(local, mesh=layout.mesh, in_specs=in_specs, out_specs=(t_spec,) * 4,
                        check_vma=False)(hidden, weight, targets, floor)
  return finish_stats(*stats, floor)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _vp(hidden, weight, targets, floor, layout, spec):
  lse, ent, tz, log_sum_sq = _forward(hidden, weight, targets, floor, layout, spec)
  return jnp.where(targets >= 0, tz - lse, 0.0), ent, log_sum_sq


def _vp_fwd(hidden, weight, targets, floor, layout, spec):
  h, w, t = hidden.value, weight.value, targets.value
  f = None if floor is None else floor.value
  lse, ent, tz, log_sum_sq = _forward(h, w, t, f, layout, spec)
  spec = dataclasses.replace(spec, need_dh=hidden.perturbed, need_dw=weight.perturbed)
  return (jnp.where(t >= 0, tz - lse, 0.0), ent, log_sum_sq), (h, w, t, f, lse, ent, spec)


def _vp_bwd(layout, _, res, cotangents):
  h, w, t, f, lse, ent, spec = res
  g_lp, g_ent, _ = cotangents  # log sum p^2 is returned without gradient
  rows, with_lp, with_ent = cotangent_rows(t, lse, ent, g_lp, g_ent, spec.temperature)
  with_ent = with_ent and spec.with_entropy
  if not (with_lp or with_ent) or not (spec.need_dh or spec.need_dw):
    return None, None, None, None
  h_spec, w_spec, t_spec = layout.specs()

  def local(h, w, t, rows, f):
    t_local = _local_targets(t, w.shape[1], layout.vocab_axis)
    dh, dw = backward_grads(h, w, t_local, rows, spec, with_lp=with_lp, with_ent=with_ent,
                            dh_dtype=jnp.float32, dw_dtype=jnp.float32, floor=f)
    if dh is not None:
      dh = lax.psum(dh, layout.vocab_axis).astype(h.dtype)
    if dw is not None:
      dw = (lax.psum(dw, layout.token_axes) if layout.token_axes else dw).astype(w.dtype)
    return dh, dw

  out_specs = (h_spec if spec.need_dh else None, w_spec if spec.need_dw else None)
  dh, dw = jax.shard_map(local, mesh=layout.mesh,
                         in_specs=(h_spec, w_spec, t_spec, t_spec, t_spec),
                         out_specs=out_specs, check_vma=False)(h, w, t, rows, f)
  return dh, dw, None, None  # the floor is data: no gradient


_vp.defvjp(_vp_fwd, _vp_bwd, symbolic_zeros=True)


def vocab_parallel_token_logprobs(hidden, weight, targets, mesh, *, vocab_axis="tensor",
                                  token_axes=("data", "fsdp"), temperature=1.0,
                                  logit_floor=None, logit_softcap=None, return_entropy=False,
                                  return_log_sum_sq=False, impl="auto"):
  """`token_logprobs` with the LM head sharded over `vocab_axis` of `mesh`.

  Gives the unsharded result (up to float rounding) without gathering the weight or logits.

  Args:
    hidden: [N, D], sharded (or to be sharded) over `token_axes` on N.
    weight: [D, V], sharded over `vocab_axis` on V; V must divide evenly by its size.
    targets: [N] int token ids, negative = ignored (as in `token_logprobs`).
    mesh: a `jax.sharding.Mesh`. vocab_axis: its vocab-parallel axis name.
    token_axes: its axes that shard tokens (names absent from the mesh are dropped); N must
      divide evenly by their total size.
    temperature, logit_floor, logit_softcap, return_entropy, return_log_sum_sq, impl: as in
      `token_logprobs` ("naive" is not sharded); logit_floor [N] is sharded like the targets.

  Returns:
    logp [N] float32 (and entropy [N], log sum p^2 [N] as asked), sharded over `token_axes`.
  """
  if impl == "naive":
    raise ValueError("vocab_parallel_token_logprobs: impl='naive' has no vocab-parallel form; "
                     "use token_logprobs(..., impl='naive') as the reference")
  targets, temperature, logit_floor, logit_softcap = check_inputs(
      hidden, weight, targets, temperature, impl, logit_floor, logit_softcap)
  names = mesh.axis_names
  if vocab_axis not in names:
    raise ValueError(f"vocab_parallel_token_logprobs: vocab_axis {vocab_axis!r} not in mesh "
                     f"axes {names}")
  token_axes = tuple(a for a in token_axes if a in names and a != vocab_axis)
  n_tok = 1
  for a in token_axes:
    n_tok *= mesh.shape[a]
  if weight.shape[1] % mesh.shape[vocab_axis] or hidden.shape[0] % n_tok:
    raise ValueError(f"vocab_parallel_token_logprobs: V={weight.shape[1]} must divide by "
                     f"|{vocab_axis}|={mesh.shape[vocab_axis]} and N={hidden.shape[0]} by "
                     f"|{token_axes}|={n_tok}; pad the vocab / batch")
  dtype = jnp.result_type(hidden.dtype, weight.dtype)
  spec = OpSpec(impl, temperature, bool(return_entropy), with_sum_sq=bool(return_log_sum_sq),
                softcap=logit_softcap)
  layout = _Layout(mesh, vocab_axis, token_axes)
  out = _vp(hidden.astype(dtype), weight.astype(dtype), targets, logit_floor, layout, spec)
  return asked_outputs(*out, return_entropy, return_log_sum_sq)
