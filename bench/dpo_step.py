"""DPO step throughput (prompt + chosen + rejected tokens/s) and MFU, optionally beside TRL's DPOTrainer.

  python bench/dpo_step.py                                     # tiny model, CPU
  python bench/dpo_step.py --peer-python /path/to/trl-venv/bin/python   # + TRL on the same model and batch
  python bench/dpo_step.py --preset 1b --dtype bfloat16 --pairs 4 --prompt-len 512 --response-len 512  # GPU

One step = policy forward+backward on chosen and rejected rows + frozen-reference forward + AdamW, jitted.
MFU = model FLOPs / measured matmul FLOP/s on this device (bench/model_throughput.py); model FLOPs per
processed token are 8 * P (6 for the policy, 2 for the reference) plus attention, P = matmul parameters.
The peer runs in its own virtual environment on the same saved HF model and the same token shapes.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from model_throughput import PRESETS, matmul_rate, preset_config, time_call  # noqa: E402
from versus import run_peer  # noqa: E402

from jaxalign import sharding  # noqa: E402
from jaxalign.algorithms.objectives import objective_for  # noqa: E402
from jaxalign.algorithms.step import (OptimConfig, StepFns, TrainState, init_opt_state, make_optimizer,  # noqa: E402
                                      make_train_step)
from jaxalign.algorithms.lora import LoraConfig  # noqa: E402
from jaxalign.data import digits_tokenizer  # noqa: E402
from jaxalign.models import CausalLM, ModelConfig, save_hf  # noqa: E402
from jaxalign.trainer import frozen_copy  # noqa: E402


def pair_batch(rng, pairs: int, prompt: int, response: int, vocab: int) -> dict:
  """[1, B, 2, T] ids / masks: a shared prompt then chosen or rejected response tokens."""
  t = prompt + response
  ids = rng.integers(6, vocab, size=(1, pairs, 2, t)).astype(np.int32)
  ids[..., :prompt] = ids[:, :, :1, :prompt]
  mask = np.zeros_like(ids)
  mask[..., prompt:] = 1
  return {"input_ids": ids, "loss_mask": mask, "segment_ids": np.ones_like(ids)}


def jaxalign_step_time(cfg: ModelConfig, batch: dict, repeats: int, impl: str, mu_dtype: str | None = None) -> float:
  """Seconds per DPO step: params and Adam moments sharded over the mesh, the reference in the compute dtype."""
  mesh = sharding.make_mesh(sharding.MeshConfig())
  model = sharding.create_sharded(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)), mesh)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  shardings = jax.tree.map(lambda x: x.sharding, params)
  tx = make_optimizer(OptimConfig(lr=1e-6, max_grad_norm=1.0, mu_dtype=mu_dtype), 1000)
  fns = StepFns(graphdef, objective_for("preference", "dpo"), tx, {"beta": 0.1}, LoraConfig(), {"impl": impl})
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  train_state = TrainState(params, init_opt_state(tx, params, shardings, mesh),
                           jax.device_put(jnp.zeros((), jnp.int32), replicated),
                           jax.device_put(jax.random.PRNGKey(0), replicated))
  frozen = {"reference": frozen_copy(params, cfg.compute_dtype)}
  state_shardings = jax.tree.map(lambda x: x.sharding, train_state)
  step = jax.jit(make_train_step(fns), out_shardings=(state_shardings, None), donate_argnums=0)
  batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, jax.P()))
  holder = {"state": train_state}

  def one():
    holder["state"], metrics = step(holder["state"], batch, frozen)
    return metrics["loss"]

  with sharding.use_mesh(mesh):
    return time_call(one, repeats=repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=PRESETS, default="tiny")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
  parser.add_argument("--param-dtype", choices=("float32", "bfloat16"),
                      help="dtype of the trained weights (default: --dtype); the reference is held in --dtype")
  parser.add_argument("--mu-dtype", choices=("float32", "bfloat16"), help="Adam first moment (default: params')")
  parser.add_argument("--pairs", type=int, default=4)
  parser.add_argument("--prompt-len", type=int, default=128)
  parser.add_argument("--response-len", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--impl", default="auto", help="token_logprobs implementation")
  parser.add_argument("--remat", default=ModelConfig.remat, help="decoder block rematerialisation policy")
  parser.add_argument("--scan-layers", action="store_true", help="scan over stacked layers")
  parser.add_argument("--peer-python", help="python of a venv with trl installed (runs bench/peers/trl_run.py)")
  args = parser.parse_args()

  vocab = PRESETS[args.preset]["vocab_size"]
  if args.peer_python:
    vocab = max(vocab, len(digits_tokenizer()))
  cfg = preset_config(args.preset, vocab_size=vocab, param_dtype=args.param_dtype or args.dtype, dtype=args.dtype,
                      remat=args.remat, scan_layers=args.scan_layers)
  batch = pair_batch(np.random.default_rng(0), args.pairs, args.prompt_len, args.response_len, cfg.vocab_size)
  seconds = jaxalign_step_time(cfg, batch, args.repeats, args.impl, args.mu_dtype)

  tokens = args.pairs * (args.prompt_len + 2 * args.response_len)  # prompt counted once
  processed = args.pairs * 2 * (args.prompt_len + args.response_len)
  seq = args.prompt_len + args.response_len
  matmul_params = cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size)
  flops = processed * (8 * matmul_params + 16 * cfg.num_layers * cfg.num_heads * cfg.head_size * seq)
  device = jax.devices()[0]
  rate = matmul_rate(jnp.dtype(args.dtype), 2048 if device.platform == "cpu" else 8192, args.repeats)
  print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, model {args.preset} "
        f"{cfg.num_params() / 1e6:.1f}M params {cfg.param_dtype} "
        f"(compute {args.dtype}), {args.pairs} pairs x ({args.prompt_len} prompt + "
        f"2 x {args.response_len} response)")
  print("| implementation | step ms | tokens/s | MFU | peak memory |\n|---|---|---|---|---|")
  peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
  peak_text = f"{peak / 2**30:.2f} GiB" if peak else "n/a"
  print(f"| jaxalign | {seconds * 1e3:.1f} | {tokens / seconds:,.0f} | {flops / seconds / rate:.1%} | {peak_text} |")
  if args.peer_python:
    with tempfile.TemporaryDirectory() as tmp:
      save_hf(CausalLM(cfg, rngs=nnx.Rngs(0)), cfg, pathlib.Path(tmp) / "model", tokenizer=digits_tokenizer())
      shape = {"pairs": args.pairs, "prompt": args.prompt_len, "response": args.response_len,
               "steps": args.repeats + 2}
      peer = run_peer(args.peer_python, "trl", "dpo", pathlib.Path(tmp) / "model", shape)
    print(f"| {peer['peer']} DPOTrainer | {peer['seconds'] * 1e3:.1f} | {tokens / peer['seconds']:,.0f} | "
          f"{flops / peer['seconds'] / rate:.1%} | n/a |")
    print(f"\njaxalign / TRL throughput: {peer['seconds'] / seconds:.2f}x")


if __name__ == "__main__":
  main()
