"""The DPO-style losses of TRL's `DPOTrainer` beyond sigmoid / hinge / ipo / robust / nca / bco.

EXO, SPPO (hard labels), AOT (paired and unpaired), APO (zero and down), DiscoPOP and the length-normalised
sigmoid, on the log-ratios l(y) = S(y) - S_ref(y) of `PairStats` (TRL `loss_type` names in brackets). All
return (loss, metrics) with the shared pairwise metrics of OBJECTIVES.md §9.0, implicit rewards beta * l
(summed log-ratios, as TRL logs them for every loss type). `num_pairs` is the step-level pair count for exact
gradient accumulation, except for AOT (see `aot_loss`).

`divergence` / `alpha` (exo_pair, discopop, sigmoid_norm) replace l by TRL's f-divergence scores f'(exp(l))
(`fdpo.f_scores`; TRL `f_divergence_type` / `f_alpha_divergence_coef` = 1 - alpha); the default reverse KL
is l itself. TRL refuses a non-default divergence for the other losses here (the f-DPO reparameterisation
leaves a beta log Z(x) term that cancels only in a chosen-minus-rejected score difference), so they take none.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from jaxalign.losses.fdpo import f_scores
from jaxalign.losses.kl import EXP_CLAMP
from jaxalign.losses.stats import Array, PairStats, as_float, check, finish, mean_over
from jaxalign.losses.stats import pair_lengths, pair_logratios, pair_metrics, require

logsig = jax.nn.log_sigmoid
sigmoid = jax.nn.sigmoid


def _smoothed_sigmoid(z: Array, label_smoothing: float) -> Array:
  """-(1-eps) logsig(z) - eps logsig(-z), elementwise (cDPO-style label smoothing)."""
  return -(1.0 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)


def exo_pair_loss(batch: PairStats, *, beta: float = 0.1, label_smoothing: float = 1e-3,
                  divergence: str = "reverse_kl", alpha: float = 0.5,
                  num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """EXO, Ji et al. 2024 (arXiv:2402.00856) Eq. (16), pairwise form as TRL `exo_pair`.

  With z = beta h, h = l(y_w) - l(y_l), the policy's distribution over {y_w, y_l} is q = (sigma(z),
  sigma(-z)) and the smoothed label distribution p = (1 - eps, eps); the loss is the reverse KL(q || p):
    L = mean_b [sigma(z) (logsig(z) - log(1 - eps)) + sigma(-z) (logsig(-z) - log eps)].
  Minimal at z* = log((1 - eps)/eps), zero there. eps = `label_smoothing` must be in (0, 1) (TRL raises at
  0; 1e-3 is the EXO paper's recommendation and the default here). The paper's separate beta_pi / beta_r
  collapse into the single beta, as in TRL.
  """
  check(lambda: 0 < label_smoothing < 1,
        f"exo_pair: label_smoothing must be in (0, 1), got {label_smoothing}")
  l_w, l_l = pair_logratios(batch, "exo_pair")
  s_w, s_l = f_scores(l_w, l_l, divergence, alpha, "exo_pair")
  z = beta * (s_w - s_l)
  eps = jnp.asarray(label_smoothing, z.dtype)
  per_pair = (sigmoid(z) * (logsig(z) - jnp.log1p(-eps)) + sigmoid(-z) * (logsig(-z) - jnp.log(eps)))
  return finish(mean_over(per_pair, num_pairs), pair_metrics(batch, beta * l_w, beta * l_l))


def sppo_hard_loss(batch: PairStats, *, beta: float = 0.1,
                   num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """SPPO with hard labels, Wu et al. 2024 (arXiv:2405.00675), as TRL `sppo_hard`.

  SPPO regresses each log-ratio onto eta (P(y beats pi_t) - 1/2) (Algorithm 1, Eq. (4.7)); with the hard
  win probability P = 1 for y_w and 0 for y_l and eta = 1/beta:
    L = mean_b [(l(y_w) - 1/(2 beta))^2 + (l(y_l) + 1/(2 beta))^2].
  Each response has its own target (not a margin), so it pushes l_w up and l_l down separately.
  """
  l_w, l_l = pair_logratios(batch, "sppo_hard")
  target = 0.5 / beta
  per_pair = (l_w - target) ** 2 + (l_l + target) ** 2
  return finish(mean_over(per_pair, num_pairs), pair_metrics(batch, beta * l_w, beta * l_l))


def aot_loss(batch: PairStats, *, beta: float = 0.1, label_smoothing: float = 0.0,
             num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """AOT (paired), Melnyk et al. 2024 (arXiv:2406.05882), as TRL `aot`.

  Alignment via optimal transport: first-order stochastic dominance of the policy's margin distribution
  over the reference's, via the 1-D OT plan (sorting). With m_b = S(y_w) - S(y_l) and
  m_ref_b = S_ref(y_w) - S_ref(y_l), sorted ascending over the batch,
    delta = sort(m) - sort(m_ref),
    L = mean_k [-(1-eps) logsig(beta delta_k) - eps logsig(-beta delta_k)].
  With B = 1 this is DPO with label smoothing eps.

  Needs the whole batch: the sort runs over the rows of `batch`, so the loss is not a sum of per-pair
  terms and is NOT exact under gradient accumulation over micro-batches (micro-batch losses, even with
  the step's `num_pairs`, sort within each micro-batch and do not sum to the full-batch loss; register
  it with exact_accumulation=False). Under `jax.jit` with a sharded batch the sort is global. Exact
  accumulation needs dL/d(stats) from the whole step's [B] statistics, pulled back through each
  micro-batch's forward pass.
  """
  check(lambda: 0 <= label_smoothing <= 0.5,
        f"aot: label_smoothing must be in [0, 0.5], got {label_smoothing}")
  l_w, l_l = pair_logratios(batch, "aot")
  margin = as_float(batch.policy_chosen) - as_float(batch.policy_rejected)
  ref_chosen = require(batch.ref_chosen, "ref_chosen", "aot")
  ref_margin = ref_chosen - require(batch.ref_rejected, "ref_rejected", "aot")
  delta = jnp.sort(margin) - jnp.sort(ref_margin)
  per_pair = _smoothed_sigmoid(beta * delta, label_smoothing)
  return finish(mean_over(per_pair, num_pairs), pair_metrics(batch, beta * l_w, beta * l_l))


def aot_unpaired_loss(batch: PairStats, *, beta: float = 0.1, label_smoothing: float = 0.0,
                      num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """AOT (unpaired), Melnyk et al. 2024 (arXiv:2406.05882), as TRL `aot_unpaired`.

  Stochastic dominance of the chosen log-ratio distribution over the rejected one: with l = S - S_ref
  sorted ascending over the batch separately for chosen and rejected,
    delta = sort(l(y_w)) - sort(l(y_l)),
    L = mean_k [-(1-eps) logsig(beta delta_k) - eps logsig(-beta delta_k)].
  Invariant under separate permutations of the chosen and of the rejected rows; with B = 1 it is DPO
  with label smoothing eps.

  Needs the whole batch, like `aot_loss`: the loss is not a sum of per-pair terms and is NOT exact under
  gradient accumulation over micro-batches (register it with exact_accumulation=False).
  """
  check(lambda: 0 <= label_smoothing <= 0.5,
        f"aot_unpaired: label_smoothing must be in [0, 0.5], got {label_smoothing}")
  l_w, l_l = pair_logratios(batch, "aot_unpaired")
  delta = jnp.sort(l_w) - jnp.sort(l_l)
  per_pair = _smoothed_sigmoid(beta * delta, label_smoothing)
  return finish(mean_over(per_pair, num_pairs), pair_metrics(batch, beta * l_w, beta * l_l))


def apo_zero_loss(batch: PairStats, *, beta: float = 0.1,
                  num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """APO-zero, D'Oosterlinck et al. 2024 (arXiv:2408.06266) Eq. (7), as TRL `apo_zero`.

  Anchored objective for when y_w is better than the model's own outputs: raise l(y_w), lower l(y_l),
    L = mean_b [(1 - sigma(beta l(y_w))) + sigma(beta l(y_l))].
  """
  l_w, l_l = pair_logratios(batch, "apo_zero")
  per_pair = sigmoid(-beta * l_w) + sigmoid(beta * l_l)  # 1 - sigma(x) = sigma(-x)
  return finish(mean_over(per_pair, num_pairs), pair_metrics(batch, beta * l_w, beta * l_l))


def apo_down_loss(batch: PairStats, *, beta: float = 0.1,
                  num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """APO-down, D'Oosterlinck et al. 2024 (arXiv:2408.06266) Eq. (8), as TRL `apo_down`.

  For when y_w is worse than the model's own outputs: lower l(y_w), and lower l(y_l) more,
    L = mean_b [sigma(beta l(y_w)) + (1 - sigma(beta (l(y_w) - l(y_l))))].
  """
  l_w, l_l = pair_logratios(batch, "apo_down")
  per_pair = sigmoid(beta * l_w) + sigmoid(-beta * (l_w - l_l))
  return finish(mean_over(per_pair, num_pairs), pair_metrics(batch, beta * l_w, beta * l_l))


def discopop_loss(batch: PairStats, *, beta: float = 0.1, tau: float = 0.05,
                  divergence: str = "reverse_kl", alpha: float = 0.5,
                  num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """DiscoPOP / log-ratio modulated loss, Chris Lu et al. 2024 (arXiv:2406.08414) Eq. (5), TRL `discopop`.

  With z = beta h and the modulation m = sigma(z / tau),
    L = mean_b [(1 - m) (-logsig(z)) + m exp(-z)],
  a blend of the logistic (DPO) loss for z << 0 and the exponential loss for z >> 0. tau = TRL's
  `discopop_tau` (0.05, the paper's value). Not monotone in z near 0 (the paper notes it is non-convex): at
  tau = 0.05 dL/dz(0) = +0.78, with a local maximum at z = 0.072 and a local minimum at z = -0.119, so a
  policy that starts at its reference (z = 0) is first pushed towards preferring y_l; tau >= 0.2 has no such
  bump (dL/dz(0) = -0.37). Measured on the sorting task: 16 steps from z = 0 at tau = 0.05 rank held-out
  pairs worse than training on swapped data (tests/train/test_orientation.py runs it at tau = 0.2).
  m exp(-z) is computed as exp(logsig(z/tau) - z), exponent clamped at EXP_CLAMP, so no inf * 0 = NaN.
  """
  check(lambda: tau > 0, f"discopop: tau must be > 0, got {tau}")
  l_w, l_l = pair_logratios(batch, "discopop")
  s_w, s_l = f_scores(l_w, l_l, divergence, alpha, "discopop")
  z = beta * (s_w - s_l)
  logistic = -logsig(z)
  modulated_exp = jnp.exp(jnp.minimum(logsig(z / tau) - z, EXP_CLAMP))
  per_pair = sigmoid(-z / tau) * logistic + modulated_exp
  return finish(mean_over(per_pair, num_pairs), pair_metrics(batch, beta * l_w, beta * l_l))


def sigmoid_norm_loss(batch: PairStats, *, beta: float = 0.1, divergence: str = "reverse_kl",
                      alpha: float = 0.5, num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """Length-normalised DPO, TRL `sigmoid_norm` (TRL cites SimPO's length normalisation, arXiv:2405.14734;
  also the length-normalised DPO of Tulu 3, arXiv:2411.15124).

    L = mean_b -logsig(beta (l(y_w)/n(y_w) - l(y_l)/n(y_l))),
  i.e. DPO on per-token average log-ratios (n = completion token counts, clamped at 1). With a divergence,
  l is replaced by TRL's f'(exp(l)) including its additive constant (it does not cancel after the division).
  Rewards in the metrics are beta * l (summed, as TRL logs them).
  """
  l_w, l_l = pair_logratios(batch, "sigmoid_norm")
  n_w, n_l = pair_lengths(batch, "sigmoid_norm")
  s_w, s_l = f_scores(l_w, l_l, divergence, alpha, "sigmoid_norm", trl_constant=True)
  z = beta * (s_w / n_w - s_l / n_l)
  return finish(mean_over(-logsig(z), num_pairs), pair_metrics(batch, beta * l_w, beta * l_l))
