"""Step timing callback shared by the peer scripts (they run in the peer's own virtual environment)."""

import time

from transformers import TrainerCallback


class StepTimer(TrainerCallback):
  """Wall time of every optimiser step."""

  def __init__(self):
    self.times, self.start = [], None

  def on_step_begin(self, args, state, control, **kwargs):
    self.start = time.perf_counter()

  def on_step_end(self, args, state, control, **kwargs):
    self.times.append(time.perf_counter() - self.start)
