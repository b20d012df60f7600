"""Alignment objectives as pure, jittable functions of small statistics (OBJECTIVES.md).

Calling convention (every registered loss):

  loss, metrics = jaxalign.losses.get(name)(batch, **hparams)

* `batch` is ONE NamedTuple pytree (see `stats.py`); `input_type(name)` says which:
    PairStats      [B] summed log-probs policy_/ref_ chosen/rejected, n_chosen/n_rejected, scores
    UnpairedStats  [B] policy, ref, desirable, kl_policy/kl_ref (KTO mismatched pairs)
    ListStats      [B, C] policy, ref, labels (higher = better)
    RewardPair / RewardList   reward-model scores [B] / [B, C]
    TokenBatch     [B, T] logps (grad), mask, old_logps, ref_logps, advantages ([B] or [B, T]),
                   returns, values, old_values, entropy, correct
  A loss reads only the fields it needs; reference-based losses raise if a needed `ref_*` is None.
* Hyper-parameters are keyword-only, with OBJECTIVES.md defaults; string options are static.
* `metrics` is a flat dict of detached scalars, always including "loss".
* Exact gradient accumulation: every loss takes optional step-level counts (`num_pairs`, `num_prompt_tokens`,
  `num_examples`, `num_lists`, `num_tokens`, `num_sequences`). Pass the counts of the whole
  optimiser step and SUM the micro-batch losses. Token-normalised losses also report
  "numerator" / "denominator" (or "nll/numerator" / "nll/denominator") in their metrics.
* RL advantages are computed beforehand by `advantages.*` (GAE, GRPO, RLOO, ReMax, REINFORCE++)
  from rewards shaped by `shaping.*`, then stored in `TokenBatch.advantages`.
"""

from jaxalign.losses.advantages import best_worst, gae, group_metrics, group_stats
from jaxalign.losses.advantages import groups_with_signal
from jaxalign.losses.advantages import grpo_advantages, reinforce_advantages
from jaxalign.losses.advantages import reinforce_pp_advantages
from jaxalign.losses.advantages import process_advantages, remax_advantages, rloo_advantages, whiten
from jaxalign.losses.distribution import pmle_loss, preference_distillation_loss, rkl_loss
from jaxalign.losses.distribution import rkl_token_rewards
from jaxalign.losses.dpo import cdpo_loss, chosen_nll_loss, dpo_loss, dpop_loss, rdpo_loss, robust_dpo_loss
from jaxalign.losses.dpo import rpo_loss
from jaxalign.losses.dpo_variants import aot_loss, aot_unpaired_loss, apo_down_loss, apo_zero_loss, discopop_loss
from jaxalign.losses.dpo_variants import exo_pair_loss, sigmoid_norm_loss, sppo_hard_loss
from jaxalign.losses.fdpo import f_dpo_loss
from jaxalign.losses.grpo import cispo_loss, dapo_loss, dr_grpo_loss, grpo_loss, gspo_loss
from jaxalign.losses.grpo import gspo_token_loss, luspo_loss
from jaxalign.losses.kl import k1, k2, k3, kl_estimate, kl_penalty, sequence_kl
from jaxalign.losses.kto import apo_zero_unpaired_loss, kto_loss, kto_reference_point
from jaxalign.losses.listwise import descending_ranks, dpo_pl_loss, lipo_lambda_loss
from jaxalign.losses.margin import hinge_loss, ipo_loss, slic_loss
from jaxalign.losses.pointwise import bco_loss, nca_loss, npo_loss
from jaxalign.losses.ppo import clipped_surrogate, clipped_value_loss, ppo_loss, reinforce_pp_loss
from jaxalign.losses.reductions import AGGREGATIONS, aggregate, divide, masked_mean, masked_sum
from jaxalign.losses.reductions import last_token_onehot, masked_var, packed_loss_mask, segment_ends, segment_sums
from jaxalign.losses.reference_free import alphapo_loss, cpo_loss, orpo_loss, simpo_loss
from jaxalign.losses.registry import LossSpec, available, get, help_lines, hyperparameters, input_type, register
from jaxalign.losses.registry import spec
from jaxalign.losses.reinforce import reinforce_loss, rloo_loss
from jaxalign.losses.reward import all_pairs_ranking_loss, bradley_terry_loss, thurstone_loss
from jaxalign.losses.reward import plackett_luce_ranking_loss
from jaxalign.losses.sft import dft_loss, sft_loss
from jaxalign.losses.soft_gates import sapo_loss, vespo_loss
from jaxalign.losses.shaping import kl_penalised_scores, kl_shaped_rewards, normalize_scores
from jaxalign.losses.shaping import overlong_penalty
from jaxalign.losses.stats import ListStats, PairStats, RewardList, RewardPair, TokenBatch
from jaxalign.losses.stats import UnpairedStats

__all__ = [
    "aggregate", "AGGREGATIONS", "all_pairs_ranking_loss", "alphapo_loss", "aot_loss", "aot_unpaired_loss",
    "apo_down_loss", "apo_zero_loss", "apo_zero_unpaired_loss", "available", "bco_loss", "best_worst",
    "bradley_terry_loss", "cdpo_loss", "chosen_nll_loss", "cispo_loss", "clipped_surrogate", "clipped_value_loss",
    "cpo_loss", "dapo_loss", "descending_ranks", "dft_loss", "discopop_loss", "divide", "dpo_loss", "dpo_pl_loss",
    "dpop_loss", "dr_grpo_loss", "exo_pair_loss", "f_dpo_loss", "gae", "get", "group_metrics", "group_stats",
    "groups_with_signal", "grpo_advantages", "grpo_loss", "gspo_loss", "gspo_token_loss", "help_lines",
    "hinge_loss", "hyperparameters", "input_type", "ipo_loss", "k1", "k2", "k3", "kl_estimate",
    "kl_penalised_scores", "kl_penalty", "kl_shaped_rewards", "kto_loss", "kto_reference_point", "last_token_onehot",
    "lipo_lambda_loss", "ListStats", "LossSpec", "luspo_loss", "masked_mean", "masked_sum", "masked_var",
    "nca_loss", "normalize_scores", "npo_loss", "orpo_loss", "overlong_penalty", "packed_loss_mask",
    "PairStats", "plackett_luce_ranking_loss", "pmle_loss", "ppo_loss", "preference_distillation_loss",
    "process_advantages", "rdpo_loss", "register", "reinforce_advantages", "reinforce_loss",
    "reinforce_pp_advantages", "reinforce_pp_loss", "remax_advantages", "RewardList", "RewardPair",
    "rkl_loss", "rkl_token_rewards", "rloo_advantages", "rloo_loss", "robust_dpo_loss", "rpo_loss",
    "sapo_loss", "segment_ends", "segment_sums", "sequence_kl", "sft_loss", "sigmoid_norm_loss",
    "simpo_loss", "slic_loss", "spec", "sppo_hard_loss", "thurstone_loss", "TokenBatch", "UnpairedStats",
    "vespo_loss", "whiten"
]
