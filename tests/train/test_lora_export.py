"""A LoRA run's HF export is the base model with W + (alpha / r) * (A @ B) folded in, as transformers reads it.

The expected model is merged by hand in NumPy from the base model's HF tensors and the run's adapters (torch
Linear weights are [out, in], jaxalign Dense kernels [in, out]), then run by transformers' PyTorch code; the
product's export and the jaxalign policy with its adapters active must give its logits.
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxalign.models import save_hf
from jaxalign.trainer import build_run, export

RANK, ALPHA = 4, 8.0


def perturbed_adapters(adapters: dict, seed: int = 0) -> dict:
  """Every adapter's A and B replaced by random values (B starts at zero: the merge would add nothing)."""
  rng = np.random.default_rng(seed)
  return {name: {k: jnp.asarray(rng.normal(0.0, 0.2, v.shape), v.dtype) for k, v in ab.items()}
          for name, ab in adapters.items()}


def hf_logits(directory, ids: np.ndarray) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager",
                                                            dtype=torch.float32).eval()
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids)).logits.float().numpy()


def assert_close(ours, expected, what):
  rel = np.max(np.abs(np.asarray(ours) - expected)) / np.max(np.abs(expected))
  assert rel < 1e-5, f"{what}: relative logits error {rel:.2e}"


def test_lora_export_matches_a_hand_merged_transformers_model(stage, tmp_path):
  cfg = stage(algorithm="sft", loss__name="sft", lora__rank=RANK, lora__alpha=ALPHA, mesh__fsdp=1)
  run = build_run(cfg)
  adapters = perturbed_adapters(jax.device_get(run.state.trainable))
  run.state = run.state._replace(trainable=adapters)
  assert len(adapters) == 7 * cfg.model.num_layers  # q, k, v, o, gate, up, down in every layer

  # Expected: the base model's HF tensors with each adapter's delta added by hand, in torch's [out, in] layout.
  base_dir = save_hf(nnx.merge(run.fns.graphdef, run.frozen["base"]), run.model_config, tmp_path / "base")
  tensors = load_file(base_dir / "model.safetensors")
  scale = ALPHA / RANK  # LoRA's alpha / r
  for name, ab in adapters.items():  # "model/layers/0/self_attn/q_proj"
    key = name.replace("/", ".") + ".weight"
    a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)  # [in, r], [r, out]
    weight = tensors[key]  # [out, in]
    assert weight.shape == (b.shape[1], a.shape[0]), (key, weight.shape, a.shape, b.shape)
    tensors[key] = (weight.astype(np.float64) + scale * (a @ b).T).astype(weight.dtype)
  hand_dir = tmp_path / "hand_merged"
  shutil.copytree(base_dir, hand_dir)
  save_file(tensors, hand_dir / "model.safetensors", metadata={"format": "pt"})

  ids = np.random.default_rng(1).integers(1, cfg.model.vocab_size, size=(3, 13))
  expected = hf_logits(hand_dir, ids)
  base = hf_logits(base_dir, ids)
  assert np.max(np.abs(expected - base)) > 1e-2 * np.max(np.abs(base))  # the adapters change the model

  exported = export(run, tmp_path / "export")
  assert_close(hf_logits(exported, ids), expected, "transformers on the product's LoRA export")
  policy = run.fns.policy(run.state.trainable, run.frozen)  # the model the run trains: base + adapters
  assert_close(policy(jnp.asarray(ids)), expected, "jaxalign policy with adapters active")
