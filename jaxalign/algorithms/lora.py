"""LoRA (Hu et al. 2021, arXiv:2106.09685) as a pure function of parameter trees.

W' = W + (alpha / r) * A @ B on the chosen projections; A starts random, B at zero, so training
starts from the base model. The base weights stay frozen and untouched, so the base model *is* the
reference policy (no second copy of the weights), and `merge` gives the exported model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxalign.config import LoraConfig


def _adapted(path: tuple, cfg: LoraConfig) -> bool:
  return len(path) >= 2 and path[-1] == "kernel" and str(path[-2]) in cfg.targets


def _name(path: tuple) -> str:
  return "/".join(str(p) for p in path[:-1])


def init_adapters(params: dict, cfg: LoraConfig, key: jax.Array) -> dict:
  """{module path: {"a": [..., in, r], "b": [..., r, out]}} for every targeted kernel of a pure param dict
  (B = 0). A kernel stacked over layers ([L, in, out], scan_layers) gets stacked adapters [L, in, r], drawn
  from one key per kernel: the same seed gives different initial A's in the two layouts."""
  targets = [(p, v) for p, v in traverse_util.flatten_dict(params).items() if _adapted(p, cfg)]
  if not targets:
    raise ValueError(f"lora.targets {cfg.targets} match no projection of the model")
  adapters = {}
  for (path, kernel), k in zip(targets, jax.random.split(key, len(targets))):
    *lead, fan_in, fan_out = kernel.shape
    a = jax.random.normal(k, (*lead, fan_in, cfg.rank), jnp.float32) / jnp.sqrt(fan_in)
    adapters[_name(path)] = {"a": a, "b": jnp.zeros((*lead, cfg.rank, fan_out), jnp.float32)}
  return adapters


def adapter_shardings(param_shardings: dict, cfg: LoraConfig) -> dict:
  """Adapter shardings from their kernels': A keeps the input axis' sharding, B the output axis' (and both
  the layer axis' of a stacked kernel)."""
  out = {}
  for path, sharding in traverse_util.flatten_dict(param_shardings).items():
    if _adapted(path, cfg):
      *lead, spec_in, spec_out = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
      out[_name(path)] = {"a": sharding.update(spec=jax.P(*lead, spec_in, None)),
                          "b": sharding.update(spec=jax.P(*lead, None, spec_out))}
  return out


def merge(params: dict, adapters: dict, cfg: LoraConfig, dtype=None) -> dict:
  """Base parameters with the adapters folded in (traceable: used in every training forward), adapted
  kernels in `dtype` (default: the base's; export asks for the master dtype of a compute-dtype base)."""
  flat = traverse_util.flatten_dict(params)
  for path, kernel in flat.items():
    adapter = adapters.get(_name(path)) if _adapted(path, cfg) else None
    if adapter is not None:
      delta = cfg.scale * (adapter["a"] @ adapter["b"])
      flat[path] = (kernel.astype(jnp.float32) + delta).astype(dtype or kernel.dtype)
  return traverse_util.unflatten_dict(flat)
