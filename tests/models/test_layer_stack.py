"""Layer scan and rematerialisation: same numbers as the plain loop, HF I/O and LoRA per layer, less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from jaxalign import sharding
from jaxalign.algorithms import lora as lora_lib
from jaxalign.models import CausalLM, load_hf, save_hf, tiny
from jaxalign.models.decoder import default_positions

VOCAB = 64


def _models(cfg, **execution):
  """The same weights as a loop model and as a scanned model (built from the same seed)."""
  loop = CausalLM(cfg.replace(**execution), rngs=nnx.Rngs(0))
  scan = CausalLM(cfg.replace(scan_layers=True, **execution), rngs=nnx.Rngs(0))
  return loop, scan


def _batch():
  ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (3, 11)))
  mask = jnp.asarray([[1] * 11, [0, 0, 0] + [1] * 8, [1] * 7 + [0] * 4])  # full, left- and right-padded
  return ids, mask


def _mixed_windows():
  """Qwen2-style: a sliding window on some layers only (the scan carries per-layer windows as data)."""
  return tiny("qwen2", vocab_size=VOCAB, num_layers=3, sliding_window=3, sliding_layers=(True, False, True))


CASES = {"llama": tiny("llama", vocab_size=VOCAB, num_layers=3), "mistral": tiny("mistral", vocab_size=VOCAB),
         "qwen2_mixed_windows": _mixed_windows(), "gemma": tiny("gemma", vocab_size=VOCAB),
         # local and global layers with RoPEs of their own: the scan carries each layer's table index as data
         "gemma3_local_global": tiny("gemma3_text", vocab_size=VOCAB, num_layers=3, sliding_layers=(True, False, True)),
         # expert kernels [E, ...] stacked again over layers: [L, E, ...]
         "qwen2_moe": tiny("qwen2_moe", vocab_size=VOCAB)}


@pytest.mark.parametrize("name", CASES)
def test_scan_equals_loop_forward_gradients_and_decode(name):
  cfg = CASES[name]
  loop, scan = _models(cfg)
  ids, mask = _batch()
  np.testing.assert_allclose(scan(ids, mask), loop(ids, mask), atol=2e-6)

  def loss(model):
    return jnp.sum(model(ids, mask)[..., :4] * mask[..., None])

  g_loop, g_scan = nnx.grad(loss)(loop), nnx.grad(loss)(scan)
  down = ("mlp", "experts", "down_proj") if cfg.num_experts else ("mlp", "down_proj")
  for i in range(cfg.num_layers):
    for path in (down, ("self_attn", "k_proj")):
      stacked, per_layer = g_scan["model"]["layers"], g_loop["model"]["layers"][i]
      for name in path:
        stacked, per_layer = stacked[name], per_layer[name]
      np.testing.assert_allclose(stacked["kernel"][...][i], per_layer["kernel"][...], rtol=1e-5,
                                 atol=5e-6)  # float32 summation order: scan vs loop
  last = g_scan["model"]["layers"]
  for name in down:
    last = last[name]
  assert float(jnp.abs(last["kernel"][...]).sum()) > 0

  for model in (loop, scan):  # prefill then one decode step, against the full forward on real tokens
    cache = model.init_cache(3, 12)
    cache, hidden = model.decode(ids, default_positions(mask), cache, segment_ids=mask)
    np.testing.assert_allclose(model.logits(hidden) * mask[..., None], loop(ids, mask) * mask[..., None], atol=2e-5)
  assert scan.init_cache(3, 12)["layers"]["k"].shape[0] == cfg.num_layers


@pytest.mark.parametrize("moe", [False, True])
def test_scanned_parameters_round_trip_through_hf_per_layer(tmp_path, moe):
  """A loop model's export read into [L, ...] stacks on a mesh (and [L, E, ...] for expert kernels) and written
  back gives the same tensors under the same per-layer (per-expert) names."""
  cfg = tiny("mixtral", vocab_size=VOCAB, num_layers=3, sliding_window=3) if moe else _mixed_windows()
  loop = CausalLM(cfg, rngs=nnx.Rngs(1))
  save_hf(loop, cfg, tmp_path / "loop")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  scan, scan_cfg = load_hf(tmp_path / "loop", mesh=mesh, scan_layers=True)
  q = scan.model.layers.self_attn.q_proj.kernel[...]
  assert q.shape == (3, 64, 64) and q.sharding.spec == jax.P(None, "fsdp", "tensor")
  ids, mask = _batch()
  np.testing.assert_allclose(scan(ids, mask), loop(ids, mask), atol=2e-6)
  save_hf(scan, scan_cfg, tmp_path / "scan")
  a = safetensors.numpy.load_file(tmp_path / "loop" / "model.safetensors")
  b = safetensors.numpy.load_file(tmp_path / "scan" / "model.safetensors")
  assert sorted(a) == sorted(b)
  assert ("model.layers.2.block_sparse_moe.experts.3.w3.weight" if moe else "model.layers.2.mlp.up_proj.weight") in b
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_lora_on_stacked_kernels_equals_per_layer_lora():
  cfg = tiny("llama", vocab_size=VOCAB, num_layers=3)
  loop, scan = _models(cfg)
  lora = lora_lib.LoraConfig(rank=2, targets=("q_proj", "down_proj"))
  p_loop, p_scan = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (loop, scan))
  adapters = lora_lib.init_adapters(p_scan, lora, jax.random.PRNGKey(0))
  assert adapters["model/layers/self_attn/q_proj"]["a"].shape == (3, 64, 2)
  adapters = jax.tree.map(lambda x: x + 0.05, adapters)  # B != 0, so the merge changes the weights
  per_layer = {f"model/layers/{i}/{name}": jax.tree.map(lambda x: x[i], ad)
               for key, ad in adapters.items() for i in range(3) for name in [key.split("/", 2)[2]]}
  merged_scan = lora_lib.merge(p_scan, adapters, lora)
  merged_loop = lora_lib.merge(p_loop, per_layer, lora)
  for i in range(3):
    np.testing.assert_allclose(merged_scan["model"]["layers"]["mlp"]["down_proj"]["kernel"][i],
                               merged_loop["model"]["layers"][i]["mlp"]["down_proj"]["kernel"], atol=1e-7)
  assert not np.allclose(merged_scan["model"]["layers"]["mlp"]["down_proj"]["kernel"],
                         p_scan["model"]["layers"]["mlp"]["down_proj"]["kernel"])
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  shardings = nnx.to_pure_dict(sharding.param_shardings(nnx.state(scan, nnx.Param), mesh))
  spec = lora_lib.adapter_shardings(shardings, lora)["model/layers/mlp/down_proj"]
  assert spec["a"].spec == jax.P(None, "tensor", None) and spec["b"].spec == jax.P(None, None, "fsdp")


def _grad_step(cfg):
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (8, 64)))

  def loss(params):
    return jnp.mean(nnx.merge(graphdef, params).hidden_states(ids) ** 2)

  return jax.jit(jax.value_and_grad(loss)), params


@pytest.mark.parametrize("policy,scan", [("full", False), ("save_dots", False), ("offload", False), ("full", True)])
def test_remat_policies_give_the_same_gradients_with_less_memory(policy, scan):
  """Activation-heavy blocks (wide MLP): keeping every activation costs several times what remat keeps."""
  cfg = tiny("llama", vocab_size=VOCAB, num_layers=6, intermediate_size=512, attention_impl="naive", scan_layers=scan)
  step_none, params = _grad_step(cfg.replace(remat="none"))
  step, _ = _grad_step(cfg.replace(remat=policy))
  (loss_none, g_none), (loss, g) = step_none(params), step(params)
  np.testing.assert_allclose(loss, loss_none, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_none)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  temp = {name: s.lower(params).compile().memory_analysis().temp_size_in_bytes
          for name, s in (("none", step_none), (policy, step))}
  assert temp[policy] < (0.3 if policy == "full" else 0.6) * temp["none"], temp


def test_a_kernel_asked_for_by_name_leaves_cached_decoding_to_the_blockwise_path():
  """attention_impl=splash serves training-shaped calls; prefill and decode against the cache still work."""
  cfg = tiny("llama", vocab_size=VOCAB)
  ids, mask = _batch()
  logits = {}
  for impl in ("naive", "splash"):
    model = CausalLM(cfg.replace(attention_impl=impl), rngs=nnx.Rngs(0))
    cache = model.init_cache(3, 12)
    cache, hidden = model.decode(ids, default_positions(mask), cache, segment_ids=mask)
    logits[impl] = model.logits(hidden) * mask[..., None]
  np.testing.assert_allclose(logits["splash"], logits["naive"], atol=2e-5)


def test_a_scan_over_local_and_global_layers_hands_the_attention_kernel_static_windows():
  """Gemma 2's alternating windows in a layer scan reach the attention op as static ints (one branch per
  distinct window), so a kernel that takes no traced window (Triton, splash) serves them: the scanned model on
  the Pallas Triton kernel (interpreted here) equals the loop on the reference einsum, soft-cap included."""
  cfg = tiny("gemma2", vocab_size=VOCAB, attn_logit_softcap=5.0)
  loop = CausalLM(cfg.replace(attention_impl="naive"), rngs=nnx.Rngs(0))
  scan = CausalLM(cfg.replace(attention_impl="pallas_gpu", scan_layers=True), rngs=nnx.Rngs(0))
  ids = jnp.asarray(np.random.default_rng(0).integers(1, VOCAB, (2, 16)))
  mask = jnp.asarray([[1] * 16, [0] * 5 + [1] * 11])
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(scan(ids, mask))[real], np.asarray(loop(ids, mask))[real], atol=2e-5)
