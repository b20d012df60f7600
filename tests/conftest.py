"""Test set-up: 8 fake CPU devices (for mesh tests), float32 matmuls everywhere, a compilation cache shared by
the test workers (many tests compile the same tiny programs: the same step built anew by each `train()`, and XLA
compiles each once per session instead of once per test), and XLA:CPU's quick code generation (LLVM at -O0
without its expensive passes). The suite is bound by compile time, not run time: the last two halve it.
Results do not change (tolerances are float32 ones)."""

import os
import pathlib

# Before jax starts its CPU backend; inherited by the subprocesses tests launch. The user's flags come last (win).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{FAST_COMPILE} {os.environ.get('XLA_FLAGS', '')}".strip()

import jax  # noqa: E402

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
