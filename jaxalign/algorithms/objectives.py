"""Offline objectives: how each family turns a batch into loss statistics.

An `Objective` pairs a registered loss (`jaxalign.losses`) with the forward passes that produce its
input statistics; what a loss needs (its input type, data format, reference) is read from its registration
(`losses.spec`). Losses sum exactly over micro-batches: `step_counts` computes the step-level denominators
from the whole accumulated batch [A, B, ...] before any forward pass, and `prepass` the statistics that need
one (KTO's reference point). The few losses that cannot (batch-level sorting) are refused with accumulation.

Families: SFT (TokenBatch), the direct pairwise losses (PairStats), listwise (ListStats), unpaired
(UnpairedStats: KTO, NPO) and reward models (RewardPair / RewardList on a scalar head).

Pairs and lists come padded ([B, C, T], one sequence per row) or packed ([N, T] rows holding several sequences,
`pack_row` / `pack_segment` [B, C] saying where each is); both go through `forward.sequence_sums`, so the
statistics and step counts are the same for either layout.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxalign import losses
from jaxalign.algorithms.forward import example_and_prompt_logps, example_logps, frozen, loss_targets, rows
from jaxalign.algorithms.forward import sequence_sums, token_logps

@dataclasses.dataclass(frozen=True)
class Objective:
  """What one training algorithm needs from a batch; `stats(policy, reference, batch)` -> loss input."""

  loss_name: str
  data_format: str
  scalar_head: bool
  uses_reference: bool
  stats: Callable
  # Extra per-call loss arguments derived from the batch (e.g. step counts), given the stacked batch.
  step_counts: Callable
  # Loss inputs that need a forward pass over the whole step before the gradient pass (KTO's reference point):
  # prepass(policy, reference, batch [A, ...], **op) -> {name: value}, or None.
  prepass: Callable | None = None
  # Running means over steps the loss receives: {loss argument: metric} (`losses.LossSpec.running`).
  running: dict = dataclasses.field(default_factory=dict)

  def loss(self, stats, counts: dict, params: dict):
    """(loss share of this micro-batch, metrics). Shares sum to the step loss over micro-batches."""
    if getattr(stats, "weight", None) is not None:
      return weighted_pair_loss(self.loss_name, stats, params, counts)
    return call_loss(self.loss_name, stats, params, counts)


def call_loss(name: str, stats, params: dict, counts: dict):
  """The registered loss `name` on `stats`, given only the step counts its signature accepts."""
  fn = losses.get(name)
  accepted = inspect.signature(fn).parameters
  return fn(stats, **params, **{k: v for k, v in counts.items() if k in accepted})


def weighted_pair_loss(name: str, stats: losses.PairStats, params: dict, counts: dict):
  """sum_b w_b l_b: loss `name` with each pair's term weighted by `stats.weight` [B] (WPO; TRL multiplies its
  per-sequence losses the same way). A loss that sums over micro-batches (`exact_accumulation`) is a sum of
  per-pair terms over the step's counts, so l_b is its value on pair b alone, given those counts; the
  one-pair metrics combine as micro-batch metrics do (`combine_metrics`): `loss` is the weighted sum, the other
  metrics (a mixture's component losses too) are those of the unweighted terms. Adds `wpo/weight`, the mean
  weight. Weights are not clamped (TRL 1.16 does not clamp them either; earlier TRL clamped at 1)."""
  weight = stats.weight
  counts = {"num_pairs": weight.shape[0], **counts}
  one_pair = lambda pair: call_loss(name, jax.tree.map(lambda x: x[None], pair), params, counts)
  per_pair, metrics = jax.vmap(one_pair)(stats._replace(weight=None))  # [B], {name: [B]}
  loss = jnp.sum(weight * per_pair)
  return loss, {**combine_metrics(metrics), "loss": loss, "wpo/weight": jnp.mean(weight)}


def is_share(key: str) -> bool:
  """Whether a loss metric is a micro-batch's share of a step-level quantity (divided by the step's counts, so
  the shares add up): the loss, its named parts ("*_loss") and the numerators of token-normalised ones."""
  return key in ("loss", "numerator", "nll_per_token") or key.endswith(("_loss", "/loss", "/numerator"))


def combine_metrics(per_micro: dict) -> dict:
  """Step metrics from micro-batch metrics stacked on axis 0: shares (`is_share`) added, the rest (per-example
  means over equal micro-batches, step-level denominators) averaged."""
  return {k: (jnp.sum if is_share(k) else jnp.mean)(v, axis=0) for k, v in per_micro.items()}


def eval_metrics(stats, counts: dict) -> dict:
  """Metrics that need no loss: does the policy itself rank the data's preferred answer first? Per-token NLL is a
  share of the step's tokens (`counts`), like the loss."""
  if isinstance(stats, losses.PairStats):
    out = {"policy_prefers_chosen": jnp.mean((stats.policy_chosen > stats.policy_rejected).astype(jnp.float32))}
    if stats.ref_chosen is not None:
      out["logratio_per_token/chosen"] = jnp.mean((stats.policy_chosen - stats.ref_chosen) / stats.n_chosen)
      out["logratio_per_token/rejected"] = jnp.mean((stats.policy_rejected - stats.ref_rejected) / stats.n_rejected)
    return out
  if isinstance(stats, losses.TokenBatch):
    tokens = counts.get("num_tokens", jnp.sum(stats.mask))
    return {"nll_per_token": -jnp.sum(stats.logps * stats.mask) / jnp.maximum(tokens, 1.0)}
  return {}


