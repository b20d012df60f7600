"""Rollout and update settings of the online algorithms (`rl.*` in a recipe)."""

from __future__ import annotations

import dataclasses

from jaxalign.rollout.sampler import SamplingConfig


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """Rollout and update settings of the online algorithms."""

  group_size: int = 8  # G completions per prompt
  max_new_tokens: int = 16
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  # Log-probs under the distribution sampled from (renormalised over the kept top-k / top-p set, on the
  # sampler's and on the training path); false: the full tempered distribution (biased ratios when truncating).
  renormalize_sampling: bool = True
  epochs: int = 1  # passes over each rollout (PPO epochs)
  minibatches: int = 1  # optimiser steps per pass
  kl_coef: float = 0.0  # beta of the KL-in-reward algorithms (ppo, rloo, remax, reinforce, reinforce_pp)
  # KL to the reference as a loss term instead (or as well): coefficient x the mean over rows of each row's summed
  # per-token estimate (k3 as in GRPO, k2, k1).
  kl_loss_coef: float = 0.0
  kl_loss_estimator: str = "k3"
  entropy_coef: float = 0.0  # entropy bonus: the loss minus this times the token-mean entropy
  rewards: dict = dataclasses.field(default_factory=lambda: {"max_digit": 1.0})  # rule reward -> weight
  oversample: int = 1  # DAPO dynamic sampling: generate this many times the groups, keep those with signal
  # DAPO overlong reward shaping: completions longer than max_new_tokens - overlong_buffer lose up to 1 (0: off).
  overlong_buffer: int = 0
  mask_truncated_completions: bool = False  # completions without EOS give no loss (DAPO, TRL)
  # Packed training passes (`online.packing`): the old-policy, reference and update passes run on packed rows of
  # pack_length tokens (0: the rollout rows' P + N) holding pack_ratio x the padded rows' slots per batch shard;
  # a batch that does not fit runs padded (pack_ratio 0: always padded). Rows longer than P + N let two
  # completions longer than half of it share a row, at the cost of attention over the longer rows.
  pack_ratio: float = 0.0
  pack_length: int = 0
  # Each prompt of a group runs through the model once in the old-policy, reference and (one minibatch per
  # pass, policy-gradient algorithms) update passes, its completions attending to it (`Decoder.shared_prefix`):
  # exact, and (G - 1) / G of the prompt tokens' compute saved. Off, or packed passes: every row runs whole.
  share_prompt: bool = True
  # RLOO: advantages normalised over the step's rows to mean 0, divided by their std + 1e-4 (TRL's
  # RLOOTrainer normalize_advantages).
  normalize_advantages: bool = False
  is_cap: float = 0.0  # truncated importance weight on sampler / trainer log-prob mismatch (0: off)
  rft_threshold: float = 0.5  # rejection sampling keeps the best sample when its reward reaches this
  gamma: float = 1.0  # PPO: GAE discount
  lam: float = 0.95  # PPO: GAE lambda
  # HF directory of a reward model (*ForSequenceClassification) scored inside the step, added to the rule
  # rewards with this weight; PPO's critic starts from it (else from the policy's backbone, zero head).
  reward_model: str | None = None
  reward_model_weight: float = 1.0

  def __post_init__(self):
    if self.group_size < 1 or self.max_new_tokens < 1 or self.epochs < 1 or self.minibatches < 1:
      raise ValueError("rl.group_size, rl.max_new_tokens, rl.epochs and rl.minibatches must be >= 1")
    if not (self.temperature > 0 and 0 < self.top_p <= 1 and self.top_k >= 0 and self.oversample >= 1):
      raise ValueError("rl.temperature must be > 0, rl.top_p in (0, 1], rl.top_k >= 0 and rl.oversample >= 1")
    if 0 < self.is_cap < 1:
      raise ValueError(f"rl.is_cap={self.is_cap} must be 0 (off) or >= 1 (a cap on the importance weight)")
    if min(self.kl_coef, self.kl_loss_coef, self.is_cap, self.entropy_coef) < 0 or not (
        0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
      raise ValueError("rl.kl_coef, rl.kl_loss_coef, rl.entropy_coef and rl.is_cap must be >= 0, rl.gamma and "
                       "rl.lam in [0, 1]")
    if not 0 <= self.overlong_buffer < self.max_new_tokens:
      raise ValueError(f"rl.overlong_buffer={self.overlong_buffer} must be in [0, rl.max_new_tokens="
                       f"{self.max_new_tokens})")
    if not 0 <= self.pack_ratio <= 1 or self.pack_length < 0:
      raise ValueError(f"rl.pack_ratio={self.pack_ratio} must be in [0, 1] (0: padded rows) and rl.pack_length="
                       f"{self.pack_length} >= 0")
    if self.kl_loss_estimator not in ("k1", "k2", "k3"):
      raise ValueError(f"rl.kl_loss_estimator={self.kl_loss_estimator!r}; choose one of k1, k2, k3")

  @property
  def truncates(self) -> bool:
    """Whether sampling keeps only part of the vocabulary (top-k / top-p) and log-probs are renormalised."""
    return self.renormalize_sampling and (self.top_k > 0 or self.top_p < 1)

  def sampling(self, tokenizer) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                          top_p=self.top_p, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id or 0, renormalize=self.renormalize_sampling)
