"""Online RL: one object per algorithm (its own module), the shared jitted step, and the registry.

Adding an algorithm: a module here with an `Algorithm` subclass (what it needs, its update units, its loss
statistics; see `base`) and one line in `ALGORITHMS`. Algorithms that learn from a dataset's responses besides
their samples (SPIN, PMLE, preference distillation) build on `offline_data`.
"""

from jaxalign.algorithms.online.base import Algorithm, PolicyGradient, Scored, TokenAlgorithm, TokenUnits
from jaxalign.algorithms.online.config import sampling_config
from jaxalign.algorithms.online.grpo import GroupRelative
from jaxalign.algorithms.online.online_dpo import OnlineDPO
from jaxalign.algorithms.online.pmle import PMLE, PreferenceDistillation
from jaxalign.algorithms.online.ppo import PPO
from jaxalign.algorithms.online.reinforce import Reinforce, ReinforcePlusPlus
from jaxalign.algorithms.online.remax import ReMax
from jaxalign.algorithms.online.rft import RFT
from jaxalign.algorithms.online.rkl import RKL
from jaxalign.algorithms.online.rloo import RLOO
from jaxalign.algorithms.online.spin import SPIN
from jaxalign.config import RLConfig
from jaxalign.algorithms.online.step import OnlineFns, make_rl_eval, make_rl_step, rollout_rows

ALGORITHMS: dict[str, Algorithm] = {
  "ppo": PPO(),
  "grpo": GroupRelative("grpo"),
  "dr_grpo": GroupRelative("dr_grpo", scale="none"),
  "dapo": GroupRelative("dapo"),
  "gspo": GroupRelative("gspo"),
  "cispo": GroupRelative("cispo"),
  "luspo": GroupRelative("luspo"),
  "sapo": GroupRelative("sapo"),
  "vespo": GroupRelative("vespo"),
  "rloo": RLOO(),
  "remax": ReMax(),
  "reinforce": Reinforce(),
  "reinforce_pp": ReinforcePlusPlus(),
  "online_dpo": OnlineDPO(),
  "rft": RFT(),
  "rkl": RKL(),
  # trained on a dataset (data.format sft / preference) with samples of its prompts drawn in the step
  "spin": SPIN(),
  "pmle": PMLE(),
  "preference_distillation": PreferenceDistillation(),
}

__all__ = ["ALGORITHMS", "sampling_config", "Algorithm", "OnlineFns", "PolicyGradient", "RLConfig", "Scored", "TokenAlgorithm",
           "TokenUnits", "make_rl_eval", "make_rl_step", "rollout_rows"]