def _response_counts(batch: dict, prompt: bool = False) -> jax.Array:
  """Loss tokens per response of a stacked batch [A, ...], shaped like its examples ([A, B] or [A, B, C]); a
  packed SFT row counts as one response. prompt: the predicted prompt tokens of each sequence instead."""
  keys = ("input_ids", "loss_mask", "segment_ids", "pack_row", "pack_segment")

  def count(micro):
    view = rows(micro)
    mask = loss_targets(view)[1]
    if prompt:
      mask = loss_targets({**view, "loss_mask": (view["segment_ids"] != 0).astype(mask.dtype)})[1] - mask
    return sequence_sums(mask, mask, micro)[1]

  return jax.vmap(count)({k: batch[k] for k in keys if k in batch})


# ---------------------------------------------------------------------------------------------- SFT


def sft_stats(policy, reference, batch, **op):
  del reference
  logps, mask, entropy = token_logps(policy, batch, return_entropy=True, **op)
  return losses.TokenBatch(logps=logps, mask=mask, entropy=jax.lax.stop_gradient(entropy))


def sft_counts(batch):
  tokens = _response_counts(batch)
  return {"num_tokens": jnp.sum(tokens), "num_sequences": tokens.size}


# -------------------------------------------------------------------------------- direct (policy LM)


def _policy_and_reference(policy, reference, batch, prefix="", **op):
  """Summed log-probs and token counts of every sequence [E...] (padded or packed), and the reference's."""
  s, n = example_logps(policy, batch, prefix, **op)
  return s, n, _reference_logps(reference, batch, prefix, **op)


def _reference_logps(reference, batch, prefix="", **op):
  """The frozen reference's summed log-probs of every sequence [E...], or None without a reference model."""
  return frozen(example_logps, reference, batch, prefix, **op)[0] if reference is not None else None


