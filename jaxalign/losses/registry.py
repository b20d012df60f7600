"""Name -> loss function registry: `get(name)`, `available()`, `input_type(name)`.

One line per loss: (function, the input NamedTuple it takes). A research variant is one function
plus one line here (or one `register` call from user code).
"""

import inspect
import types
import typing
from typing import Callable

from jaxalign.losses import distribution, dpo, fdpo, grpo, kto, listwise, margin, pointwise, ppo
from jaxalign.losses import reference_free, reinforce, reward, sft
from jaxalign.losses.stats import ListStats, PairStats, RewardList, RewardPair, TokenBatch
from jaxalign.losses.stats import UnpairedStats

LossFn = Callable[..., tuple]

_REGISTRY: dict[str, tuple[LossFn, type]] = {
    # supervised and reward models
    "sft": (sft.sft_loss, TokenBatch),
    "bradley_terry": (reward.bradley_terry_loss, RewardPair),
    "thurstone": (reward.thurstone_loss, RewardPair),
    "rm_all_pairs": (reward.all_pairs_ranking_loss, RewardList),
    "rm_plackett_luce": (reward.plackett_luce_ranking_loss, RewardList),
    # policy-gradient losses (advantages from jaxalign.losses.advantages)
    "ppo": (ppo.ppo_loss, TokenBatch),
    "reinforce_pp": (ppo.reinforce_pp_loss, TokenBatch),
    "grpo": (grpo.grpo_loss, TokenBatch),
    "dr_grpo": (grpo.dr_grpo_loss, TokenBatch),
    "dapo": (grpo.dapo_loss, TokenBatch),
    "gspo": (grpo.gspo_loss, TokenBatch),
    "gspo_token": (grpo.gspo_token_loss, TokenBatch),
    "cispo": (grpo.cispo_loss, TokenBatch),
    "reinforce": (reinforce.reinforce_loss, TokenBatch),
    "rloo": (reinforce.rloo_loss, TokenBatch),
    # direct pairwise objectives
    "dpo": (dpo.dpo_loss, PairStats),
    "cdpo": (dpo.cdpo_loss, PairStats),
    "robust_dpo": (dpo.robust_dpo_loss, PairStats),
    "rdpo": (dpo.rdpo_loss, PairStats),
    "dpop": (dpo.dpop_loss, PairStats),
    "rpo": (dpo.rpo_loss, PairStats),
    "ipo": (margin.ipo_loss, PairStats),
    "hinge": (margin.hinge_loss, PairStats),
    "slic": (margin.slic_loss, PairStats),
    "f_dpo": (fdpo.f_dpo_loss, PairStats),
    "nca": (pointwise.nca_loss, PairStats),
    "bco": (pointwise.bco_loss, PairStats),
    "cpo": (reference_free.cpo_loss, PairStats),
    "simpo": (reference_free.simpo_loss, PairStats),
    "orpo": (reference_free.orpo_loss, PairStats),
    # unpaired and listwise
    "kto": (kto.kto_loss, UnpairedStats),
    "npo": (pointwise.npo_loss, UnpairedStats),
    "dpo_pl": (listwise.dpo_pl_loss, ListStats),
    "lipo_lambda": (listwise.lipo_lambda_loss, ListStats),
    # distribution learning (Yun et al.)
    "pmle": (distribution.pmle_loss, PairStats),
    "preference_distillation": (distribution.preference_distillation_loss, PairStats),
    "rkl": (distribution.rkl_loss, TokenBatch),
}


def available() -> list[str]:
  """Sorted names of all registered losses."""
  return sorted(_REGISTRY)


def _entry(name: str) -> tuple[LossFn, type]:
  if name not in _REGISTRY:
    raise KeyError(f"unknown loss '{name}'; available: {', '.join(available())}")
  return _REGISTRY[name]


def get(name: str) -> LossFn:
  """The loss function registered under `name`: fn(batch, **hparams) -> (loss, metrics)."""
  return _entry(name)[0]


def input_type(name: str) -> type:
  """The input NamedTuple (PairStats, TokenBatch, ...) that the loss `name` takes."""
  return _entry(name)[1]


_SETTABLE = (float, int, str, bool)


def hyperparameters(name: str) -> dict[str, object]:
  """{parameter: type hint} of the keyword hyper-parameters a config may set for loss `name` (`loss.params`):
  numbers, strings and flags, and any unannotated parameter (a user's registered loss). Step counts and array
  inputs (annotated as arrays) are not among them."""
  fn = get(name)
  hints = typing.get_type_hints(fn)
  out = {}
  for param in list(inspect.signature(fn).parameters.values())[1:]:
    if param.kind is param.VAR_KEYWORD:
      continue
    if param.annotation is param.empty:
      out[param.name] = typing.Any
      continue
    hint = hints[param.name]
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if all(o in _SETTABLE or o is type(None) for o in options):
      out[param.name] = hint
  return out


def register(name: str, fn: LossFn, inputs: type, *, overwrite: bool = False) -> LossFn:
  """Adds a loss at run time (e.g. from a notebook); returns `fn` so it can decorate."""
  if name in _REGISTRY and not overwrite:
    raise ValueError(f"loss '{name}' is already registered; pass overwrite=True to replace it")
  _REGISTRY[name] = (fn, inputs)
  return fn
