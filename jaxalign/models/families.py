"""The model families jaxalign reads, trains and writes: one entry each.

A family is an HF `model_type` plus what that type fixes in a `ModelConfig` (its switches), how its config.json
says which layers use a sliding window and which RoPE each layer uses, its transformers class names, and the
tiny preset that tests and laptop runs build. `models.hf` maps config.json both ways from this table and the
parity tests (tests/models/test_hf_parity.py) run every entry, so a new family is one entry here plus its new
layers (if any) in the decoder.
"""

from __future__ import annotations

import dataclasses

from jaxalign.models.config import ModelConfig, RopeConfig

# Switches of the plain pre-norm decoder (Llama); a family lists only where it differs.
_PLAIN = dict(qkv_bias=False, qk_norm=False, scale_embeddings=False, norm_offset=False, sandwich_norms=False)
_GEMMA = dict(_PLAIN, scale_embeddings=True, norm_offset=True)


@dataclasses.dataclass(frozen=True)
class Family:
  """One HF model_type (`name`, also `ModelConfig.family`)."""

  name: str
  # transformers classes: the causal LM and the one-label sequence classifier (reward models, critics).
  causal_class: str
  scalar_class: str
  # ModelConfig fields the model_type fixes: set on import, required on export.
  switches: dict
  # How config.json marks sliding-window layers: None (no window), "all" (`sliding_window` applies to every
  # layer: Mistral), "qwen" (`use_sliding_window` + `layer_types`), "layer_types" (Gemma 2 / 3).
  sliding: str | None = None
  # config.json's `rope_parameters` holds one RoPE per layer type (Gemma 3: local and global layers).
  rope_per_layer_type: bool = False
  # config.json has Gemma 2's attention / final-logit soft-caps and `query_pre_attn_scalar`.
  gemma_keys: bool = False
  # The head is the embedding when config.json does not say (`tie_word_embeddings` absent): transformers' default.
  tied_by_default: bool = False
  # transformers' defaults of the family's own config.json keys, for a config.json that omits them (an explicit
  # null stays null: e.g. no soft-cap).
  hf_defaults: dict = dataclasses.field(default_factory=dict)
  # Mixture of experts: config.json key -> ModelConfig field of the family's MoE settings (empty: dense), and the
  # HF names of its MoE block and of each expert's gate, up and down projections.
  moe_keys: dict = dataclasses.field(default_factory=dict)
  moe_names: tuple = ("mlp", ("gate_proj", "up_proj", "down_proj"))
  # ModelConfig fields of the tiny preset (hidden 64, 2 layers) besides the family's switches.
  tiny: dict = dataclasses.field(default_factory=dict)


