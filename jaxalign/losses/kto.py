"""KTO: prospect-theoretic alignment on unpaired desirable / undesirable data (OBJECTIVES.md §9.11).

Ethayarajh et al. 2024 (arXiv:2402.01306); reference code HALOs `KTOTrainer`, TRL `KTOTrainer`.
Also TRL KTOTrainer's other loss type, unpaired APO-zero (`apo_zero_unpaired_loss`).
"""

from typing import Optional

import jax
import jax.numpy as jnp

from jaxalign.losses.stats import Array, UnpairedStats, as_float, finish, mean_over, require
from jaxalign.losses.stats import safe_div

sg = jax.lax.stop_gradient


def kto_reference_point(batch: UnpairedStats) -> Array:
  """z0 = max(0, mean(S_KL(x, y') - S_ref_KL(x, y'))) over mismatched pairs, detached, [].

  Under `jax.jit` with a sharded batch the mean is global (all devices), as KTO requires.
  """
  kl = require(batch.kl_policy, "kl_policy", "kto") - require(batch.kl_ref, "kl_ref", "kto")
  return sg(jnp.maximum(0.0, jnp.mean(kl)))


def kto_loss(batch: UnpairedStats, *, beta: float = 0.1, lambda_d: float = 1.0,
             lambda_u: float = 1.0, z0: Optional[Array] = None,
             num_examples: Optional[Array] = None) -> tuple[Array, dict]:
  """KTO loss (OBJECTIVES.md §9.11): a mean over all examples of

    desirable:   lambda_d * (1 - sigma(beta (l - z0)))
    undesirable: lambda_u * (1 - sigma(beta (z0 - l)))

  with l = S(y) - S_ref(y) and z0 the detached, clamped reference point (`kto_reference_point`).
  Pass `z0` explicitly to use a value computed over the whole optimiser step (then `kl_policy` /
  `kl_ref` may be None); the mismatched completions y' pair each prompt with another example's
  completion (TRL rolls the batch by one).

  Args:
    batch: UnpairedStats with `policy`, `ref`, `desirable` (bool) and `kl_policy`, `kl_ref`, [B].
  Returns:
    (loss [], metrics: kl (= z0), rewards/chosen|rejected (mean beta*l per class, 0 for an empty
    class), rewards/margins, logps/chosen|rejected, count/chosen|rejected).
  """
  l = as_float(batch.policy) - require(batch.ref, "ref", "kto")
  desirable = require(batch.desirable, "desirable", "kto") > 0
  z0 = kto_reference_point(batch) if z0 is None else sg(as_float(z0))
  loss_d = lambda_d * (1.0 - jax.nn.sigmoid(beta * (l - z0)))
  loss_u = lambda_u * (1.0 - jax.nn.sigmoid(beta * (z0 - l)))
  loss = mean_over(jnp.where(desirable, loss_d, loss_u), num_examples)
  return finish(loss, {"kl": z0, **_class_metrics(batch, l, desirable, beta)})


def _class_metrics(batch: UnpairedStats, l: Array, desirable: Array, beta: float) -> dict[str, Array]:
  """Per-class means of beta * l and S (0 for an empty class) and the class counts (KTO's metrics)."""
  d, u = desirable.astype(l.dtype), (~desirable).astype(l.dtype)
  class_mean = lambda x, w: safe_div(jnp.sum(x * w), jnp.sum(w))
  reward_d, reward_u = class_mean(beta * l, d), class_mean(beta * l, u)
  return {
      "rewards/chosen": reward_d,
      "rewards/rejected": reward_u,
      "rewards/margins": reward_d - reward_u,
      "logps/chosen": class_mean(as_float(batch.policy), d),
      "logps/rejected": class_mean(as_float(batch.policy), u),
      "count/chosen": jnp.sum(d),
      "count/rejected": jnp.sum(u),
  }


def apo_zero_unpaired_loss(batch: UnpairedStats, *, beta: float = 0.1, lambda_d: float = 1.0,
                           lambda_u: float = 1.0,
                           num_examples: Optional[Array] = None) -> tuple[Array, dict]:
  """Unpaired APO-zero, D'Oosterlinck et al. 2024 (arXiv:2408.06266) Eq. (7) per example, as TRL
  KTOTrainer `loss_type="apo_zero_unpaired"`: a mean over all examples of

    desirable:   lambda_d * (1 - sigma(beta l))
    undesirable: lambda_u * sigma(beta l)

  with l = S(y) - S_ref(y): KTO without the reference point (no mismatched completions needed; TRL skips
  the KL pass), raising desirable and lowering undesirable log-ratios (lambda_* = TRL
  desirable_weight / undesirable_weight).

  Args:
    batch: UnpairedStats with `policy`, `ref`, `desirable` (bool), [B]; `kl_*` are ignored.
  Returns:
    (loss [], metrics as `kto_loss` without `kl`).
  """
  l = as_float(batch.policy) - require(batch.ref, "ref", "apo_zero_unpaired")
  desirable = require(batch.desirable, "desirable", "apo_zero_unpaired") > 0
  per_example = jnp.where(desirable, lambda_d * jax.nn.sigmoid(-beta * l), lambda_u * jax.nn.sigmoid(beta * l))
  return finish(mean_over(per_example, num_examples), _class_metrics(batch, l, desirable, beta))
