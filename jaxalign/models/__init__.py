"""Flax NNX causal decoders (the families of `models.families`, dense and mixture-of-experts) and HF checkpoint
I/O."""

from jaxalign.models.config import ModelConfig, RopeConfig
from jaxalign.models.families import FAMILIES, tiny
from jaxalign.models.decoder import CausalLM, Decoder, ScalarModel, default_positions, last_token_values
from jaxalign.models.hf import load_hf, load_tokenizer, save_hf

__all__ = [
  "FAMILIES", "CausalLM", "Decoder", "ModelConfig", "RopeConfig", "ScalarModel", "default_positions",
  "last_token_values", "load_hf", "load_tokenizer", "save_hf", "tiny",
]
