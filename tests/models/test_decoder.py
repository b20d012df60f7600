"""Decoder behaviour that HF parity does not cover: packing, positions, masks, dtype policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.models import CausalLM, ModelConfig, ScalarModel, default_positions, last_token_values, tiny
from jaxalign.models.attention import sequence_mask_info
from jaxalign.ops.attention_xla import visible


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "gemma"])
def test_packed_row_equals_documents_run_separately(family):
  cfg = tiny(family, vocab_size=50)
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 50, size=n) for n in (5, 7, 3)]
  packed = np.concatenate(docs + [np.zeros(2, int)])[None]  # [1, 17], two trailing pads
  segments = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)] + [np.zeros(2, int)])[None]
  hidden = model.hidden_states(jnp.asarray(packed), segment_ids=jnp.asarray(segments))[0]
  start = 0
  for doc in docs:
    alone = model.hidden_states(jnp.asarray(doc)[None])[0]
    np.testing.assert_allclose(hidden[start:start + len(doc)], alone, rtol=2e-5, atol=2e-5)
    start += len(doc)


@pytest.mark.parametrize("family,scan", [("llama", False), ("mistral", True), ("gemma", False), ("qwen3", True),
                                         ("gemma3_text", True)])
def test_shared_prefix_equals_each_row_run_whole(family, scan):
  # Two left-padded prefixes (lengths 5, 2), three right-padded suffixes each (one empty); mistral's window of 4
  # reaches back into the prefix, and a suffix of the short prefix starts at position 2, not 5.
  model = CausalLM(tiny(family, vocab_size=50).replace(scan_layers=scan, remat="full"), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  prefix_lengths, suffix_lengths, n, p, s = [5, 2], [6, 4, 0, 1, 6, 3], 3, 5, 6
  prefix_seg = (np.arange(p)[None] >= p - np.asarray(prefix_lengths)[:, None]).astype(np.int32)
  suffix_seg = (np.arange(s)[None] < np.asarray(suffix_lengths)[:, None]).astype(np.int32)
  prefix, suffix = rng.integers(1, 50, (2, p)) * prefix_seg, rng.integers(1, 50, (6, s)) * suffix_seg
  hidden_p, hidden_s = model.shared_prefix_hidden_states(*map(jnp.asarray, (prefix, prefix_seg, suffix, suffix_seg)))
  assert hidden_p.shape == (2, p, 64) and hidden_s.shape == (6, s, 64)
  for row in range(6):
    g, lp, ls = row // n, prefix_lengths[row // n], suffix_lengths[row]
    whole = model.hidden_states(jnp.asarray(np.concatenate([prefix[g, p - lp:], suffix[row, :ls]]))[None])[0]
    np.testing.assert_allclose(hidden_p[g, p - lp:], whole[:lp], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(hidden_s[row, :ls], whole[lp:], rtol=2e-5, atol=2e-5)


def test_default_positions_left_right_padding_and_packing():
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(default_positions(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 0, 0]])
  segments = jnp.array([[1, 1, 2, 2, 2, 3, 0]])
  np.testing.assert_array_equal(default_positions(segments), [[0, 1, 0, 1, 2, 0, 0]])


def test_mask_blocks_other_documents_padding_and_far_keys():
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  info = sequence_mask_info(seg)  # what the decoder gives the attention op for a packed row
  mask = np.asarray(visible(info.q_positions, info.q_segment_ids, info.q_positions, info.q_segment_ids, 2))[0]
  expected = np.zeros((6, 6), bool)
  for t in range(6):
    for s in range(6):
      expected[t, s] = s <= t and t - s < 2 and seg[0, t] == seg[0, s] != 0
  np.testing.assert_array_equal(mask, expected)


def test_left_padding_does_not_change_real_token_logits():
  model = CausalLM(tiny("llama", vocab_size=40), rngs=nnx.Rngs(1))
  ids = jnp.array([[5, 6, 7, 8]])
  padded = jnp.array([[0, 0, 5, 6, 7, 8]])
  mask = jnp.array([[0, 0, 1, 1, 1, 1]])
  np.testing.assert_allclose(model(padded, mask)[0, 2:], model(ids)[0], rtol=1e-5, atol=1e-5)


def test_bfloat16_policy_keeps_params_and_activations_in_bf16():
  cfg = tiny("qwen2", param_dtype="bfloat16", dtype="bfloat16")
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  ids = jnp.arange(16).reshape(2, 8)
  assert model.hidden_states(ids).dtype == jnp.bfloat16
  logits = model(ids)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_scalar_head_reads_last_real_token():
  model = ScalarModel(tiny("llama", vocab_size=40), rngs=nnx.Rngs(2))
  mask = jnp.array([[1, 1, 1, 0], [0, 1, 1, 1]])
  values = model(jnp.array([[3, 4, 5, 0], [0, 3, 4, 5]]), mask)
  assert values.shape == (2, 4)
  np.testing.assert_allclose(last_token_values(values, mask), [values[0, 2], values[1, 3]])
  np.testing.assert_allclose(values[0, 2], values[1, 3], rtol=1e-5)  # same tokens, left vs right padded


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="num_kv_heads"):
    ModelConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="activation"):
    ModelConfig(activation="relu")
  with pytest.raises(ValueError, match="param_dtype"):
    ModelConfig(param_dtype="float16")


def test_gemma3_local_layers_keep_their_rope_without_a_window():
  """The layer's type, not its window, picks Gemma 3's local RoPE (transformers' rotary choice is by type)."""
  cfg = tiny("gemma3_text", vocab_size=50)
  assert [cfg.layer_rope(i) for i in range(2)] == [1, 0]
  no_window = cfg.replace(sliding_window=None)
  assert [no_window.layer_window(i) for i in range(2)] == [None, None]
  assert [no_window.layer_rope(i) for i in range(2)] == [1, 0]
