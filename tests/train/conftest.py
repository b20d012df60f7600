"""Tiny stage configs for training tests."""

import pytest

from jaxalign.config import TrainConfig, from_dict, set_key

# One device unless a test asks for a mesh: tests of sharding say `mesh__...` (tests/train/test_loop.py checks that
# one and eight devices train alike), and every other test compiles and runs in half the time.
# remat "none": at this size rematerialisation only adds recompute (tests/models/test_layer_stack.py checks
# that every policy gives the same gradients; the default-recipe CLI test runs the default, "full").
TINY_MODEL = {"vocab_size": 24, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
              "num_kv_heads": 2, "max_position_embeddings": 32, "remat": "none"}


def tiny_stage(tmp_path, **overrides) -> TrainConfig:
  base = {
    "model": dict(TINY_MODEL), "tokenizer": "builtin:digits", "steps": 4, "run_dir": str(tmp_path / "run"),
    "data": {"train": ["synthetic:sort"], "max_length": 32, "max_prompt_length": 16, "batch_size": 8,
             "synthetic_size": [64, 16], "format": "sft"},
    "optim": {"lr": 3e-3}, "log": {"every": 1, "progress": False, "tensorboard": False},
    "checkpoint": {"export_hf": False}, "eval_batches": 2,
    "mesh": {"fsdp": 1},  # one device: the mesh tests ask for eight (a mesh of 8 fake devices doubles compile time)
  }
  for key, value in overrides.items():
    set_key(base, key.replace("__", "."), value)
  return from_dict(TrainConfig, base)


@pytest.fixture
def stage(tmp_path):
  return lambda **kw: tiny_stage(tmp_path, **kw)
