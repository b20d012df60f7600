"""The DPO family on summed log-ratios: DPO, cDPO, robust DPO, R-DPO, DPOP, RPO (OBJECTIVES.md §9).

Every loss takes `PairStats` (policy/ref summed log-probs of chosen and rejected, [B] each) and
returns (loss, metrics) with the shared pairwise metrics of §9.0, where the implicit reward of a
response is beta * l(y), l = S - S_ref. `num_pairs` is the step-level pair count for exact gradient
accumulation (default: this batch's B).
"""

from typing import Optional

import jax
import jax.numpy as jnp

from jaxalign.losses.fdpo import f_scores
from jaxalign.losses.stats import Array, PairStats, as_float, check, finish, mean_over
from jaxalign.losses.stats import pair_lengths, pair_logratios, pair_metrics

logsig = jax.nn.log_sigmoid


def _logratios(batch: PairStats, loss: str, reference_free: bool = False) -> tuple[Array, Array]:
  if reference_free:
    return as_float(batch.policy_chosen), as_float(batch.policy_rejected)
  return pair_logratios(batch, loss)


def dpo_loss(batch: PairStats, *, beta: float = 0.1, label_smoothing: float = 0.0,
             reference_free: bool = False,
             num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """DPO, Rafailov et al. 2023 (arXiv:2305.18290) Eq. (7) (OBJECTIVES.md §9.1).

  L = mean_b [-(1-eps) logsig(beta h) - eps logsig(-beta h)], h = l(y_w) - l(y_l); eps =
  `label_smoothing` (0 = DPO, > 0 = cDPO §9.2). `reference_free=True` sets S_ref := 0.

  Args:
    batch: PairStats (policy_*, ref_* used).
  Returns:
    (loss [], metrics: rewards/chosen|rejected|margins|accuracies, logps/chosen|rejected).
  """
  check(lambda: 0 <= label_smoothing <= 0.5,
        f"dpo: label_smoothing must be in [0, 0.5], got {label_smoothing}")
  l_w, l_l = _logratios(batch, "dpo", reference_free)
  z = beta * (l_w - l_l)
  per_pair = -(1.0 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)
  return finish(mean_over(per_pair, num_pairs), pair_metrics(batch, beta * l_w, beta * l_l))


def cdpo_loss(batch: PairStats, *, beta: float = 0.1, eps: float = 0.1,
              num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """Conservative DPO (label smoothing eps; Mitchell 2023 note; OBJECTIVES.md §9.2).

  L = mean_b [-(1-eps) logsig(beta h) - eps logsig(-beta h)]; minimiser beta h* = log((1-eps)/eps).
  """
  check(lambda: 0 <= eps < 0.5, f"cdpo: eps must be in [0, 0.5), got {eps}")
  return dpo_loss(batch, beta=beta, label_smoothing=eps, num_pairs=num_pairs)


def robust_dpo_loss(batch: PairStats, *, beta: float = 0.1, eps: float = 0.1,
                    divergence: str = "reverse_kl", alpha: float = 0.5,
                    num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """Robust DPO, Chowdhury et al. 2024 (arXiv:2403.00409) (OBJECTIVES.md §9.3).

  L = mean_b [(-(1-eps) logsig(beta h) + eps logsig(-beta h)) / (1 - 2 eps)]: unbiased under label
  flips with rate eps, unbounded below as h -> +inf. `divergence` / `alpha`: h from TRL's
  f-divergence scores f'(exp(l)) (`fdpo.f_scores`, TRL `f_divergence_type`); default l.
  """
  check(lambda: 0 <= eps < 0.5, f"robust_dpo: eps must be in [0, 0.5), got {eps}")
  l_w, l_l = pair_logratios(batch, "robust_dpo")
  s_w, s_l = f_scores(l_w, l_l, divergence, alpha, "robust_dpo")
  z = beta * (s_w - s_l)
  per_pair = (-(1.0 - eps) * logsig(z) + eps * logsig(-z)) / (1.0 - 2.0 * eps)
  return finish(mean_over(per_pair, num_pairs), pair_metrics(batch, beta * l_w, beta * l_l))


def rdpo_loss(batch: PairStats, *, beta: float = 0.1, alpha: float = 0.02,
              num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """R-DPO, length-regularised DPO (arXiv:2403.19159) (OBJECTIVES.md §9.6).

  L = mean_b -logsig(beta h + alpha (n(y_w) - n(y_l))). The `+alpha` sign follows the derivation
  with reward r - alpha |y| (§9.6); the paper's own equation was not re-read (§14 item 2), and the
  default alpha (0.02, the spec's worked example) is not a paper value.
  """
  l_w, l_l = pair_logratios(batch, "rdpo")
  n_w, n_l = pair_lengths(batch, "rdpo")
  z = beta * (l_w - l_l) + alpha * (n_w - n_l)
  metrics = pair_metrics(batch, beta * l_w, beta * l_l)
  metrics["length/diff"] = jnp.mean(n_w - n_l)
  return finish(mean_over(-logsig(z), num_pairs), metrics)


def dpop_loss(batch: PairStats, *, beta: float = 0.1, lam: float = 50.0,
              num_pairs: Optional[Array] = None) -> tuple[Array, dict]:
  """DPO-Positive, Smaug (arXiv:2402.13228) (OBJECTIVES.md §9.7).

  L = mean_b -logsig(beta (h - lam * max(0, S_ref(y_w) - S(y_w)))); lam = 50 in the paper.
  """
  l_w, l_l = pair_logratios(batch, "dpop")
  penalty = jnp.maximum(0.0, -l_w)  # = max(0, S_ref(y_w) - S(y_w))
  z = beta * (l_w - l_l - lam * penalty)
  metrics = pair_metrics(batch, beta * l_w, beta * l_l)
  metrics["dpop/penalty"] = jnp.mean(penalty)
  metrics["dpop/active_fraction"] = jnp.mean((penalty > 0).astype(z.dtype))
  return finish(mean_over(-logsig(z), num_pairs), metrics)


NLL_REDUCTIONS = ("sequence_mean", "token_mean", "sequence_sum")


def chosen_nll(batch: PairStats, reduction: str, loss: str, *,
               num_pairs: Optional[Array] = None,
               num_tokens: Optional[Array] = None) -> tuple[Array, Array, Array]:
  """NLL of the chosen responses from summed log-probs; returns (nll, numerator, denominator).

  "sequence_mean": mean_b -S_w / n_w (RPO paper); "token_mean": -sum S_w / sum n_w (TRL CPO, ORPO,
  RPO-TRL); "sequence_sum": mean_b -S_w (CPO paper). `num_tokens` / `num_pairs`: step-level counts.
  """
  check(reduction in NLL_REDUCTIONS, f"{loss}: unknown NLL reduction '{reduction}'; "
        f"choose one of {NLL_REDUCTIONS}")
  s_w = as_float(batch.policy_chosen)
  if reduction == "sequence_sum":
    num, den = jnp.sum(-s_w), s_w.shape[0] if num_pairs is None else num_pairs
  elif reduction == "sequence_mean":
    n_w, _ = pair_lengths(batch, loss)
    num, den = jnp.sum(-s_w / n_w), s_w.shape[0] if num_pairs is None else num_pairs
  else:
    n_w, _ = pair_lengths(batch, loss)
    num, den = jnp.sum(-s_w), jnp.sum(n_w) if num_tokens is None else num_tokens
  den = as_float(den)
  return num / den, num, den


def chosen_nll_loss(batch: PairStats, *, nll_reduction: str = "token_mean", num_pairs: Optional[Array] = None,
                    num_tokens: Optional[Array] = None) -> tuple[Array, dict]:
  """The NLL of the chosen responses alone (TRL DPOTrainer loss_type="sft"), the SFT term of loss mixtures such
  as MPO (`0.8*dpo + 0.2*bco + chosen_nll`); token mean by default, as TRL."""
  nll, num, den = chosen_nll(batch, nll_reduction, "chosen_nll", num_pairs=num_pairs, num_tokens=num_tokens)
  return finish(nll, {"nll/numerator": num, "nll/denominator": den,
                      "logps/chosen": jnp.mean(as_float(batch.policy_chosen))})


def rpo_loss(batch: PairStats, *, beta: float = 0.1, alpha: float = 1.0,
             nll_reduction: str = "sequence_mean", num_pairs: Optional[Array] = None,
             num_tokens: Optional[Array] = None) -> tuple[Array, dict]:
  """DPO + NLL (RPO), Iterative Reasoning Preference Optimization (arXiv:2404.19733) (§9.15).

  L = L_DPO + alpha * mean_b(-S(y_w) / n(y_w)) (paper, length-normalised NLL, alpha = 1);
  `nll_reduction="token_mean"` gives TRL's token-mean NLL.
  """
  loss, metrics = dpo_loss(batch, beta=beta, num_pairs=num_pairs)
  nll, num, den = chosen_nll(batch, nll_reduction, "rpo", num_pairs=num_pairs,
                             num_tokens=num_tokens)
  metrics = {k: v for k, v in metrics.items() if k != "loss"}
  metrics.update({"nll_loss": nll, "nll/numerator": num, "nll/denominator": den})
  return finish(loss + alpha * nll, metrics)
