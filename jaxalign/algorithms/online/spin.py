"""Self-Play fIne-tuNing (SPIN; Chen et al. 2024, arXiv:2401.01335, Eq. (4.7) / (4.8)).

Iteration t trains pi_{t+1} to tell the demonstrations y ~ p_data(x) from the previous iterate's own answers
y' ~ pi_t(x):

  L(theta) = E_{x, y ~ p_data, y' ~ pi_t} [ l(lambda ln pi_theta(y|x) / pi_t(y|x)
                                               - lambda ln pi_theta(y'|x) / pi_t(y'|x)) ]

with the logistic l(u) = ln(1 + e^-u): the registered "dpo" loss with beta = lambda, the demonstration as
chosen, the sample as rejected and the reference = pi_t. pi_t is the policy at the last iteration boundary:
rl.reference_update_steps = K steps make one iteration (the reference lives in the train state; see
`online.step.next_reference`). The samples are drawn from the current policy in the step; at the first step of
an iteration it is pi_t exactly, later ones sample from the policy being trained (the on-policy variant; the
paper generates the whole iteration's answers up front).

Each demonstration is paired with each of the rl.group_size samples of its prompt: G pairs sharing a chosen
response, an estimate of the same expectation over y' with G samples instead of one (the paper's G = 1, the
recipe's default). The demonstration's log-probs are computed once per prompt.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxalign import losses
from jaxalign.algorithms.online.offline_data import DataAlgorithm, DataUnits, SampleStats, reference_logps


class SPIN(DataAlgorithm):
  loss = "dpo"
  data_format = "sft"

  def check(self, rl, loss_params: dict, prompts: int) -> None:
    super().check(rl, loss_params, prompts)
    if not rl.reference_update_steps:
      raise ValueError("spin's reference is the previous iteration's policy: set rl.reference_update_steps "
                       "(the steps of one iteration)")

  def complete(self, ctx, state, frozen_params, units: DataUnits):
    return units._replace(data_ref=reference_logps(ctx, state, frozen_params, self, units.data)), {}

  def stats(self, ctx, policy, trainable, unit: DataUnits):
    g = ctx.rl.group_size
    demo, n_demo = self.data_logps(ctx, policy, unit.data)  # [U]
    logps, mask = self.sample_logps(ctx, policy, unit)  # [U*G, N]
    pairs = losses.PairStats(policy_chosen=jnp.repeat(demo, g), policy_rejected=jnp.sum(logps * mask, -1),
                             ref_chosen=jnp.repeat(unit.data_ref, g),
                             ref_rejected=jnp.sum(unit.ref.reshape(mask.shape) * mask, -1),
                             n_chosen=jnp.repeat(n_demo, g), n_rejected=jnp.maximum(jnp.sum(mask, -1), 1.0))
    return SampleStats(pairs, None)

  def evaluate(self, ctx, policy, data: dict) -> dict:
    """The held-out demonstrations' negative log-likelihood per token (the fixed point of SPIN is pi = p_data)."""
    s, n = self.data_logps(ctx, policy, data)
    nll = -jnp.sum(s) / jnp.sum(n)
    return {"nll_per_token": nll, "loss": nll}
