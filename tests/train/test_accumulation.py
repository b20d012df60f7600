"""Exact gradient accumulation, on the loss and the full gradient themselves (before any optimiser step).

The train step (`jaxalign.algorithms.step.make_train_step`) takes the step-level inputs of the whole stacked
batch [A, B, ...] (counts, and the statistics that need a pass over all of it, such as KTO's reference point),
then sums `value_and_grad(StepFns.micro_loss)` over its A micro-batches. Here that step, run with an optimiser
that returns the gradient instead of applying it, must give for one loss of every family the same loss and
gradient on A micro-batches as on one micro-batch of the same A*B examples: the loss to rtol 1e-5 and every
gradient leaf to float32 accuracy (the model computes softmax, norms and logits in float32, so no float64 run).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalign.algorithms.step import make_eval_step, make_train_step
from jaxalign.trainer import build_run, put_batch, stack_micro_batches

MICRO = 4  # micro-batches per step
PARAMS = {"orpo": {"nll_tokens": "prompt_and_completion"}}  # TRL's ORPO NLL: prompt tokens counted over the step
# One loss per family: (algorithm, loss, data.format, micro-batch size).
FAMILIES = [
  ("sft", "sft", "sft", 2),  # token-normalised NLL
  ("preference", "dpo", "preference", 2),  # pairwise, mean over pairs, with a reference
  ("preference", "cpo", "preference", 2),  # pairwise + token-mean NLL of the chosen
  ("preference", "orpo", "preference", 2),  # + the NLL on prompt and completion (loss.params below)
  ("preference", "kto", "unpaired", 2),  # unpaired, reference point z0 over the step
  ("preference", "dpo_pl", "ranked", 2),  # listwise (Plackett-Luce over ranked responses)
  ("reward", "bradley_terry", "preference", 2),  # reward model on pairs
  ("reward", "rm_plackett_luce", "ranked", 2),  # reward model on ranked lists
]


def capture_gradient() -> optax.GradientTransformation:
  """An "optimiser" that keeps the step's accumulated gradient as its state and changes no parameter."""
  return optax.GradientTransformation(init=lambda params: jax.tree.map(jnp.zeros_like, params),
                                      update=lambda grads, state, params=None: (
                                        jax.tree.map(jnp.zeros_like, grads), grads))


def summed_loss_and_grads(run, stacked):
  """(the step loss, the step gradient) of a stacked batch [A, ...] from the train step itself
  (`make_train_step`: step-level inputs of the whole batch, then the sum over its A micro-batches), with an
  optimiser that hands the gradient back instead of applying it."""
  tx = capture_gradient()
  fns = dataclasses.replace(run.fns, tx=tx)
  state = run.state._replace(opt_state=tx.init(run.state.trainable))  # run.state: already `moved_policy`
  state, metrics = jax.jit(make_train_step(fns))(state, put_batch(stacked, run.mesh, run.cfg.mesh.rules, 1),
                                                 run.frozen)
  return float(metrics["loss"]), jax.tree.map(np.asarray, state.opt_state)


def moved_policy(run, seed: int = 0):
  """The run's state with the trainable parameters moved off their initial values (and so off the reference
  copy): at initialisation every policy / reference log-ratio is zero and KTO's reference point is
  max(0, 0) = 0 in any batch, which would hide where it is computed."""
  rng = np.random.default_rng(seed)
  trainable = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(0.0, 0.1, x.shape), x.dtype), run.state.trainable)
  return run.state._replace(trainable=trainable)


def as_one_micro_batch(stacked: dict) -> dict:
  """[A, B, ...] micro-batches as one micro-batch [1, A*B, ...] of the same examples in the same order (each
  example keeps its rows, KTO's mismatched `kl_*` rows included)."""
  return {k: v.reshape(1, v.shape[0] * v.shape[1], *v.shape[2:]) for k, v in stacked.items()}


@pytest.mark.parametrize("algorithm,loss_name,fmt,size", FAMILIES, ids=[f[1] for f in FAMILIES])
def test_accumulated_loss_and_gradient_equal_one_large_batch(stage, algorithm, loss_name, fmt, size):
  cfg = stage(algorithm=algorithm, loss__name=loss_name, loss__params=PARAMS.get(loss_name, {}), data__format=fmt,
              data__batch_size=size, optim__grad_accum=MICRO, data__shuffle=False, mesh__fsdp=1)
  run = build_run(cfg)
  stacked = stack_micro_batches([next(run.train_data) for _ in range(MICRO)])
  assert "pack_row" not in stacked  # padded rows: the reshape below keeps every example whole
  big = as_one_micro_batch(stacked)
  run.state = moved_policy(run)
  if loss_name == "kto":  # the test can tell: the reference point differs between the micro-batches
    evaluate = jax.jit(make_eval_step(run.fns))
    z0 = [float(evaluate(run.state, put_batch({k: v[a] for k, v in stacked.items()}, run.mesh, cfg.mesh.rules, 0),
                         run.frozen)["kl"]) for a in range(MICRO)]
    assert max(z0) > 0 and len(set(z0)) > 1, z0

  loss_acc, grads_acc = summed_loss_and_grads(run, stacked)
  loss_big, grads_big = summed_loss_and_grads(run, big)

  np.testing.assert_allclose(loss_acc, loss_big, rtol=1e-5)
  flat_acc = jax.tree_util.tree_leaves_with_path(grads_acc)
  flat_big = jax.tree.leaves(grads_big)
  assert len(flat_acc) == len(flat_big) > 0
  assert any(np.abs(g).max() > 0 for g in flat_big)  # the comparison is not between zeros
  for (path, a), b in zip(flat_acc, flat_big):
    # float32: the two sums add the same terms in another order; atol covers leaves near zero.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(np.abs(b).max(), 1e-3),
                               err_msg=f"{loss_name}: gradient of {jax.tree_util.keystr(path)}")
