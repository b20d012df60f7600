"""Flax NNX causal decoders (Llama 2/3, Mistral, Qwen2, Qwen3, Gemma) and HF checkpoint I/O."""

from jaxalign.models.config import ModelConfig, RopeConfig, tiny
from jaxalign.models.decoder import CausalLM, Decoder, ScalarModel, default_positions, last_token_values
from jaxalign.models.hf import load_hf, load_tokenizer, save_hf

__all__ = [
  "CausalLM", "Decoder", "ModelConfig", "RopeConfig", "ScalarModel", "default_positions",
  "last_token_values", "load_hf", "load_tokenizer", "save_hf", "tiny",
]
