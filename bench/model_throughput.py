"""Forward+backward throughput and MFU of the decoder, against the matmul rate measured on this device.

  python bench/model_throughput.py                      # tiny CPU default
  python bench/model_throughput.py --preset 1b --dtype bfloat16 --batch 8 --seq 1024   # GPU / TPU

MFU = model FLOPs per second / measured dense matmul FLOPs per second on the same device and dtype.
Model FLOPs per token follow PaLM (Chowdhery et al. 2022, App. B): 6 * P + 12 * L * (N * H) * T, with P
the parameters touched by matmuls (embedding lookup excluded, LM head included).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxalign import sharding
from jaxalign.config import from_dict
from jaxalign.models import CausalLM, ModelConfig

PRESETS = {
  "tiny": dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=8192),
  "small": dict(hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8, num_kv_heads=4,
                vocab_size=32000),
  "1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
             vocab_size=128256, tie_embeddings=True),
  "8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
             vocab_size=128256),
  "70b": dict(hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8,
              vocab_size=128256),
  # google/gemma-2-2b: 26 layers alternating local (window 4096) and global, soft-caps 50 / 30, sandwich norms
  "gemma2-2b": dict(family="gemma2", hidden_size=2304, intermediate_size=9216, num_layers=26, num_heads=8,
                    num_kv_heads=4, head_dim=256, vocab_size=256000, tie_embeddings=True, activation="gelu_tanh",
                    scale_embeddings=True, norm_offset=True, sandwich_norms=True, sliding_window=4096,
                    sliding_layers=[i % 2 == 0 for i in range(26)], attn_logit_softcap=50.0,
                    final_logit_softcap=30.0, query_pre_attn_scalar=256),
  # google/gemma-3-1b-it: 26 layers, 5 local (window 512, RoPE base 10k) per global one (RoPE base 1M), q/k norms
  "gemma3-1b": dict(family="gemma3_text", hidden_size=1152, intermediate_size=6912, num_layers=26, num_heads=4,
                    num_kv_heads=1, head_dim=256, vocab_size=262144, tie_embeddings=True, activation="gelu_tanh",
                    scale_embeddings=True, norm_offset=True, sandwich_norms=True, qk_norm=True,
                    sliding_window=512, sliding_layers=[(i + 1) % 6 != 0 for i in range(26)],
                    rope={"theta": 1_000_000.0}, rope_local={"theta": 10_000.0}, query_pre_attn_scalar=256),
  # Qwen/Qwen3-30B-A3B: 48 layers of 128 experts (width 768), 8 routed per token, q/k norms
  "qwen3-30b-a3b": dict(family="qwen3_moe", hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32,
                        num_kv_heads=4, head_dim=128, vocab_size=151936, qk_norm=True, num_experts=128,
                        num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                        rope={"theta": 1_000_000.0}),
}


def preset_config(name: str, **overrides) -> ModelConfig:
  """The ModelConfig of preset `name` (a Llama unless the preset names its family), with overrides."""
  return from_dict(ModelConfig, {"family": "llama", **PRESETS[name], **overrides})


def time_call(fn, *args, repeats: int) -> float:
  """Median wall time (s) of fn(*args) after one warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def matmul_rate(dtype, size: int, repeats: int) -> float:
  """Measured dense matmul FLOP/s for [size, size] @ [size, size] in `dtype`."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  f = jax.jit(lambda x, y: x @ y)
  return 2 * size**3 / time_call(f, a, b, repeats=repeats)


def flops_per_token(cfg: ModelConfig, seq: int) -> float:
  matmul_params = cfg.num_params() - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_embeddings else 1)
  return 6 * matmul_params + 12 * cfg.num_layers * cfg.num_heads * cfg.head_size * seq


def lm_loss(model: CausalLM, ids: jax.Array) -> jax.Array:
  logits = model(ids[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=PRESETS, default="tiny")
  parser.add_argument("--family", default=None, help="override the preset's family (default: the preset's)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--matmul-size", type=int, default=None, help="default: 2048 on CPU, 8192 elsewhere")
  parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor device counts")
  args = parser.parse_args()

  family = {"family": args.family} if args.family else {}
  cfg = preset_config(args.preset, param_dtype=args.dtype, dtype=args.dtype, **family)
  device = jax.devices()[0]
  data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
  mesh = sharding.make_mesh(sharding.MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
  model = sharding.create_sharded(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)), mesh)
  ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq + 1), 0, cfg.vocab_size)
  ids = jax.device_put(ids, sharding.batch_sharding(mesh, 2, batch_size=args.batch))
  graphdef, state = nnx.split(model)
  step = jax.jit(jax.value_and_grad(lambda s, x: lm_loss(nnx.merge(graphdef, s), x)))

  with sharding.use_mesh(mesh):
    compiled = step.lower(state, ids).compile()
    seconds = time_call(compiled, state, ids, repeats=args.repeats)
  size = args.matmul_size or (2048 if device.platform == "cpu" else 8192)
  peak_rate = matmul_rate(jnp.dtype(args.dtype), size, args.repeats) * mesh.size

  tokens = args.batch * args.seq
  achieved = flops_per_token(cfg, args.seq) * tokens / seconds
  memory = compiled.memory_analysis()
  stats = device.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  rows = [
    ("device", f"{mesh.size} x {device.device_kind} ({device.platform})"),
    ("jax", jax.__version__),
    ("model", f"{args.preset} {cfg.family}: {cfg.num_params() / 1e6:.1f}M params, {args.dtype}"),
    ("batch x seq", f"{args.batch} x {args.seq}"),
    ("step (fwd+bwd)", f"{seconds * 1e3:.1f} ms"),
    ("tokens/s", f"{tokens / seconds:,.0f}"),
    ("model TFLOP/s", f"{achieved / 1e12:.3f}"),
    (f"matmul TFLOP/s ({size}^3)", f"{peak_rate / 1e12:.3f}"),
    ("MFU", f"{achieved / peak_rate:.1%}"),
    ("compiled temp memory", f"{memory.temp_size_in_bytes / 2**20:.0f} MiB" if memory else "n/a"),
    ("device peak memory", f"{peak / 2**30:.2f} GiB" if peak else "n/a (backend reports none)"),
  ]
  width = max(len(k) for k, _ in rows)
  print("| " + "metric".ljust(width) + " | value |\n|" + "-" * (width + 2) + "|-------|")
  for key, value in rows:
    print(f"| {key.ljust(width)} | {value} |")


if __name__ == "__main__":
  main()
