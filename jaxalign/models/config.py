"""Configuration of the causal decoder (Llama 2/3, Mistral, Qwen2, Qwen3, Gemma 1/2/3; see `models.families`)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

from jaxalign.ops.attention import IMPLS as ATTENTION_IMPLS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ACTIVATIONS = ("silu", "gelu_tanh")
ROPE_TYPES = ("default", "linear", "llama3")
# What a decoder block keeps for the backward pass (jax.checkpoint policies; see `models.remat`).
REMAT_POLICIES = ("none", "full", "save_dots", "offload")
# Keys that choose how the model runs, not what it computes: they never come from or go to config.json.
EXECUTION_KEYS = ("param_dtype", "dtype", "remat", "scan_layers", "attention_impl")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary position embedding: base frequency and optional context-extension scaling."""

  # Base wavelength theta of the rotary frequencies.
  theta: float = 10_000.0
  # "default" (plain RoPE), "linear" (positions divided by factor), "llama3" (Llama-3.1 band scaling).
  type: Literal["default", "linear", "llama3"] = "default"
  # Scaling factor for "linear" and "llama3".
  factor: float = 1.0
  # Llama-3 band edges, as multiples of the original context (see `rope.inverse_frequencies`).
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  # Context length the model was pretrained with (Llama-3 scaling only).
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.type not in ROPE_TYPES:
      raise ValueError(f"rope.type={self.type!r} is not supported; choose one of {ROPE_TYPES}")
    if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
      raise ValueError("rope.high_freq_factor must be larger than rope.low_freq_factor")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """One causal decoder whose switches cover the families of `models.families`.

  Shape letters: D hidden size, F MLP width, N query heads, K key/value heads, H head dim, V vocab.
  """

  # HF `model_type` this config round-trips to (`models.families.FAMILIES`).
  family: str = "llama"
  vocab_size: int = 256  # V
  hidden_size: int = 64  # D
  intermediate_size: int = 128  # F
  num_layers: int = 2
  num_heads: int = 4  # N
  num_kv_heads: int = 2  # K (grouped-query attention when K < N)
  head_dim: int | None = None  # H; defaults to D // N
  rope: RopeConfig = RopeConfig()
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 2048
  # Per-layer attention span: None = full causal attention, else the layer attends to the last
  # `sliding_window` positions (Mistral; Qwen2 layers marked "sliding_attention").
  sliding_window: int | None = None
  sliding_layers: tuple[bool, ...] | None = None  # which layers use the window (None = all)
  qkv_bias: bool = False  # Qwen2
  qk_norm: bool = False  # Qwen3: RMSNorm over H on queries and keys before RoPE
  activation: str = "silu"  # gated MLP activation: "silu" (SwiGLU) or "gelu_tanh" (Gemma GeGLU)
  scale_embeddings: bool = False  # Gemma: multiply embeddings by sqrt(D)
  norm_offset: bool = False  # Gemma: RMSNorm scales by (1 + w), w initialised at 0
  tie_embeddings: bool = False  # LM head shares the embedding table
  # Token ids the tokenizer and generation use (kept for HF export).
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  # Gemma 2: attention logits become softcap * tanh(logits / softcap) (None: off).
  attn_logit_softcap: float | None = None
  # Gemma 2: the LM head's logits become cap * tanh(logits / cap) (None: off), in sampling and in every
  # log-prob path (`ops.token_logprobs(logit_softcap=...)`).
  final_logit_softcap: float | None = None
  # Gemma 2 / 3: attention scores are scaled by query_pre_attn_scalar ** -0.5 instead of H ** -0.5.
  query_pre_attn_scalar: int | None = None
  # Gemma 2 / 3: RMSNorm before and after attention and before and after the MLP (x + norm(attn(norm(x)))).
  sandwich_norms: bool = False
  # Gemma 3: the RoPE of sliding-window (local) layers; `rope` then serves the global ones (None: one RoPE).
  rope_local: RopeConfig | None = None
  # Mixture of experts (Mixtral, Qwen2/3-MoE; `models.moe`): E experts per block (0: a dense MLP), k of them
  # per token, each an MLP of width moe_intermediate_size (None: intermediate_size); the k routing weights
  # renormalised to sum to 1 (Mixtral; Qwen's norm_topk_prob); Qwen2-MoE's shared expert width (0: none).
  num_experts: int = 0
  num_experts_per_tok: int = 2
  moe_intermediate_size: int | None = None
  norm_topk_prob: bool = True
  shared_expert_intermediate_size: int = 0
  # dtype policy: parameters and activations; softmax, norms and logits are always float32.
  param_dtype: str = "float32"
  dtype: str = "float32"
  # Rematerialisation of each decoder block in the backward pass: "none" keeps every activation,
  # "full" keeps only the block's input and recomputes the rest, "save_dots" keeps the outputs of the
  # weight matmuls (recomputes norms, activations and attention), "offload" moves those matmul outputs
  # to host memory (backends with a pinned host memory space; elsewhere it acts as "full").
  remat: str = "full"
  # Parameters of all blocks stacked on a leading "layers" axis and run by one lax.scan: compile time
  # independent of depth. HF I/O, LoRA, sharding and the KV cache work the same either way.
  scan_layers: bool = False
  # Attention kernel (`jaxalign.ops.attention`): auto | xla (blockwise, any backend) | naive | splash (TPU)
  # | pallas_gpu (Triton) | cudnn (one right-padded document per row).
  attention_impl: str = "auto"

  def __post_init__(self):
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
             "max_position_embeddings")
    bad = [f"{k}={getattr(self, k)}" for k in sizes if getattr(self, k) < 1]
    if bad:
      raise ValueError(f"{', '.join(bad)}: model sizes must be >= 1")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r} is not supported; choose one of {ACTIVATIONS}")
    for key in ("param_dtype", "dtype"):
      if getattr(self, key) not in DTYPES:
        raise ValueError(f"{key}={getattr(self, key)!r} is not supported; choose one of {tuple(DTYPES)}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r} is not supported; choose one of {REMAT_POLICIES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r} is not supported; choose one of {ATTENTION_IMPLS}")
    if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
      raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]")
    if self.sliding_layers is not None and len(self.sliding_layers) != self.num_layers:
      raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_layers} layers")
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; set head_dim")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

  @property
  def head_size(self) -> int:
    """H, the per-head width."""
    return self.head_dim

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  @property
  def expert_size(self) -> int:
    """F of one expert's MLP."""
    return self.moe_intermediate_size or self.intermediate_size

  @property
  def shared_expert_size(self) -> int:
    return self.shared_expert_intermediate_size

  @property
  def attention_scale(self) -> float:
    """The factor of q.k in the attention scores."""
    return (self.head_size if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar) ** -0.5

  def ropes(self) -> tuple[RopeConfig, ...]:
    """The distinct RoPEs of the layers: (rope,) or (rope, rope_local); `layer_rope` indexes it."""
    return (self.rope,) if self.rope_local is None else (self.rope, self.rope_local)

  def layer_rope(self, layer: int) -> int:
    """Which of `ropes()` layer `layer` uses: 1 (local) for a local layer (`local_layer`, its type: transformers'
    Gemma 3 keeps the local RoPE on those when config.json sets no window) when rope_local is set."""
    return int(self.rope_local is not None and self.local_layer(layer))

  def local_layer(self, layer: int) -> bool:
    """Whether `layer` is of the local (sliding-window) type: its `sliding_layers` entry, or without them
    whether the model has a window."""
    return self.sliding_window is not None if self.sliding_layers is None else self.sliding_layers[layer]

  def layer_window(self, layer: int) -> int | None:
    """The sliding-window span of `layer`, or None for full causal attention."""
    return self.sliding_window if self.local_layer(layer) else None

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def with_execution_of(self, other: ModelConfig) -> ModelConfig:
    """This architecture run the way `other` says (dtypes, remat, layer scan, attention kernel)."""
    return self.replace(**{key: getattr(other, key) for key in EXECUTION_KEYS})

  def num_params(self) -> int:
    """Parameter count (embedding and LM head included), for FLOP and memory estimates."""
    d, f, h = self.hidden_size, self.intermediate_size, self.head_size
    attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
    if self.qkv_bias:
      attn += h * (self.num_heads + 2 * self.num_kv_heads)
    mlp = 3 * d * f
    if self.num_experts:
      mlp = self.num_experts * (3 * d * self.expert_size + d) + self.shared_expert_size * 3 * d
      mlp += d if self.shared_expert_size else 0
    layer = attn + mlp + (4 if self.sandwich_norms else 2) * d + (2 * h if self.qk_norm else 0)
    head = 0 if self.tie_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.num_layers * layer + d + head

