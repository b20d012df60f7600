"""Swapped data must lose: every direct offline pairwise loss, trained on the synthetic pairs as the data says
(chosen preferred), ranks the held-out chosen answers above the rejected ones better than the same run
trained on the same batches with chosen and rejected swapped.

A loss that silently ignores or inverts the orientation of a pair (a sign error, chosen / rejected read the
wrong way round in a batch layout, a symmetric objective) trains the same way on both and fails here, while
"the loss goes down" would still pass. The correctly oriented run also checks that: the held-out loss falls
and every parameter array moves (tests/train/test_objectives.py does the same for the other offline losses).
"""

import jax
import numpy as np
import pytest

from jaxalign import losses
from jaxalign.algorithms.step import make_eval_step, make_train_step
from jaxalign.data.batching import ROW_KEYS
from jaxalign.trainer import build_run, put_batch, stack_micro_batches

# Every registered loss on preference pairs (PairStats). preference_distillation builds: the synthetic pairs
# carry graded scores (`scores` [B, 2]) that it reads as soft labels.
PAIRWISE = sorted(n for n in losses.available() if losses.input_type(n) is losses.PairStats)
STEPS = 16
LR = 1e-2
# DiscoPOP at TRL's tau = 0.05 is pushed towards y_l from a zero margin (its docstring: a local minimum at
# z = -0.119); at tau = 0.2 the blend has no such bump.
PARAMS = {"discopop": {"tau": 0.2}}


def swap_pairs(batch: dict) -> dict:
  """The same preference batch with chosen and rejected exchanged (the data now says the near miss is better).

  Padded ([B, 2, T], also the shared-prompt layout, whose `prompt_mask` [B, P] both responses share) swaps the
  response axis of the rows; packed rows stay where they are and `pack_row` / `pack_segment` [B, 2] swap
  which of them is chosen. A precomputed reference (`ref_logps` [B, 2]) follows its response. `scores` [B, 2]
  stay by position: position 0 keeps the higher score, now attached to the near miss, so for preference
  distillation (whose preference is the score, not the position) the data also says the opposite.
  """
  out = dict(batch)
  per_response = ["ref_logps"] + (["pack_row", "pack_segment"] if "pack_row" in batch else list(ROW_KEYS))
  for key in per_response:
    if key in batch:
      assert batch[key].shape[1] == 2, (key, batch[key].shape)
      out[key] = batch[key][:, ::-1].copy()
  return out


class Swapped:
  """A training iterator whose every batch has chosen and rejected swapped."""

  def __init__(self, batches):
    self.batches = batches

  def __iter__(self):
    return self

  def __next__(self):
    return swap_pairs(next(self.batches))


def train_and_evaluate(run, train_step, eval_step, data, held_out):
  """Trains STEPS updates from the run's initial state on `data`: (mean eval metrics over `held_out`, the
  trained state)."""
  cfg, state = run.cfg, run.state
  for _ in range(STEPS):
    micro = stack_micro_batches([next(data) for _ in range(cfg.optim.grad_accum)])
    state, metrics = train_step(state, put_batch(micro, run.mesh, cfg.mesh.rules, 1), run.frozen)
    assert np.isfinite(float(metrics["loss"]))
  return evaluate(state, eval_step, run.frozen, held_out), state


def evaluate(state, eval_step, frozen, held_out):
  rows = [jax.device_get(eval_step(state, b, frozen)) for b in held_out]
  # chosen_nll (an SFT term on the chosen side, a mixture ingredient) has no implicit reward: no accuracy.
  keys = [k for k in ("loss", "rewards/accuracies", "policy_prefers_chosen") if k in rows[0]]
  return {k: float(np.mean([r[k] for r in rows])) for k in keys}


@pytest.mark.parametrize("loss_name", PAIRWISE)
def test_swapped_preferences_lose_on_held_out_pairs(stage, loss_name):
  cfg = stage(algorithm="preference", loss__name=loss_name, loss__params=PARAMS.get(loss_name, {}),
              data__format="preference", optim__lr=LR, optim__schedule="constant", data__synthetic_size=[64, 32],
              mesh__fsdp=1)
  run = build_run(cfg)
  train_step = jax.jit(make_train_step(run.fns))  # compiled once, used by both runs
  eval_step = jax.jit(make_eval_step(run.fns))
  held_out = [put_batch(b, run.mesh, cfg.mesh.rules, 0) for b in run.eval_data.epoch_batches()]  # unswapped

  # The swap really happens: the first swapped batch's chosen rows are the original batch's rejected rows.
  first = next(run.train_data)
  run.train_data.restore({"epoch": 0, "index": 0})
  swapped = next(Swapped(run.train_data))
  run.train_data.restore({"epoch": 0, "index": 0})
  if "pack_row" in first:
    np.testing.assert_array_equal(swapped["pack_row"][:, 0], first["pack_row"][:, 1])
    np.testing.assert_array_equal(swapped["pack_segment"][:, 0], first["pack_segment"][:, 1])
  else:
    np.testing.assert_array_equal(swapped["input_ids"][:, 0], first["input_ids"][:, 1])
    np.testing.assert_array_equal(swapped["input_ids"][:, 1], first["input_ids"][:, 0])
    assert not np.array_equal(swapped["input_ids"], first["input_ids"])

  before = evaluate(run.state, eval_step, run.frozen, held_out)
  start = [np.asarray(x) for x in jax.tree.leaves(run.state.trainable)]
  oriented, trained = train_and_evaluate(run, train_step, eval_step, run.train_data, held_out)
  assert oriented["loss"] < before["loss"], (before, oriented)
  moved = [not np.allclose(a, np.asarray(b)) for a, b in zip(start, jax.tree.leaves(trained.trainable))]
  assert all(moved), f"{moved.count(False)} parameter arrays did not change"
  run.train_data.restore({"epoch": 0, "index": 0})  # the same batches, in the same order, swapped
  inverted, _ = train_and_evaluate(run, train_step, eval_step, Swapped(run.train_data), held_out)
  assert "policy_prefers_chosen" in oriented
  for key in set(oriented) - {"loss"}:
    assert oriented[key] > inverted[key], (key, oriented, inverted)
