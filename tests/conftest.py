"""Test set-up: 8 fake CPU devices (for mesh tests), float32 matmuls everywhere, and a compilation cache
shared by the test workers: many tests compile the same tiny programs (the same step built anew by each
`train()`), and XLA compiles each once per session instead of once per test. Results do not change."""

import os
import pathlib

import jax

# Must run before jax touches a device: gives every test process 8 CPU devices for mesh tests.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "float32")
_CACHE = os.environ.get("JAXALIGN_TEST_JAX_CACHE", pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache/jax")
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  """The shared real-data folder (HH-RLHF, GSM8K, tokenizers): $JAXALIGN_DATA or ../shared/data."""
  default = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
  path = pathlib.Path(os.environ.get("JAXALIGN_DATA", default))
  if not path.is_dir():
    raise FileNotFoundError(f"shared data folder {path} not found; set JAXALIGN_DATA")
  return path
