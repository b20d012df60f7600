"""Logits parity with transformers' PyTorch models, both directions, for every family of `models.families`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxalign.models import FAMILIES, CausalLM, ScalarModel, last_token_values, load_hf, save_hf, tiny
from jaxalign.models.decoder import default_positions
from jaxalign.models.hf import CheckpointError

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=0)

# One tiny HF config per family switch (hidden 64, 2 layers).
HF_CONFIGS = {
  "llama": ("LlamaConfig", dict()),
  "llama3": ("LlamaConfig", dict(rope_parameters=dict(
    rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=8))),
  "mistral": ("MistralConfig", dict(sliding_window=4, head_dim=16)),
  "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
  "qwen2_sliding": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)),
  "qwen3": ("Qwen3Config", dict(head_dim=24)),
  "gemma": ("GemmaConfig", dict(head_dim=32, num_key_value_heads=1)),
  "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
  "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                       shared_expert_intermediate_size=48, norm_topk_prob=False)),
  "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32, head_dim=24,
                                       norm_topk_prob=True)),
  # transformers' own Gemma 2 defaults: soft-caps 50 / 30, local and global layers alternating
  "gemma2": ("Gemma2Config", dict(head_dim=32, sliding_window=4, query_pre_attn_scalar=20,
                                  attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
  # Gemma 3 before layer_types (every 2nd layer global here), local RoPE base, linear scaling on the global one
  "gemma3_text": ("Gemma3TextConfig", dict(head_dim=32, sliding_window=4, sliding_window_pattern=2,
                                           rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0,
                                                                                   rope_theta=100_000.0),
                                                            "sliding_attention": dict(rope_type="default",
                                                                                      rope_theta=1_000.0)})),
}


def randomize_torch(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * 0.15
      p.copy_(1.0 + noise if name.endswith("norm.weight") and "gemma" not in type(model).__name__.lower() else noise)


def make_hf_model(name, path, seed=0):
  cls_name, extra = HF_CONFIGS[name]
  config = getattr(transformers, cls_name)(**{**COMMON, **extra})
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
  randomize_torch(model, seed)
  model.save_pretrained(path)
  return model


def padded_batch(rng):
  """Row 0 left-padded, row 1 right-padded, row 2 full; tokens avoid the pad id 0."""
  ids = rng.integers(1, VOCAB, size=(3, 11))
  mask = np.ones_like(ids)
  mask[0, :4] = 0
  mask[1, 8:] = 0
  return np.where(mask == 1, ids, 0), mask


def hf_logits(model, ids, mask):
  positions = np.asarray(default_positions(jnp.asarray(mask)))
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
  return out.logits.float().numpy()


def assert_logits_match(ours, theirs, mask):
  real = mask.astype(bool)
  ours, theirs = np.asarray(ours)[real], theirs[real]
  rel = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
  assert rel < 1e-5, f"relative logits error {rel:.2e}"


def test_every_family_has_a_parity_case():
  assert set(FAMILIES) <= set(HF_CONFIGS)


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_load_hf_matches_transformers(name, tmp_path):
  hf_model = make_hf_model(name, tmp_path, seed=len(name))
  ids, mask = padded_batch(np.random.default_rng(len(name)))
  model, cfg = load_hf(tmp_path)
  assert cfg.family == hf_model.config.model_type
  assert_logits_match(model(jnp.asarray(ids), jnp.asarray(mask)), hf_logits(hf_model, ids, mask), mask)
  if name in ("gemma2", "gemma3_text"):  # the switches these checkpoints exercise were read
    assert cfg.sliding_layers == (True, False) and cfg.sandwich_norms
    assert (cfg.final_logit_softcap, cfg.rope_local is not None) == ((3.0, False) if name == "gemma2" else (None, True))


def randomize_jax(model, seed):
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  leaves = [jnp.asarray(rng.normal(0, 0.15, x.shape), x.dtype) + (1.0 if x.ndim == 1 else 0.0) for x in leaves]
  nnx.update(model, treedef.unflatten(leaves))


@pytest.mark.parametrize("family", sorted(FAMILIES) + ["llama3"])
def test_save_hf_loads_in_transformers(family, tmp_path):
  cfg = tiny(family, vocab_size=VOCAB, pad_token_id=0)
  model = CausalLM(cfg, rngs=nnx.Rngs(1))
  randomize_jax(model, 1)
  save_hf(model, cfg, tmp_path / "out")
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
  ids, mask = padded_batch(np.random.default_rng(2))
  assert_logits_match(model(jnp.asarray(ids), jnp.asarray(mask)), hf_logits(hf_model, ids, mask), mask)
  reloaded, cfg2 = load_hf(tmp_path / "out")
  assert cfg2 == cfg
  np.testing.assert_array_equal(reloaded(jnp.asarray(ids)), model(jnp.asarray(ids)))


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2_moe"])
def test_packed_rows_match_transformers_on_each_document(family, tmp_path):
  """A packed row (documents back to back, positions restarting) gives each document the logits transformers
  gives it alone (a mixture of experts: the dispatch of the packed row's tokens, and its padding, changes no
  document's routing)."""
  cfg = tiny(family, vocab_size=VOCAB, pad_token_id=0)
  model = CausalLM(cfg, rngs=nnx.Rngs(5))
  randomize_jax(model, 5)
  save_hf(model, cfg, tmp_path / "out")
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
  rng = np.random.default_rng(6)
  lengths = (7, 9, 3)
  docs = [rng.integers(1, VOCAB, size=n) for n in lengths]
  ids = np.concatenate(docs + [np.zeros(2, int)])[None]  # [1, 21]: three documents, then padding
  segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(2, int)])[None]
  ours = np.asarray(model(jnp.asarray(ids), segment_ids=jnp.asarray(segments)))[0]
  start = 0
  for doc in docs:
    theirs = hf_logits(hf_model, doc[None], np.ones((1, len(doc)), int))[0]
    assert_logits_match(ours[start:start + len(doc)][None], theirs[None], np.ones((1, len(doc)), int))
    start += len(doc)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_scalar_model_round_trip_as_sequence_classifier(family, tmp_path):
  cfg = tiny(family, vocab_size=VOCAB, pad_token_id=0)
  model = ScalarModel(cfg, rngs=nnx.Rngs(3))
  randomize_jax(model, 3)
  save_hf(model, cfg, tmp_path)
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(
    tmp_path, attn_implementation="eager").eval()
  ids = np.random.default_rng(4).integers(1, VOCAB, size=(2, 9))
  mask = np.ones_like(ids)
  mask[1, 6:] = 0  # right padding: HF pools at the last non-pad id
  ids = np.where(mask == 1, ids, 0)
  ours = last_token_values(model(jnp.asarray(ids), jnp.asarray(mask)), jnp.asarray(mask))
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
  loaded, _ = load_hf(tmp_path)
  assert isinstance(loaded, ScalarModel)


