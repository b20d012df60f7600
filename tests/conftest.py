"""Test set-up: 8 fake CPU devices (for mesh tests) and float32 matmuls everywhere."""

import os
import pathlib

import jax

# Must run before jax touches a device: gives every test process 8 CPU devices for mesh tests.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "float32")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  """The shared real-data folder (HH-RLHF, GSM8K, tokenizers): $JAXALIGN_DATA or ../shared/data."""
  default = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
  path = pathlib.Path(os.environ.get("JAXALIGN_DATA", default))
  if not path.is_dir():
    raise FileNotFoundError(f"shared data folder {path} not found; set JAXALIGN_DATA")
  return path