def pair_stats(policy, reference, batch, prompt=False, ld_alpha=None, wpo=False, **op):
  """PairStats of a batch; prompt: also the chosen prompts' log-probs (ORPO's NLL on prompt and completion);
  ld_alpha: LD-DPO's sums for policy and reference alike (`forward.ld_weights`); wpo: WPO's pair weights
  exp(log w(y_w) + log w(y_l)) from the policy's pass (`forward.wpo_log_weights`)."""
  if ld_alpha is not None:
    op = {**op, "ld_alpha": ld_alpha}
  extra = {}
  if prompt:
    s, n, s_prompt, n_prompt = example_and_prompt_logps(policy, batch, **op)
    extra = {"prompt_chosen": s_prompt.reshape(-1, 2)[:, 0], "n_prompt": n_prompt.reshape(-1, 2)[:, 0]}
  elif wpo:
    s, n, log_w = example_logps(policy, batch, wpo=True, **op)
    extra = {"weight": jnp.exp(jnp.sum(log_w.reshape(-1, 2), axis=-1))}
  else:
    s, n = example_logps(policy, batch, **op)
  s_ref = _reference_logps(reference, batch, **op)
  s, n = s.reshape(-1, 2), n.reshape(-1, 2)
  s_ref = batch["ref_logps"] if s_ref is None and "ref_logps" in batch else s_ref
  ref = (None, None) if s_ref is None else (s_ref.reshape(-1, 2)[:, 0], s_ref.reshape(-1, 2)[:, 1])
  # A reward model's scores of each response (preference distillation's soft labels), from the data or the step
  score = (None, None) if "scores" not in batch else (batch["scores"][..., 0], batch["scores"][..., 1])
  return losses.PairStats(policy_chosen=s[:, 0], policy_rejected=s[:, 1], ref_chosen=ref[0], ref_rejected=ref[1],
                          n_chosen=n[:, 0], n_rejected=n[:, 1], score_chosen=score[0], score_rejected=score[1],
                          **extra)


def pair_counts(batch):
  tokens = _response_counts(batch)
  return {"num_pairs": _examples(batch), "num_tokens": jnp.sum(tokens[..., 0]),
          "num_prompt_tokens": jnp.sum(_response_counts(batch, prompt=True)[..., 0])}


def list_stats(policy, reference, batch, **op):
  s, _, s_ref = _policy_and_reference(policy, reference, batch, **op)
  shape = batch["scores"].shape
  s_ref = batch.get("ref_logps") if s_ref is None else s_ref.reshape(shape)
  return losses.ListStats(policy=s.reshape(shape), labels=batch["scores"], ref=s_ref)


def _examples(batch) -> int:
  """Examples (pairs, lists, completions) in a stacked batch [A, B, ...] (packed: `pack_row` [A, B, C])."""
  shape = batch.get("pack_row", batch["input_ids"]).shape
  return shape[0] * shape[1]


def list_counts(batch):
  return {"num_lists": _examples(batch)}


def unpaired_stats(policy, reference, batch, **op):
  """KTO / NPO. The reference always runs in the step: KTO's mismatched pairs depend on the batch."""
  s, _, s_ref = _policy_and_reference(policy, reference, batch, **op)
  return losses.UnpairedStats(policy=s, ref=s_ref, desirable=batch["label"])


def kto_reference_point(policy, reference, batch, **op):
  """KTO's z0 over the whole step [A, ...]: max(0, mean log-ratio of the mismatched completions `kl_*`), so that
  micro-batch losses sum exactly to the whole batch's (TRL takes it per micro-batch)."""

  def summed(micro):
    kl, _, kl_ref = _policy_and_reference(policy, reference, micro, prefix="kl_", **op)
    return jnp.sum(kl - kl_ref)

  count = batch["kl_input_ids"].shape[0] * batch["kl_input_ids"].shape[1]  # mismatched rows [A, B, T]
  mean = jnp.sum(jax.lax.map(summed, batch)) / count
  return {"z0": jax.lax.stop_gradient(jnp.maximum(0.0, mean))}


def unpaired_counts(batch):
  return {"num_examples": _examples(batch)}


# ----------------------------------------------------------------------------------- reward models


def _rewards(model, batch):
  """The scalar head at each sequence's last token [E...] (padded or packed)."""
  flat = rows(batch)
  values = model(flat["input_ids"], segment_ids=flat["segment_ids"])  # [R, T]
  return sequence_sums(values, losses.segment_ends(flat["segment_ids"]), batch)[0]