def test_omitted_family_keys_take_transformers_defaults():
  """A config.json without a family's own keys reads as transformers would build it: Gemma 2's soft-caps and
  window, Qwen3-MoE's unnormalised routing and expert width; an explicit null stays (no cap)."""
  from jaxalign.models.hf import config_from_hf

  for name, drop, want in (("gemma2", ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window"),
                            dict(attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=4096)),
                           ("qwen3_moe", ("norm_topk_prob", "moe_intermediate_size"),
                            dict(norm_topk_prob=False, moe_intermediate_size=768))):
    cls_name, extra = HF_CONFIGS[name]
    full = getattr(transformers, cls_name)(**COMMON).to_dict()
    defaults = {key: full[key] for key in drop}
    sparse = {k: v for k, v in json.loads(json.dumps(full)).items() if k not in drop}
    cfg = config_from_hf(sparse)
    assert {k: getattr(cfg, k) for k in want} == want, defaults
  with_null = {**transformers.Gemma2Config(**COMMON).to_dict(), "final_logit_softcapping": None}
  assert config_from_hf(with_null).final_logit_softcap is None


def test_unsupported_architecture_is_a_one_line_error(tmp_path):
  transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(
    tmp_path)
  with pytest.raises(CheckpointError, match=r"model_type 'gpt2' is not supported"):
    load_hf(tmp_path)


def test_shape_mismatch_names_the_tensor(tmp_path):
  make_hf_model("llama", tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config["intermediate_size"] = 128
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has shape \(64, 96\)"):
    load_hf(tmp_path)


def test_missing_tensor_names_the_key(tmp_path):
  make_hf_model("qwen2", tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config["tie_word_embeddings"] = False
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"tensor 'lm_head\.weight' missing"):
    load_hf(tmp_path)


def test_bfloat16_load_is_close_to_float32(tmp_path):
  make_hf_model("llama", tmp_path)
  ids, mask = padded_batch(np.random.default_rng(5))
  f32, _ = load_hf(tmp_path)
  bf16, cfg = load_hf(tmp_path, dtype="bfloat16")
  assert cfg.param_dtype == "bfloat16"
  assert bf16.model.embed_tokens.embedding[...].dtype == jnp.bfloat16
  a, b = np.asarray(f32(jnp.asarray(ids), jnp.asarray(mask))), np.asarray(bf16(jnp.asarray(ids), jnp.asarray(mask)))
  real = mask.astype(bool)
  assert np.max(np.abs(a[real] - b[real])) / np.max(np.abs(a[real])) < 5e-2
