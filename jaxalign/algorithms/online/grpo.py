"""The GRPO family (OBJECTIVES.md §6): group-normalised advantages, a clipped token loss, k3 KL in the loss.

GRPO (DeepSeekMath), Dr. GRPO (no std scaling, constant normaliser), DAPO (clip-higher, token mean; dynamic
sampling is rl.oversample, overlong shaping rl.overlong_buffer), GSPO (sequence ratio) and CISPO (clipped IS
weight) share the estimator and differ in their registered loss.
"""

from __future__ import annotations

import inspect

from jaxalign import losses
from jaxalign.algorithms.online.base import PolicyGradient


class GroupRelative(PolicyGradient):
  """A_i = (r_i - mean_group) / std_group (scale "group"), or without the division (scale "none")."""

  def __init__(self, loss: str, scale: str = "group"):
    self.loss, self.scale = loss, scale

  def uses_reference(self, rl, loss_params: dict) -> bool:
    return super().uses_reference(rl, loss_params) or loss_beta(self.loss, loss_params) > 0

  def advantages(self, ctx, state, frozen_params, s, key):
    return losses.grpo_advantages(s.scores, s.group_ids, s.num_groups, scale=self.scale), {}


def loss_beta(loss: str, loss_params: dict) -> float:
  """The KL coefficient `beta` of a loss as configured (its default otherwise; 0 for a loss without one)."""
  default = inspect.signature(losses.get(loss)).parameters.get("beta")
  beta = loss_params.get("beta", default.default if default is not None else 0.0)
  return float(beta) if isinstance(beta, (int, float)) else 0.0
