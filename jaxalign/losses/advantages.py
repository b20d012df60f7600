"""Advantage estimators, whitening and group statistics (OBJECTIVES.md §1.5, §1.6, §5.1, §6, §7).

Estimators are separate from the clipped-surrogate losses (§12.2), so "GRPO", "Dr. GRPO" and "DAPO"
are configurations of `grpo_advantages` + `grpo.grpo_loss`, not separate code paths. Every output
is detached (`stop_gradient`): advantages are constants in the policy loss.

Group layout: `group_ids [N]` int in [0, num_groups) marks the prompt of each completion; groups may
have different sizes (e.g. after DAPO dynamic sampling). Statistics are over the whole array, so
under `jax.jit` with a sharded batch they are global (all devices), as §1.5/§6.1 require.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from jaxalign.losses.reductions import masked_mean, masked_var
from jaxalign.losses.stats import Array, as_float, check, safe_div

sg = jax.lax.stop_gradient


def whiten(x: Array, mask: Array, *, shift_mean: bool = True, ddof: int = 1,
           eps: float = 1e-8, eps_on: str = "variance") -> Array:
  """(x - mean_m(x)) / sqrt(var_m(x) + eps) over all valid entries (OBJECTIVES.md §1.5), or with
  eps_on="std" (x - mean_m(x)) / (std_m(x) + eps) (TRL's RLOO advantage normalisation, eps 1e-4).

  Args:
    x, mask: same shape, e.g. [B, T]. shift_mean: False adds the mean back (TRL reward whitening,
      "keep_mean"). ddof: 1 = Bessel-corrected variance (TRL), 0 = population variance.
    eps_on: "variance" or "std": where eps is added.
  Returns:
    Whitened x, 0 on masked entries.
  """
  if eps_on not in ("variance", "std"):
    raise ValueError(f"whiten: eps_on={eps_on!r}; choose variance or std")
  x = as_float(x)
  mean = masked_mean(x, mask)
  var = masked_var(x, mask, ddof=ddof)
  scale = jax.lax.rsqrt(var + eps) if eps_on == "variance" else 1.0 / (jnp.sqrt(var) + eps)
  out = (x - mean) * scale
  if not shift_mean:
    out = out + mean
  return jnp.where(jnp.asarray(mask) > 0, out, 0.0)


def gae(rewards: Array, values: Array, mask: Array, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Array, Array]:
  """Generalised advantage estimation over the valid tokens of each row (OBJECTIVES.md §5.1).

  Schulman et al. 2015 (arXiv:1506.02438), Eq. (16), as a reverse `lax.scan`:
    delta_t = r_t + gamma * V[t'] - V[t];  A_t = delta_t + gamma * lam * A_{t'}
  where t' is the next *valid* position (masked positions are skipped, V after the last valid token
  is 0, so the score at EOS is not bootstrapped). Returns R_t = A_t + V_t.

  Args:
    rewards, values, mask: [B, T] (token rewards from `shaping.kl_shaped_rewards`, V_old).
  Returns:
    (advantages [B, T], returns [B, T]), both 0 on masked positions and detached.
  """
  valid = jnp.asarray(mask) > 0
  r = jnp.where(valid, as_float(rewards), 0.0)
  v = jnp.where(valid, as_float(values), 0.0)

  def step(carry, xs):
    next_value, next_adv = carry  # [B], [B]: V and A at the next valid position
    r_t, v_t, m_t = xs
    delta = r_t + gamma * next_value - v_t
    adv = delta + gamma * lam * next_adv
    carry = (jnp.where(m_t, v_t, next_value), jnp.where(m_t, adv, next_adv))
    return carry, jnp.where(m_t, adv, 0.0)

  zeros = jnp.zeros(r.shape[:1], r.dtype)
  _, adv = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, valid.T), reverse=True)  # [T, B]
  adv = adv.T  # [B, T]
  return sg(adv), sg(jnp.where(valid, adv + v, 0.0))


def group_stats(x: Array, group_ids: Array, num_groups: int, *,
                ddof: int = 1) -> tuple[Array, Array, Array]:
  """Per-element group mean, std (with `ddof`) and group size via segment sums (§1.6).

  Values are shifted by their group maximum before summing, so a group of equal values has a mean
  equal to that value and a std of exactly 0 in any precision.

  Args:
    x: [N]. group_ids: [N] int in [0, num_groups). num_groups: static.
  Returns:
    (mean [N], std [N], count [N]) of each element's group; std is 0 for groups of size <= ddof.
  """
  x = as_float(x)
  seg = lambda v: jax.ops.segment_sum(v, group_ids, num_segments=num_groups)  # [num_groups]
  count = seg(jnp.ones_like(x))
  shift = jax.ops.segment_max(x, group_ids, num_segments=num_groups)[group_ids]
  d = x - shift
  mean_d = safe_div(seg(d), count)[group_ids]
  var = safe_div(seg((d - mean_d) ** 2), jnp.maximum(count - ddof, 0.0))
  return shift + mean_d, jnp.sqrt(var)[group_ids], count[group_ids]


SCALES = ("group", "batch", "none")


def grpo_advantages(rewards: Array, group_ids: Array, num_groups: int, *, scale: str = "group",
                    ddof: int = 1, eps: float = 1e-4) -> Array:
  """GRPO outcome advantages A_i = (r_i - mean_g(r)) / (std(r) + eps) (OBJECTIVES.md §6.1).

  DeepSeekMath (arXiv:2402.03300) §4.1.2. Defaults follow TRL: std of the group with ddof=1, eps
  1e-4 (HALOs: ddof=0, eps 1e-2). `scale="batch"` divides by the std of the whole batch (TRL
  scale_rewards="batch"); `scale="none"` is Dr. GRPO (arXiv:2503.20783): A_i = r_i - mean_g(r).
  A group of equal rewards gets A = 0 (no NaN).

  Args:
    rewards: [N] scalar rewards. group_ids: [N]. num_groups: static.
  Returns:
    [N] detached advantages (broadcast to the tokens of completion i by the loss).
  """
  check(scale in SCALES, f"unknown advantage scale '{scale}'; choose one of {SCALES}")
  rewards = as_float(rewards)
  mean, std, _ = group_stats(rewards, group_ids, num_groups, ddof=ddof)
  centered = rewards - mean
  if scale == "group":
    centered = centered / (std + eps)
  elif scale == "batch":
    centered = centered / (jnp.sqrt(masked_var(rewards, jnp.ones_like(rewards), ddof=ddof)) + eps)
  return sg(centered)


def process_advantages(step_rewards: Array, step_mask: Array, mask: Array, group_ids: Array,
                       num_groups: int, *, ddof: int = 1, eps: float = 1e-4) -> Array:
  """GRPO process supervision (DeepSeekMath, arXiv:2402.03300, §4.1.3; OBJECTIVES.md §6.1).

  Step rewards are normalised with the mean / std of all step rewards of the group's completions;
  the advantage of token t is the sum of the normalised rewards of the steps ending at or after t.

  Args:
    step_rewards: [B, T] reward of each step, stored at the step's last token.
    step_mask: [B, T] 1 at step-end tokens. mask: [B, T] loss tokens. group_ids: [B].
  Returns:
    [B, T] detached advantages, 0 on masked positions.
  """
  w = (jnp.asarray(step_mask) > 0).astype(jnp.float32)
  x = jnp.where(w > 0, as_float(step_rewards), 0.0)
  ids = jnp.broadcast_to(jnp.asarray(group_ids)[:, None], x.shape).reshape(-1)  # [B*T]
  seg = lambda v: jax.ops.segment_sum(v.reshape(-1), ids, num_segments=num_groups)
  count = seg(w)
  top = jax.ops.segment_max(jnp.where(w > 0, x, -jnp.inf).reshape(-1), ids,
                            num_segments=num_groups)
  shift = jnp.where(count > 0, top, 0.0)[ids].reshape(x.shape)  # exact for equal rewards
  d = jnp.where(w > 0, x - shift, 0.0)
  mean_d = safe_div(seg(d), count)[ids].reshape(x.shape)
  var = safe_div(seg(w * (d - mean_d) ** 2), jnp.maximum(count - ddof, 0.0))
  norm = jnp.where(w > 0, (d - mean_d) / (jnp.sqrt(var)[ids].reshape(x.shape) + eps), 0.0)
  adv = jnp.flip(jnp.cumsum(jnp.flip(norm, -1), axis=-1), -1)  # [B, T] suffix sums
  return sg(jnp.where(jnp.asarray(mask) > 0, adv, 0.0))


def rloo_advantages(rewards: Array, group_ids: Array, num_groups: int) -> Array:
  """RLOO: A_i = R_i - mean_{j != i, same group} R_j (arXiv:2402.14740; OBJECTIVES.md §7.2).

  The leave-one-out baseline excludes the sample itself; A_i = k/(k-1) (R_i - mean_g R). Groups of
  size 1 have no baseline and get A = 0.
  """
  rewards = as_float(rewards)
  d = rewards - jax.ops.segment_max(rewards, group_ids, num_segments=num_groups)[group_ids]
  total = jax.ops.segment_sum(d, group_ids, num_segments=num_groups)[group_ids]
  count = jax.ops.segment_sum(jnp.ones_like(d), group_ids, num_segments=num_groups)[group_ids]
  baseline = safe_div(total - d, count - 1.0)  # mean of the others (shifted: exact for ties)
  return sg(jnp.where(count > 1, d - baseline, 0.0))


def remax_advantages(rewards: Array, greedy_rewards: Array) -> Array:
  """ReMax: A_i = R(x, y_i) - R(x, y_greedy) (arXiv:2310.10505, Alg. 1; OBJECTIVES.md §7.3), [N]."""
  return sg(as_float(rewards) - as_float(greedy_rewards))


def reinforce_advantages(rewards: Array, baseline: Optional[Array] = None) -> Array:
  """REINFORCE with a (detached) baseline: A_i = R_i - b_i (OBJECTIVES.md §7.1), [N]."""
  rewards = as_float(rewards)
  return sg(rewards if baseline is None else rewards - as_float(baseline))


def reinforce_pp_advantages(token_rewards: Array, mask: Array, *, ddof: int = 1,
                            eps: float = 1e-8) -> Array:
  """REINFORCE++: return-to-go G_t = sum_{s>=t} r_s (gamma = 1), whitened over all valid tokens.

  arXiv:2501.03262 (OBJECTIVES.md §7.4). Token rewards come from `shaping.kl_shaped_rewards` with
  beta ~0.01 (k1). For "REINFORCE++-baseline", subtract the group mean of the scores (see
  `group_stats`) before shaping.

  Args:
    token_rewards, mask: [B, T].
  Returns:
    [B, T] detached advantages, 0 on masked positions.
  """
  r = jnp.where(jnp.asarray(mask) > 0, as_float(token_rewards), 0.0)
  returns = jnp.flip(jnp.cumsum(jnp.flip(r, -1), axis=-1), -1)  # [B, T]
  return sg(whiten(returns, mask, ddof=ddof, eps=eps))


def best_worst(rewards: Array) -> tuple[Array, Array, Array]:
  """Selection for RFT / RAFT / best-of-n and online DPO (OBJECTIVES.md §8).

  Args:
    rewards: [B, C] rewards of C samples per prompt.
  Returns:
    (best [B], worst [B], distinct [B]): indices of the first maximum and first minimum
    (deterministic tie-breaking) and whether they differ in reward (online DPO skips ties).
  """
  rewards = as_float(rewards)
  best, worst = jnp.argmax(rewards, axis=-1), jnp.argmin(rewards, axis=-1)
  return best, worst, jnp.max(rewards, axis=-1) > jnp.min(rewards, axis=-1)


def groups_with_signal(rewards: Array, group_ids: Array, num_groups: int) -> Array:
  """[N] bool: the element's group has non-zero reward std (DAPO dynamic-sampling filter, §6.3)."""
  _, std, _ = group_stats(rewards, group_ids, num_groups, ddof=0)
  return std > 0


def group_metrics(rewards: Array, group_ids: Array, num_groups: int) -> dict[str, Array]:
  """TRL GRPO reward metrics: reward, reward_std (mean group std), frac_reward_zero_std."""
  rewards = as_float(rewards)
  _, std, _ = group_stats(rewards, group_ids, num_groups, ddof=1)
  has_signal = groups_with_signal(rewards, group_ids, num_groups)
  return sg({
      "reward": jnp.mean(rewards),
      "reward_std": jnp.mean(std),
      "frac_reward_zero_std": jnp.mean(1.0 - has_signal.astype(rewards.dtype)),
  })
