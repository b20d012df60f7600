"""Yun et al.'s likelihood objectives as the paper runs them (arXiv:2506.01523 v2; OBJECTIVES.md §10.2, §10.3):
preference pairs from a dataset, plus beta x KL(pi || pi_0) estimated "with online responses" (following HyPO,
arXiv:2406.01462): rl.group_size samples of each pair's prompt drawn from the policy in the step, their token
log-probs under the policy (gradient) and the frozen reference given to the loss as `kl_batch` (per-token k2 by
default, `loss.params.kl_estimator`). With beta = 0 the reference does not run and no KL term is added.

* `pmle` (Eq. (4)-(5)): -ln sigma(gamma (ln pi(a+|x) - ln pi(a-|x))) + beta KL.
* `preference_distillation` (Eq. (9), (11), (12)): the soft-label cross-entropy to p_hat = sigma(R_hat(a1) -
  R_hat(a2)) + beta KL, R_hat from rl.reward_model scored inside the step on the pair's rows, or without one
  from the data's score_chosen / score_rejected.
"""

from __future__ import annotations

from jaxalign import losses
from jaxalign.algorithms.online.offline_data import DataUnits, PairDataAlgorithm, reward_model_scores


class PMLE(PairDataAlgorithm):
  loss = "pmle"

  def uses_reference(self, rl, loss_params: dict) -> bool:
    """The reference serves the KL term only: it runs when its coefficient beta is > 0."""
    return loss_params.get("beta", losses.spec(self.loss).params["beta"].default) > 0


class PreferenceDistillation(PMLE):
  loss = "preference_distillation"
  reads_reward_model = True

  def check_data(self, rl, examples) -> None:
    if not rl.reward_model and not all(len(e.scores) == 2 for e in examples):
      raise ValueError("preference_distillation needs R_hat: set rl.reward_model (scored in the step) or give "
                       "every pair score_chosen / score_rejected in data.train")

  def complete(self, ctx, state, frozen_params, units: DataUnits):
    if ctx.reward_model is not None:
      scores = reward_model_scores(ctx, frozen_params, units.data)
    else:
      scores = units.data["scores"]
    return units._replace(scores=scores), {"distill/score_margin": (scores[:, 0] - scores[:, 1]).mean()}
