"""Name -> loss registry: every loss's metadata, declared once where it is registered.

A `LossSpec` says what a trainer needs to know about a loss: the input NamedTuple it takes (and so the data
format and whether it trains a policy or a reward model), whether it reads a frozen reference, which step
counts it takes for exact accumulation, whether it accumulates exactly over micro-batches at all, and its
settable parameters with their defaults (read from the function's signature, so they cannot drift from it).
A research variant is one function plus one `register` call (from here or from user code).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from typing import Any, Callable

from jaxalign.losses import distribution, dpo, dpo_variants, fdpo, grpo, kto, listwise, margin, mixture, pointwise
from jaxalign.losses import ppo
from jaxalign.losses import reference_free, reinforce, reward, sft, soft_gates
from jaxalign.losses.stats import ListStats, PairStats, RewardList, RewardPair, TokenBatch
from jaxalign.losses.stats import UnpairedStats

LossFn = Callable[..., tuple]

# Step-level counts a loss may take (keyword arguments the trainer fills in, never `loss.params`).
STEP_COUNTS = ("num_tokens", "num_sequences", "num_pairs", "num_examples", "num_lists", "num_prompt_tokens")
# Step-level statistics a trainer computes with a forward pass over the whole step before the gradient pass.
STEP_STATISTICS = ("z0",)  # KTO's reference point
# How a loss uses a frozen reference model:
#   "required": reads reference log-probs (DPO; unless its `reference_free` parameter is set);
#   "none": never (SFT, reference-free losses, reward models; PPO-style losses get their KL through the reward);
#   "beta": when its `beta` parameter (a KL coefficient) is non-zero (the GRPO family).
REFERENCE_USES = ("required", "none", "beta")
_FORMATS = {PairStats: "preference", ListStats: "ranked", UnpairedStats: "unpaired", RewardPair: "preference",
            RewardList: "ranked", TokenBatch: "prompt"}
_SETTABLE = (float, int, str, bool)


@dataclasses.dataclass(frozen=True)
class Param:
  """One settable hyper-parameter: its type hint and default (`inspect.Parameter.empty` when required)."""

  hint: Any
  default: Any

  def describe(self, name: str) -> str:
    if self.default is inspect.Parameter.empty:
      return f"{name} (required)"
    return f"{name}={self.default!r}"


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """A registered loss and everything a trainer needs to know about it."""

  name: str
  fn: LossFn
  inputs: type  # PairStats, UnpairedStats, ListStats, RewardPair, RewardList or TokenBatch
  reference: str  # one of REFERENCE_USES
  data_format: str  # the data.format it trains on offline (sft, preference, ranked, unpaired; prompt: online)
  exact_accumulation: bool  # micro-batch losses (with the step counts) sum to the whole batch's loss
  counts: tuple[str, ...]  # the step counts its signature takes
  step_inputs: tuple[str, ...]  # the step statistics (STEP_STATISTICS) its signature takes
  params: dict[str, Param]  # settable hyper-parameters (`loss.params`)
  # Running means kept in the train state across steps: {loss argument: the metric whose mean over the steps so
  # far it receives} (BCO's delta, the running mean of its implicit rewards).
  running: dict[str, str] = dataclasses.field(default_factory=dict)
  # The optional input fields it reads as configured: reads(params) -> field names (ORPO's prompt NLL reads
  # `prompt_chosen`), so the trainer computes them only then.
  reads: Callable[[dict], tuple[str, ...]] = lambda params: ()

  @property
  def reward_model(self) -> bool:
    """Whether the loss trains a scalar reward head (else a policy's log-probs)."""
    return self.inputs in (RewardPair, RewardList)

  def uses_reference(self, params: dict) -> bool:
    """Whether a run with `loss.params` = `params` needs the frozen reference model."""
    if self.reference == "beta":
      beta = params.get("beta", self.params["beta"].default)
      return isinstance(beta, (int, float)) and float(beta) > 0
    return self.reference == "required" and not params.get("reference_free", False)

  def describe(self) -> str:
    """One line for `--help`: name, input, reference use and parameters with their defaults."""
    ref = {"required": "reference", "none": "no reference", "beta": "reference when beta > 0"}[self.reference]
    exact = "" if self.exact_accumulation else "; not exact over micro-batches"
    params = ", ".join(p.describe(k) for k, p in self.params.items()) or "no parameters"
    return f"  {self.name} [{self.inputs.__name__}; {ref}{exact}]: {params}"


def _settable(fn: LossFn) -> dict[str, Param]:
  """The keyword hyper-parameters a config may set: numbers, strings and flags, and any unannotated parameter
  (a user's loss). Step counts and array inputs (annotated as arrays) are not among them."""
  hints = typing.get_type_hints(fn)
  out = {}
  for param in list(inspect.signature(fn).parameters.values())[1:]:
    if param.kind is param.VAR_KEYWORD or param.name in STEP_COUNTS + STEP_STATISTICS:
      continue
    if param.annotation is param.empty:
      out[param.name] = Param(Any, param.default)
      continue
    hint = hints[param.name]
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if all(o in _SETTABLE or o is type(None) for o in options):
      out[param.name] = Param(hint, param.default)
  return out


_REGISTRY: dict[str, LossSpec] = {}


def register(name: str, fn: LossFn, inputs: type, *, reference: str, data_format: str | None = None,
             exact_accumulation: bool = True, running: dict[str, str] | None = None,
             reads: Callable[[dict], tuple[str, ...]] | None = None, overwrite: bool = False) -> LossFn:
  """Registers `fn` under `name` (also from a notebook); returns `fn`.

  Args:
    inputs: the NamedTuple `fn` takes as its only positional argument.
    reference: how it uses a frozen reference model, one of REFERENCE_USES ("beta" needs a `beta` parameter).
    data_format: the offline data format it trains on (default: from `inputs`).
    exact_accumulation: False when micro-batch losses do not sum to the whole batch's (batch-level sorting or
      quantiles); trainers then refuse gradient accumulation with it.
    running: {loss argument: metric}: the trainer passes the argument the running mean of the metric over the
      steps before this one, kept in the train state (so it survives a resume).
    reads: params -> the optional input fields the loss reads when so configured (computed only then).
  """
  if name in _REGISTRY and not overwrite:
    raise ValueError(f"loss '{name}' is already registered; pass overwrite=True to replace it")
  if inputs not in _FORMATS:
    raise ValueError(f"loss '{name}': inputs={inputs!r} is not one of {', '.join(t.__name__ for t in _FORMATS)}")
  if reference not in REFERENCE_USES:
    raise ValueError(f"loss '{name}': reference={reference!r}; choose one of {', '.join(REFERENCE_USES)}")
  params = _settable(fn)
  if reference == "beta" and "beta" not in params:
    raise ValueError(f"loss '{name}': reference='beta' needs a `beta` keyword parameter")
  accepted = inspect.signature(fn).parameters
  if missing := [k for k in running or {} if k not in accepted]:
    raise ValueError(f"loss '{name}': running={running} names arguments it does not take: {missing}")
  _REGISTRY[name] = LossSpec(name, fn, inputs, reference, data_format or _FORMATS[inputs], exact_accumulation,
                             tuple(c for c in STEP_COUNTS if c in accepted),
                             tuple(c for c in STEP_STATISTICS if c in accepted), params, dict(running or {}),
                             reads or (lambda params: ()))
  return fn


def _builtin() -> None:
  policy_gradient = {  # PPO-style losses take their KL through the reward; the GRPO family has a KL term
      "ppo": (ppo.ppo_loss, "none"), "reinforce_pp": (ppo.reinforce_pp_loss, "none"),
      "grpo": (grpo.grpo_loss, "beta"), "dr_grpo": (grpo.dr_grpo_loss, "beta"), "dapo": (grpo.dapo_loss, "beta"),
      "gspo": (grpo.gspo_loss, "beta"), "gspo_token": (grpo.gspo_token_loss, "beta"),
      "cispo": (grpo.cispo_loss, "beta"), "luspo": (grpo.luspo_loss, "beta"),
      "sapo": (soft_gates.sapo_loss, "beta"), "vespo": (soft_gates.vespo_loss, "beta"),
      "reinforce": (reinforce.reinforce_loss, "none"),
      "rloo": (reinforce.rloo_loss, "none"), "rkl": (distribution.rkl_loss, "none")}
  for name, (fn, ref) in policy_gradient.items():
    register(name, fn, TokenBatch, reference=ref)
  register("sft", sft.sft_loss, TokenBatch, reference="none", data_format="sft")
  register("dft", sft.dft_loss, TokenBatch, reference="none", data_format="sft")
  for name, fn, inputs in [
      ("bradley_terry", reward.bradley_terry_loss, RewardPair), ("thurstone", reward.thurstone_loss, RewardPair),
      ("rm_all_pairs", reward.all_pairs_ranking_loss, RewardList),
      ("rm_plackett_luce", reward.plackett_luce_ranking_loss, RewardList),
      # reference-free direct objectives
      ("cpo", reference_free.cpo_loss, PairStats), ("simpo", reference_free.simpo_loss, PairStats),
      ("slic", margin.slic_loss, PairStats), ("chosen_nll", dpo.chosen_nll_loss, PairStats),
      ("pmle", distribution.pmle_loss, PairStats), ("alphapo", reference_free.alphapo_loss, PairStats),
      ("preference_distillation", distribution.preference_distillation_loss, PairStats)]:
    register(name, fn, inputs, reference="none")
  for name, fn, inputs in [
      ("dpo", dpo.dpo_loss, PairStats), ("cdpo", dpo.cdpo_loss, PairStats),
      ("robust_dpo", dpo.robust_dpo_loss, PairStats), ("rdpo", dpo.rdpo_loss, PairStats),
      ("dpop", dpo.dpop_loss, PairStats), ("rpo", dpo.rpo_loss, PairStats), ("ipo", margin.ipo_loss, PairStats),
      ("hinge", margin.hinge_loss, PairStats), ("f_dpo", fdpo.f_dpo_loss, PairStats),
      ("nca", pointwise.nca_loss, PairStats), ("npo", pointwise.npo_loss, UnpairedStats),
      ("exo_pair", dpo_variants.exo_pair_loss, PairStats), ("sppo_hard", dpo_variants.sppo_hard_loss, PairStats),
      ("apo_zero", dpo_variants.apo_zero_loss, PairStats), ("apo_down", dpo_variants.apo_down_loss, PairStats),
      ("discopop", dpo_variants.discopop_loss, PairStats),
      ("sigmoid_norm", dpo_variants.sigmoid_norm_loss, PairStats),
      ("apo_zero_unpaired", kto.apo_zero_unpaired_loss, UnpairedStats),
      ("dpo_pl", listwise.dpo_pl_loss, ListStats), ("lipo_lambda", listwise.lipo_lambda_loss, ListStats)]:
    register(name, fn, inputs, reference="required")
  # ORPO's NLL on prompt and completion (TRL's convention) reads the prompt's log-probs
  register("orpo", reference_free.orpo_loss, PairStats, reference="none", reads=lambda params: (
      ("prompt_chosen",) if params.get("nll_tokens") == "prompt_and_completion" else ()))
  # AOT sorts the batch's log-ratios: its micro-batch losses do not sum to the batch's
  register("aot", dpo_variants.aot_loss, PairStats, reference="required", exact_accumulation=False)
  register("aot_unpaired", dpo_variants.aot_unpaired_loss, PairStats, reference="required", exact_accumulation=False)
  # BCO's delta: the running mean of its implicit rewards (Jung et al. 2024), one step behind
  register("bco", pointwise.bco_loss, PairStats, reference="required", running={"delta": "bco/reward_mean"})
  # KTO's reference point z0 is a batch mean, exact over micro-batches because the step computes it first
  register("kto", kto.kto_loss, UnpairedStats, reference="required")


_builtin()


def available() -> list[str]:
  """Sorted names of all registered losses."""
  return sorted(_REGISTRY)


def spec(name: str) -> LossSpec:
  """The registration of loss `name` (a registered name, or a mixture formula such as "0.8*dpo + 0.2*bco +
  chosen_nll": `losses.mixture`); a one-line KeyError listing the names when there is none."""
  if mixture.is_mixture(name):
    return _mixture_spec(name)
  if name not in _REGISTRY:
    raise KeyError(f"unknown loss '{name}'; available: {', '.join(available())}")
  return _REGISTRY[name]


@functools.lru_cache(maxsize=64)
def _mixture_spec(name: str) -> LossSpec:
  """A weighted sum of registered losses, its registration derived from theirs (`losses.mixture`)."""
  terms = [(weight, component, spec(component)) for weight, component in mixture.parse(name)]
  specs = [s for _, _, s in terms]
  if len({s.inputs for s in specs}) > 1 or len({s.data_format for s in specs}) > 1:
    raise KeyError(f"loss '{name}': its components take different inputs "
                   f"({', '.join(f'{s.name}: {s.inputs.__name__}' for s in specs)})")
  uses = {s.reference for s in specs}
  reference = "required" if "required" in uses else "beta" if "beta" in uses else "none"
  params = {}
  for s in specs:
    for key, param in s.params.items():
      params.setdefault(key, param)
  fn = mixture.mixture_fn([(w, c, s.fn) for w, c, s in terms])
  return LossSpec(name, fn, specs[0].inputs, reference, specs[0].data_format, all(s.exact_accumulation for s in specs),
                  tuple(c for c in STEP_COUNTS if any(c in s.counts for s in specs)),
                  tuple(c for c in STEP_STATISTICS if any(c in s.step_inputs for s in specs)), params,
                  {arg: f"{s.name}/{metric}" for s in specs for arg, metric in s.running.items()},
                  lambda p: tuple(f for s in specs for f in s.reads(p)))


def get(name: str) -> LossFn:
  """The loss function registered under `name`: fn(batch, **hparams) -> (loss, metrics)."""
  return spec(name).fn


def input_type(name: str) -> type:
  """The input NamedTuple (PairStats, TokenBatch, ...) that the loss `name` takes."""
  return spec(name).inputs


def hyperparameters(name: str) -> dict[str, object]:
  """{parameter: type hint} of the hyper-parameters a config may set for loss `name` (`loss.params`)."""
  return {k: p.hint for k, p in spec(name).params.items()}


def help_lines() -> list[str]:
  """Every loss with its input, reference use and parameters (the trainer's `--help`)."""
  return [_REGISTRY[name].describe() for name in available()]