FAMILIES = {f.name: f for f in (
  Family("llama", "LlamaForCausalLM", "LlamaForSequenceClassification", _PLAIN),
  Family("mistral", "MistralForCausalLM", "MistralForSequenceClassification", _PLAIN, sliding="all",
         tiny=dict(sliding_window=4)),
  Family("qwen2", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification", dict(_PLAIN, qkv_bias=True),
         sliding="qwen", tiny=dict(tie_embeddings=True)),
  Family("qwen3", "Qwen3ForCausalLM", "Qwen3ForSequenceClassification", dict(_PLAIN, qk_norm=True),
         sliding="qwen", tiny=dict(head_dim=32)),
  # Mixtral: every block a mixture of experts (each as wide as intermediate_size), routing weights renormalised.
  Family("mixtral", "MixtralForCausalLM", "MixtralForSequenceClassification", dict(_PLAIN, norm_topk_prob=True),
         sliding="all", moe_keys={"num_local_experts": "num_experts", "num_experts_per_tok": "num_experts_per_tok"},
         moe_names=("block_sparse_moe", ("w1", "w3", "w2")), hf_defaults=dict(num_local_experts=8, num_experts_per_tok=2),
         tiny=dict(num_experts=4)),
  # Qwen2-MoE: Qwen2 with experts of width moe_intermediate_size and a sigmoid-gated shared expert.
  Family("qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2MoeForSequenceClassification", dict(_PLAIN, qkv_bias=True),
         sliding="qwen", moe_keys={"num_experts": "num_experts", "num_experts_per_tok": "num_experts_per_tok",
                                   "moe_intermediate_size": "moe_intermediate_size",
                                   "norm_topk_prob": "norm_topk_prob",
                                   "shared_expert_intermediate_size": "shared_expert_intermediate_size"},
         hf_defaults=dict(num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408, norm_topk_prob=False,
                          shared_expert_intermediate_size=5632),
         tiny=dict(num_experts=4, moe_intermediate_size=32, norm_topk_prob=False,
                   shared_expert_intermediate_size=48)),
  # Qwen3-MoE: Qwen3 (q/k norms) with experts of width moe_intermediate_size.
  Family("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeForSequenceClassification", dict(_PLAIN, qk_norm=True),
         sliding="qwen", moe_keys={"num_experts": "num_experts", "num_experts_per_tok": "num_experts_per_tok",
                                   "moe_intermediate_size": "moe_intermediate_size",
                                   "norm_topk_prob": "norm_topk_prob"},
         hf_defaults=dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=False),
         tiny=dict(num_experts=4, moe_intermediate_size=32, head_dim=32)),
  Family("gemma", "GemmaForCausalLM", "GemmaForSequenceClassification", _GEMMA, tied_by_default=True,
         tiny=dict(activation="gelu_tanh", tie_embeddings=True, head_dim=32, num_kv_heads=1)),
  # Gemma 2: norms before and after attention and the MLP, soft-capped attention and final logits, local
  # (sliding) and global layers alternating.
  Family("gemma2", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification", dict(_GEMMA, sandwich_norms=True),
         sliding="layer_types", gemma_keys=True, tied_by_default=True,
         hf_defaults=dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=256,
                          sliding_window=4096),
         tiny=dict(activation="gelu_tanh", tie_embeddings=True, head_dim=32, sliding_window=4,
                   sliding_layers=(True, False), attn_logit_softcap=50.0, final_logit_softcap=30.0,
                   query_pre_attn_scalar=24)),
  # Gemma 3 (text decoder): Gemma 2's layout without soft-caps, q/k RMSNorm, and a RoPE of its own (base
  # 10k) on the local layers, five of every six.
  Family("gemma3_text", "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification",
         dict(_GEMMA, qk_norm=True, sandwich_norms=True), sliding="layer_types", rope_per_layer_type=True,
         gemma_keys=True, tied_by_default=True, hf_defaults=dict(query_pre_attn_scalar=256, sliding_window=4096),
         tiny=dict(activation="gelu_tanh", tie_embeddings=True, head_dim=32, sliding_window=4,
                   sliding_layers=(True, False), rope=RopeConfig(theta=1_000_000.0, type="linear", factor=8.0),
                   rope_local=RopeConfig(theta=10_000.0), query_pre_attn_scalar=32)),
)}

# Tiny presets that are a family with a different setting (Llama 3.1's RoPE scaling).
_VARIANTS = {"llama3": ("llama", dict(rope=RopeConfig(theta=500_000.0, type="llama3", factor=8.0, low_freq_factor=1.0,
                                                      high_freq_factor=4.0, original_max_position_embeddings=16)))}


def family(name: str) -> Family:
  """The family named `name`; a one-line ValueError listing the supported ones otherwise."""
  if name not in FAMILIES:
    raise ValueError(f"model family {name!r} is not supported; supported: {sorted(FAMILIES)}")
  return FAMILIES[name]


def tiny(name: str = "llama", **overrides) -> ModelConfig:
  """A 2-layer, 64-wide model of family `name` (or a preset variant, "llama3"), for tests and laptop runs."""
  base, extra = _VARIANTS.get(name, (name, {}))
  if base not in FAMILIES:
    raise ValueError(f"unknown family {name!r}; choose one of {tuple(FAMILIES) + tuple(_VARIANTS)}")
  f = FAMILIES[base]
  return ModelConfig(**{"family": f.name, **f.switches, **f.tiny, **extra, **overrides})
