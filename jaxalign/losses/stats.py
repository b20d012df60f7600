"""Input statistics for every objective, and helpers shared by the loss modules.

OBJECTIVES.md §12: one fused forward pass yields small per-sequence (or per-token) statistics, and
every objective is a pure function of them. Each loss takes exactly one of the NamedTuples below as
its only positional argument and ignores the fields it does not need. NamedTuples are pytrees, so a
batch can be passed through `jax.jit`, sharded and sliced into micro-batches; optional fields are
`None` (an empty pytree).

Shape letters: `B` pairs / sequences / lists, `T` token positions, `C` list (completion) axis.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

Array = Any


class PairStats(NamedTuple):
  """Pairwise preference data, one row per (prompt, chosen, rejected) triple.

  All fields are [B]. `policy_*` carry the gradient; `ref_*` are reference-model sums (no gradient,
  may be precomputed). Reference-free losses (CPO, SimPO, ORPO, SLiC, PMLE, distillation) ignore the
  `ref_*` fields; losses that need them raise if they are None (OBJECTIVES.md §12.3: never zeros).
  """
  policy_chosen: Array              # S(y_w) = sum_t m*lp under pi_theta           [B]
  policy_rejected: Array            # S(y_l)                                       [B]
  ref_chosen: Optional[Array] = None    # S_ref(y_w)                               [B]
  ref_rejected: Optional[Array] = None  # S_ref(y_l)                               [B]
  n_chosen: Optional[Array] = None      # n(y_w) completion tokens (clamped >= 1)   [B]
  n_rejected: Optional[Array] = None    # n(y_l)                                    [B]
  score_chosen: Optional[Array] = None  # external score R_hat(x, y_w) (distillation) [B]
  score_rejected: Optional[Array] = None  # external score R_hat(x, y_l)             [B]
  prompt_chosen: Optional[Array] = None  # summed log-probs of the prompt's own tokens (ORPO's NLL option) [B]
  n_prompt: Optional[Array] = None       # the prompt's predicted tokens (all but its first)               [B]
  weight: Optional[Array] = None  # per-pair loss weight (WPO; no gradient), applied by the objective, not the loss [B]


class UnpairedStats(NamedTuple):
  """Unpaired data (KTO, NPO): one row per (prompt, completion). All fields [B]."""
  policy: Array                         # S(y)
  ref: Optional[Array] = None           # S_ref(y)
  desirable: Optional[Array] = None     # bool, True = desirable (KTO)
  kl_policy: Optional[Array] = None     # S(y') of a mismatched completion (KTO z0)
  kl_ref: Optional[Array] = None        # S_ref(y') of the same mismatched completion


class ListStats(NamedTuple):
  """K responses per prompt (listwise DPO, LiPO). All fields [B, C]."""
  policy: Array                         # S(y_k)
  labels: Array                         # graded labels psi (higher = better; defines the ranking)
  ref: Optional[Array] = None           # S_ref(y_k)


class RewardPair(NamedTuple):
  """Reward-model scores of a chosen/rejected pair, read at the EOS token. All fields [B]."""
  chosen: Array                         # r_w
  rejected: Array                       # r_l
  margin: Optional[Array] = None        # preference-strength margin (Llama 2)


class RewardList(NamedTuple):
  """Reward-model scores of K ranked responses. All fields [B, C]."""
  rewards: Array                        # r_k
  labels: Array                         # graded labels (higher = better; defines the ranking)


class TokenBatch(NamedTuple):
  """Token-level statistics for SFT and RL losses (OBJECTIVES.md §12.2). Token fields are [B, T].

  Position t holds the log-prob of target token t+1 (shift-by-one already applied); `mask` is 1 on
  loss tokens only (completion, same packed segment, not padding).
  """
  logps: Array                          # lp_new under pi_theta (gradient)          [B, T]
  mask: Array                           # loss-token mask                          [B, T]
  old_logps: Optional[Array] = None     # lp_old at rollout time (no gradient)      [B, T]
  ref_logps: Optional[Array] = None     # lp_ref (no gradient)                     [B, T]
  advantages: Optional[Array] = None    # per token [B, T] or per sequence [B]
  returns: Optional[Array] = None       # value targets R_t                        [B, T]
  values: Optional[Array] = None        # V_new from the current critic (gradient) [B, T]
  old_values: Optional[Array] = None    # V_old from the rollout critic            [B, T]
  entropy: Optional[Array] = None       # H_t of the predictive distribution       [B, T]
  correct: Optional[Array] = None       # 1 where argmax == target (metrics only)   [B, T]


# --------------------------------------------------------------------------------------------------
# helpers


def as_float(x: Array) -> Array:
  """Upcasts to at least float32 (bf16/f16/int -> f32; f64 stays f64 for reference tests)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def zero_masked(batch: TokenBatch) -> TokenBatch:
  """Sets every [B, T] field of a TokenBatch to 0 on masked positions (and upcasts it).

  Padding may hold anything (-inf log-probs, garbage values); after this no masked position can
  reach a loss value or a gradient as NaN, and masked positions get exactly zero gradient.
  """
  valid = jnp.asarray(batch.mask) > 0
  clean = lambda x: None if x is None else (
      jnp.where(valid, as_float(x), 0.0) if jnp.ndim(x) == 2 else as_float(x))
  return TokenBatch(*(x if name == "mask" else clean(x)
                      for name, x in zip(TokenBatch._fields, batch)))


