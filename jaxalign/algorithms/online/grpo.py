"""The GRPO family (OBJECTIVES.md §6): group-normalised advantages, a clipped token loss, k3 KL in the loss.

GRPO (DeepSeekMath), Dr. GRPO (no std scaling, constant normaliser), DAPO (clip-higher, token mean; dynamic
sampling is rl.oversample, overlong shaping rl.overlong_buffer), GSPO (sequence ratio) and CISPO (clipped IS
weight), LUSPO (length-weighted GSPO), SAPO (soft gate) and VESPO (variational sequence weight) share the
estimator and differ in their registered loss.
"""

from __future__ import annotations

from jaxalign import losses
from jaxalign.algorithms.online.base import PolicyGradient


class GroupRelative(PolicyGradient):
  """A_i = (r_i - mean_group) / std_group (scale "group"), or without the division (scale "none")."""

  def __init__(self, loss: str, scale: str = "group"):
    self.loss, self.scale = loss, scale

  def needs_entropy(self, ctx) -> bool:  # the loss keeps only high-entropy tokens (top_entropy_quantile < 1)
    return super().needs_entropy(ctx) or ctx.fns.loss_params.get("top_entropy_quantile", 1.0) < 1

  def advantages(self, ctx, state, frozen_params, s, key):
    return losses.grpo_advantages(s.scores, s.group_ids, s.num_groups, scale=self.scale), {}