def reward_pair_stats(model, reference, batch, **op):
  del reference, op
  r = _rewards(model, batch)  # [B, 2]
  return losses.RewardPair(chosen=r[:, 0], rejected=r[:, 1], margin=batch.get("margin"))


def reward_list_stats(model, reference, batch, **op):
  del reference, op
  return losses.RewardList(rewards=_rewards(model, batch), labels=batch["scores"])


OFFLINE_ALGORITHMS = ("sft", "reward", "preference")
_BY_INPUT = {  # how each input type is computed from a batch: (stats, step counts)
  losses.PairStats: (pair_stats, pair_counts),
  losses.ListStats: (list_stats, list_counts),
  losses.UnpairedStats: (unpaired_stats, unpaired_counts),
  losses.RewardPair: (reward_pair_stats, pair_counts),
  losses.RewardList: (reward_list_stats, list_counts),
}


def objective_for(algorithm: str, loss_name: str, params: dict | None = None,
                  ld_alpha: float | None = None, wpo: bool = False) -> Objective:
  """The Objective of `algorithm` (sft | reward | preference) trained with registered loss `loss_name` and
  `params` (`loss.params`); what it needs (data format, reference, statistics) comes from the loss's
  registration (`losses.spec`). ld_alpha: LD-DPO's length-desensitised sums for a pairwise policy loss; wpo:
  WPO's weighted pairs (`weighted_pair_loss`) for one that sums over pairs."""
  spec = losses.spec(loss_name)
  if algorithm == "sft" and (ld_alpha is not None or wpo):
    raise ValueError("loss.ld_alpha (LD-DPO) and loss.wpo (WPO) apply to pairwise preference losses, not "
                     "algorithm=sft")
  if algorithm == "sft":
    if spec.data_format != "sft":
      raise ValueError(f"loss.name={loss_name!r} is not an SFT loss; choose sft")
    return Objective(loss_name, "sft", False, False, sft_stats, sft_counts)
  if algorithm not in ("reward", "preference"):
    raise ValueError(f"algorithm={algorithm!r}; choose one of sft, reward, preference")
  if spec.reward_model != (algorithm == "reward") or spec.inputs not in _BY_INPUT:
    kind = "reward-model" if algorithm == "reward" else "offline preference"
    choices = [n for n in losses.available() if (s := losses.spec(n)).inputs in _BY_INPUT
               and s.reward_model == (algorithm == "reward")]
    raise ValueError(f"loss.name={loss_name!r} is not a{'n' * (kind[0] == 'o')} {kind} loss (it takes "
                     f"{spec.inputs.__name__}); choose one of {', '.join(choices)}")
  stats, counts = _BY_INPUT[spec.inputs]
  if "prompt_chosen" in spec.reads(params or {}):
    stats = functools.partial(stats, prompt=True)
  response_pairs = (spec.inputs is losses.PairStats and not spec.reward_model
                    and "prompt_chosen" not in spec.reads(params or {}))
  if ld_alpha is not None:
    if not response_pairs:
      raise ValueError(f"loss.ld_alpha (LD-DPO) applies to pairwise policy losses on the response tokens; "
                       f"loss '{loss_name}' is not one")
    stats = functools.partial(stats, ld_alpha=ld_alpha)
  if wpo:
    if not response_pairs:
      raise ValueError(f"loss.wpo (WPO) weighs each pair's term of a pairwise policy loss on the response tokens; "
                       f"loss '{loss_name}' is not one")
    if not spec.exact_accumulation:
      raise ValueError(f"loss.wpo (WPO) needs a loss that is a sum of per-pair terms; '{loss_name}' sorts the batch")
    stats = functools.partial(stats, wpo=True)
  prepass = kto_reference_point if "z0" in spec.step_inputs else None
  return Objective(loss_name, spec.data_format, spec.reward_model, spec.uses_reference(params or {}),
                   stats, counts, prepass, spec.running)
