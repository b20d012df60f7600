"""Reverse-KL minimisation (Yun et al. v2 Eq. (14)-(15); OBJECTIVES.md §10.4): min KL(pi || pi_tilde) with
pi_tilde ∝ pi_0^(beta/(beta+gamma)) exp(R / (beta + gamma)), i.e. maximise E_pi[R - gamma ln pi - beta ln(pi / pi_0)].

PPO on the KL-shaped reward (rl.kl_coef = beta, the paper's 0.05) with an exact entropy bonus of weight gamma
(loss.params.gamma, the paper's 0.01) computed from the full token distribution: the `rkl` loss. gamma = 0 is
PPO's RLHF objective.
"""

from __future__ import annotations

from jaxalign.algorithms.online.ppo import PPO


class RKL(PPO):
  loss = "rkl"

  def check(self, rl, loss_params: dict, prompts: int) -> None:
    super().check(rl, loss_params, prompts)
    if rl.entropy_coef:
      raise ValueError("rkl's entropy bonus is loss.params.gamma; rl.entropy_coef would add a second one")

  def needs_entropy(self, ctx) -> bool:
    return True  # the loss's exact entropy term
