"""Weighted sums of registered losses: TRL's `loss_type=[...]` with `loss_weights` (e.g. MPO, Wang et al. 2024,
arXiv:2411.10442: 0.8 x sigmoid + 0.2 x bco_pair + 1.0 x sft).

A mixture is named by its formula, `"0.8*dpo + 0.2*bco + chosen_nll"` (a weight defaults to 1), wherever a loss
name goes (`loss.name`, `losses.get`, `losses.spec`). Its components share `loss.params` as in TRL (each takes
the parameters its signature names); its metrics are each component's, prefixed by its name, the first component's also unprefixed (TRL's
rewards/* and logps/*), and the loss.
Its registration is derived from theirs: one input type, the reference when any component reads it, every step
count and running mean they take, exact over micro-batches when all are.
"""

from __future__ import annotations

import inspect
import re

from jaxalign.losses.stats import finish

_TERM = re.compile(r"^\s*(?:([0-9.eE+-]+)\s*\*\s*)?([A-Za-z_][A-Za-z0-9_]*)\s*$")


def is_mixture(name: str) -> bool:
  return "+" in name or "*" in name


def parse(name: str) -> list[tuple[float, str]]:
  """[(weight, component name)] of a mixture formula; a one-line KeyError when it is malformed."""
  terms = []
  for term in name.split("+"):
    match = _TERM.match(term)
    if not match:
      raise KeyError(f"loss '{name}': term {term.strip()!r} is not 'weight*name' or 'name'")
    terms.append((float(match.group(1)) if match.group(1) else 1.0, match.group(2)))
  if len({n for _, n in terms}) < len(terms):
    raise KeyError(f"loss '{name}' names a component twice")
  return terms


def mixture_fn(terms: list[tuple[float, str, callable]]):
  """fn(batch, **kwargs) = sum_i w_i fn_i(batch, **the kwargs fn_i takes), metrics prefixed by component."""
  accepted = [set(inspect.signature(fn).parameters) for _, _, fn in terms]

  def mixed(batch, **kwargs):
    total, metrics = 0.0, {}
    for i, ((weight, name, fn), names) in enumerate(zip(terms, accepted)):
      loss, parts = fn(batch, **{k: v for k, v in kwargs.items() if k in names})
      total = total + weight * loss
      metrics.update({f"{name}/{k}": v for k, v in parts.items()})
      if i == 0:  # the first component's shared metrics (rewards/*, logps/*) also under their own names
        metrics.update({k: v for k, v in parts.items() if k != "loss"})
    return finish(total, metrics)

  parameters = {}
  for (_, _, fn) in terms:
    for p in list(inspect.signature(fn).parameters.values())[1:]:
      parameters.setdefault(p.name, p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
  batch = list(inspect.signature(terms[0][2]).parameters.values())[0]
  mixed.__signature__ = inspect.Signature([batch, *parameters.values()])
  return mixed
