"""Every leaf of the train state and of the frozen trees lives in its parameter's rule-given sharding.

Checked through per-device bytes (`addressable_shards[0]`), against sizes computed here from the model's
logical axes and the rules table: parameters, LoRA adapters, Adam moments (which a plain `jax.jit(tx.init)`
replicates), the frozen reference / LoRA base / reward model (held in the bf16 compute dtype), after a
jitted step and after an orbax restore.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import sharding
from jaxalign.algorithms.step import OptimConfig
from jaxalign.checkpoint import Checkpointer
from jaxalign.config import ConfigError
from jaxalign.models import CausalLM, ScalarModel, save_hf
from jaxalign.trainer import build_run, put_batch, stack_micro_batches

MESH = {"mesh__data": 2, "mesh__fsdp": 2, "mesh__tensor": 2}
DPO = {"algorithm": "preference", "loss__name": "dpo", "data__format": "preference"}


def bf16_compute(cfg):
  """float32 parameters, bfloat16 compute. (A `model__dtype=` override of the `stage` fixture would write into
  its shared TINY_MODEL dict and leak into later tests.)"""
  return dataclasses.replace(cfg, model=cfg.model.replace(param_dtype="float32", dtype="bfloat16"))


def _key(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def logical_axes(model_cls, model_config) -> dict[tuple[str, ...], tuple]:
  """{parameter path: logical axis names}, read from the abstract model."""
  abstract = nnx.eval_shape(lambda: model_cls(model_config, rngs=nnx.Rngs(0)))
  return {tuple(map(str, path)): var.get_metadata()["logical_axes"]
          for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def shard_bytes(shape, names, dtype, mesh, rules) -> int:
  """Per-device bytes of an array whose axes have logical `names`: each dimension divided by the sizes of the
  mesh axes the rules table gives its name (this test's shapes divide evenly, and no mesh axis repeats)."""
  table, used, size = dict(rules), [], math.prod(shape)
  for name, dim in zip(names, shape, strict=True):
    axes = table.get(name) or ()
    for axis in (axes,) if isinstance(axes, str) else axes:
      assert dim % mesh.shape[axis] == 0 and axis not in used, (shape, names)
      used.append(axis)
      size //= mesh.shape[axis]
  return size * jnp.dtype(dtype).itemsize


def check_tree(tree, names_of, mesh, rules, dtype=None) -> int:
  """Assert every leaf's per-device bytes; `names_of(path)` gives its logical names (None: a replicated
  scalar). Returns how many leaves were sharded parameters (so a check cannot pass vacuously)."""
  sharded = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    path = tuple(_key(p) for p in path)
    names = names_of(path)
    got = leaf.addressable_shards[0].data.nbytes
    if names is None:
      assert leaf.sharding.is_fully_replicated and got == leaf.nbytes, path
      continue
    if dtype is not None:  # frozen trees narrow matrices only; vectors (norms, biases) stay float32
      assert leaf.dtype == (dtype if leaf.ndim > 1 else jnp.float32), (path, leaf.dtype)
    assert got == shard_bytes(leaf.shape, names, leaf.dtype, mesh, rules), (path, leaf.sharding.spec)
    sharded += 1
  return sharded


def moment_names(param_names):
  """Logical names of an optimiser-state leaf: its parameter's for mu / nu, None for counts and flags."""

  def names_of(path):
    for i, key in enumerate(path):
      if key in ("mu", "nu"):
        return param_names(path[i + 1:])
    return None

  return names_of


def check_state(run, param_names, trainable_dtype=jnp.float32):
  mesh, rules = run.mesh, run.cfg.mesh.rules
  params = check_tree(run.state.trainable, param_names, mesh, rules, trainable_dtype)
  moments = check_tree(run.state.opt_state, moment_names(param_names), mesh, rules)
  assert params > 0 and moments == 2 * params
  check_tree((run.state.step, run.state.rng), lambda _: None, mesh, rules)


def first_moment_dtypes(opt_state) -> dict[str, set]:
  dtypes = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    for moment in {"mu", "nu"} & {_key(p) for p in path}:
      dtypes.setdefault(moment, set()).add(jnp.dtype(leaf.dtype))
  return dtypes


def test_dpo_state_is_sharded_at_creation_after_a_restore_and_after_a_jitted_step(stage, tmp_path):
  run = build_run(bf16_compute(stage(**DPO, **MESH)))
  axes = logical_axes(CausalLM, run.model_config)
  check_state(run, axes.__getitem__)
  assert check_tree(run.frozen["reference"], axes.__getitem__, run.mesh, run.cfg.mesh.rules, jnp.bfloat16) > 0

  ckpt = Checkpointer(tmp_path / "ckpt")  # as trainer.train resumes: restore into run.state
  ckpt.save(1, run.state, {"data": {}}, force=True)
  run.state, _ = ckpt.restore(run.state)
  ckpt.close()
  check_state(run, axes.__getitem__)

  state_shardings = jax.tree.map(lambda x: x.sharding, run.state)  # as trainer.train jits the step
  step = jax.jit(run.train_fn, out_shardings=(state_shardings, None), donate_argnums=0)
  batch = put_batch(stack_micro_batches([next(run.train_data)]), run.mesh, run.cfg.mesh.rules, 1)
  with sharding.use_mesh(run.mesh, run.cfg.mesh.rules):
    run.state, metrics = step(run.state, batch, run.frozen)  # the reference runs on bf16 weights
  assert np.isfinite(float(metrics["loss"])) and int(run.state.step) == 1
  check_state(run, axes.__getitem__)


def test_lora_adapters_and_moments_are_sharded_and_the_base_is_bf16(stage):
  run = build_run(bf16_compute(stage(algorithm="sft", loss__name="sft", lora__rank=4, **MESH)))
  axes = logical_axes(CausalLM, run.model_config)

  def adapter_names(path):  # A [in, r] keeps the kernel's input axis, B [r, out] its output axis
    module, which = path
    kernel = axes[tuple(module.split("/")) + ("kernel",)]
    return (kernel[0], None) if which == "a" else (None, kernel[1])

  check_state(run, adapter_names)
  assert check_tree(run.frozen["base"], axes.__getitem__, run.mesh, run.cfg.mesh.rules, jnp.bfloat16) > 0
  assert "reference" not in run.frozen


PPO = {"algorithm": "ppo", "data__format": "prompt", "data__train": ["synthetic:max"], "data__max_length": 20,
       "data__max_prompt_length": 12, "rl__group_size": 2, "rl__max_new_tokens": 3, "rl__kl_coef": 0.05}


def check_ppo(run, frozen_dtype):
  policy, critic = logical_axes(CausalLM, run.model_config), logical_axes(ScalarModel, run.model_config)
  check_state(run, lambda path: (policy if path[0] == "policy" else critic)[path[1:]])
  assert check_tree(run.frozen["reference"], policy.__getitem__, run.mesh, run.cfg.mesh.rules, frozen_dtype) > 0
  return critic


def test_ppo_critic_from_the_backbone_and_bf16_first_moments(stage):
  run = build_run(stage(**PPO, optim__mu_dtype="bfloat16", **MESH))
  check_ppo(run, jnp.float32)  # float32 compute: the reference stays float32
  assert first_moment_dtypes(run.state.opt_state) == {"mu": {jnp.dtype(jnp.bfloat16)}, "nu": {jnp.dtype(jnp.float32)}}
  assert "reward_model" not in run.frozen


def test_ppo_critic_from_a_reward_model_held_in_bf16(stage, tmp_path):
  cfg = stage(**PPO)
  save_hf(ScalarModel(cfg.model, rngs=nnx.Rngs(5)), cfg.model, tmp_path / "rm")
  run = build_run(bf16_compute(stage(**PPO, rl__reward_model=str(tmp_path / "rm"), rl__rewards={}, **MESH)))
  critic = check_ppo(run, jnp.bfloat16)
  assert first_moment_dtypes(run.state.opt_state) == {"mu": {jnp.dtype(jnp.float32)}, "nu": {jnp.dtype(jnp.float32)}}
  assert check_tree(run.frozen["reward_model"], critic.__getitem__, run.mesh, run.cfg.mesh.rules, jnp.bfloat16) > 0
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: ScalarModel(run.model_config, rngs=nnx.Rngs(0))))
  values = nnx.merge(graphdef, run.frozen["reward_model"])(jnp.ones((2, 5), jnp.int32),
                                                           segment_ids=jnp.ones((2, 5), jnp.int32))
  assert values.shape == (2, 5) and np.all(np.isfinite(np.asarray(values, np.float32)))  # bf16 weights run


def test_mu_dtype_is_validated(stage):
  with pytest.raises(ValueError, match=r"optim\.mu_dtype='float16'"):
    OptimConfig(mu_dtype="float16")
  with pytest.raises(ConfigError, match=r"optim\.mu_dtype"):
    stage(optim__mu_dtype="int8")


def test_bf16_reference_gives_the_policys_log_probs_at_step_zero(stage):
  """float32 master policy vs its bf16-held reference: same weights in the compute dtype, so the DPO margin
  starts at exactly 0 (an LM head kept in float32 for the policy alone would offset every log-prob)."""
  run = build_run(bf16_compute(stage(**DPO, **MESH)))
  batch = put_batch(next(run.train_data), run.mesh, run.cfg.mesh.rules, 0)
  with sharding.use_mesh(run.mesh, run.cfg.mesh.rules):
    stats = jax.jit(run.fns.stats)(run.state.trainable, run.frozen, batch)
  np.testing.assert_array_equal(stats.policy_chosen, stats.ref_chosen)
  np.testing.assert_array_equal(stats.policy_rejected, stats.ref_rejected)
  assert float(jnp.abs(stats.policy_chosen).min()) > 0
