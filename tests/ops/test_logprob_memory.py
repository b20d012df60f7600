"""Compiled temporary memory of forward + backward: chunked XLA path vs naive (compile only)."""

import jax
import jax.numpy as jnp
import pytest

from jaxalign.ops import token_logprobs

N, D, V = 4096, 256, 32000


def _temp_bytes(impl, with_entropy):
  def step(hidden, weight, targets, g):
    def loss(h, w):
      out = token_logprobs(h, w, targets, return_entropy=with_entropy, impl=impl)
      return jnp.sum(g * out[0]) + jnp.sum(g * out[1]) if with_entropy else jnp.sum(g * out)
    return jax.value_and_grad(loss, argnums=(0, 1))(hidden, weight)

  args = (jax.ShapeDtypeStruct((N, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32),
          jax.ShapeDtypeStruct((N,), jnp.int32), jax.ShapeDtypeStruct((N,), jnp.float32))
  compiled = jax.jit(step).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("with_entropy", [False, True])
def test_xla_temp_memory_at_most_an_eighth_of_naive(with_entropy):
  naive = _temp_bytes("naive", with_entropy)
  xla = _temp_bytes("xla", with_entropy)
  assert naive >= N * V * 4  # the naive path holds at least the float32 logits
  assert xla * 8 <= naive, f"xla {xla / 2**20:.1f} MiB vs naive {naive / 2**20:.1f} MiB"