def require(value: Optional[Array], field: str, loss: str) -> Array:
  """Returns `as_float(value)`, or raises a one-line error naming the missing field."""
  if value is None:
    raise ValueError(f"loss '{loss}' needs the input field '{field}', which is None")
  return as_float(value)


def check(condition: Any, message: str) -> None:
  """Raises ValueError(message) if `condition` (a bool, or a zero-argument callable) is false.

  Checks on traced hyper-parameters (not concrete at trace time) are skipped.
  """
  try:
    ok = condition() if callable(condition) else condition
    ok = bool(ok)
  except jax.errors.ConcretizationTypeError:
    return
  if not ok:
    raise ValueError(message)


def safe_div(num: Array, den: Array) -> Array:
  """num / den, and 0 where den == 0 (no NaN for empty masks or empty classes)."""
  den = as_float(den)
  return jnp.where(den != 0, num / jnp.where(den != 0, den, 1.0), 0.0)


def mean_over(x: Array, count: Optional[Array] = None) -> Array:
  """sum(x) / count, count defaulting to x.size: pass the step-level count to accumulate exactly."""
  x = as_float(x)
  if count is None:
    count = x.size
  return jnp.sum(x) / count


def finish(loss: Array, metrics: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
  """Adds `loss` to the metrics and detaches every metric (STYLE rule 4)."""
  metrics = {"loss": loss, **metrics}
  return loss, {k: jax.lax.stop_gradient(jnp.asarray(v)) for k, v in metrics.items()}


def pair_logratios(batch: PairStats, loss: str) -> tuple[Array, Array]:
  """l(y_w), l(y_l) = S - S_ref for chosen and rejected, [B] each; raises if refs are missing."""
  l_w = as_float(batch.policy_chosen) - require(batch.ref_chosen, "ref_chosen", loss)
  l_l = as_float(batch.policy_rejected) - require(batch.ref_rejected, "ref_rejected", loss)
  return l_w, l_l


def pair_lengths(batch: PairStats, loss: str) -> tuple[Array, Array]:
  """n(y_w), n(y_l) clamped at 1, [B] each; raises if missing."""
  n_w = require(batch.n_chosen, "n_chosen", loss)
  n_l = require(batch.n_rejected, "n_rejected", loss)
  return jnp.maximum(n_w, 1.0), jnp.maximum(n_l, 1.0)


def pair_metrics(batch: PairStats, reward_w: Array, reward_l: Array) -> dict[str, Array]:
  """The shared pairwise metrics of OBJECTIVES.md §9.0 from per-pair implicit rewards [B]."""
  return {
      "rewards/chosen": jnp.mean(reward_w),
      "rewards/rejected": jnp.mean(reward_l),
      "rewards/margins": jnp.mean(reward_w - reward_l),
      "rewards/accuracies": jnp.mean((reward_w > reward_l).astype(reward_w.dtype)),
      "logps/chosen": jnp.mean(as_float(batch.policy_chosen)),
      "logps/rejected": jnp.mean(as_float(batch.policy_rejected)),
  }
