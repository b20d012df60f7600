"""GRPO step: decode tokens/s against the memory-bound floor, and the generate / score / update split.

  python bench/rl_step.py                                            # tiny model, CPU
  python bench/rl_step.py --peer-python /path/to/trl-venv/bin/python   # + HF generate and TRL GRPOTrainer
  python bench/rl_step.py --preset 1b --dtype bfloat16 --prompts 8 --group 8 --new-tokens 256   # GPU anchor

Decode floor: each decode step must read the weights and the KV cache once, so
floor = new_tokens * (weight bytes + KV-cache bytes) / measured memory bandwidth (a large copy on this device).
The split times `generate` alone (one prefill per prompt, `rl.group_size` samples each), the scoring (reward +
old/reference log-prob passes) alone, and the whole jitted step; the update is the remainder. With a peer
python (a venv with torch, transformers and trl), the same model saved in HF format also runs Hugging Face
`generate` on the same rows and new tokens, and TRL's GRPOTrainer on the same step shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from model_throughput import PRESETS, time_call  # noqa: E402
from versus import run_peer  # noqa: E402

from jaxalign import sharding  # noqa: E402
from jaxalign.algorithms import online  # noqa: E402
from jaxalign.config import TrainConfig, from_dict  # noqa: E402
from jaxalign.models import save_hf  # noqa: E402
from jaxalign.trainer import build_run  # noqa: E402


def memory_bandwidth(repeats: int) -> float:
  """Bytes/s of a large elementwise pass (read + write)."""
  x = jnp.ones((64 * 2**20,), jnp.float32)  # 256 MiB
  f = jax.jit(lambda a: a * 1.0001)
  return 2 * x.nbytes / time_call(f, x, repeats=repeats)


def build(args, run_dir):
  preset = dict(PRESETS[args.preset], vocab_size=max(PRESETS[args.preset]["vocab_size"], 32))
  cfg = from_dict(TrainConfig, {
    "algorithm": "grpo", "model": {**preset, "param_dtype": args.dtype, "dtype": args.dtype},
    "tokenizer": "builtin:digits", "run_dir": run_dir, "loss": {"params": {"beta": 0.04}},
    "data": {"format": "prompt", "train": ["synthetic:max"], "synthetic_size": [args.prompts * 4, args.prompts],
             "max_length": 16 + args.new_tokens, "max_prompt_length": 16, "batch_size": args.prompts},
    "rl": {"group_size": args.group, "max_new_tokens": args.new_tokens, "temperature": 1.0,
           "rewards": {"max_digit": 1.0}},
    "log": {"progress": False, "tensorboard": False}})
  return cfg, build_run(cfg)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=PRESETS, default="tiny")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--prompts", type=int, default=4)
  parser.add_argument("--group", type=int, default=4)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--peer-python", help="python of a venv with trl installed (runs bench/peers/trl_run.py)")
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    cfg, run = build(args, tmp)
    # decode never stops early here: EOS is set to an id the model cannot produce
    sampling = dataclasses.replace(online.sampling_config(cfg.rl, run.tokenizer), eos_token_id=-1)
    of = online.OnlineFns(run.fns, online.ALGORITHMS["grpo"], cfg.rl, sampling, None, True)
    prompts = run.next_batch()
    policy_of = lambda state: run.fns.policy(state.trainable, run.frozen)
    gen = jax.jit(lambda state, key: of.generate(policy_of(state), prompts, key, args.group))
    rollout = gen(run.state, jax.random.PRNGKey(0))
    rows = online.rollout_rows(rollout)
    old_pass = of.algorithm.needs_old_pass(cfg.rl)  # one optimiser step per rollout: the step skips it
    score = jax.jit(lambda state: (of.completion_logps(policy_of(state), rows, None)[0] if old_pass else None,
                                   of.completion_logps(run.fns.reference(run.frozen), rows, None)[0]))
    step = jax.jit(run.train_fn)
    with sharding.use_mesh(run.mesh):
      t_gen = time_call(gen, run.state, jax.random.PRNGKey(1), repeats=args.repeats)
      t_score = time_call(score, run.state, repeats=args.repeats)
      start_state = run.state
      jax.block_until_ready(step(start_state, prompts, run.frozen))
      times, metrics = [], None
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        _, metrics = step(start_state, prompts, run.frozen)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
      t_step = float(np.median(times))
    host = float(metrics["reward/host_seconds"])
    mcfg = run.model_config
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(run.state.trainable))
    num_rows, prompt_length = rollout.prompt_ids.shape
    kv_bytes = 2 * mcfg.num_layers * num_rows * (prompt_length + args.new_tokens) * mcfg.num_kv_heads * \
        mcfg.head_size * jnp.dtype(mcfg.dtype).itemsize
    bandwidth = memory_bandwidth(args.repeats)
    floor = args.new_tokens * (weight_bytes + kv_bytes) / bandwidth
    tokens = num_rows * args.new_tokens
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, model {args.preset} "
          f"{mcfg.num_params() / 1e6:.1f}M {args.dtype}; {args.prompts} prompts x {args.group} samples x "
          f"{args.new_tokens} new tokens; memory bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("| quantity | value |\n|---|---|")
    print(f"| decode tokens/s | {tokens / t_gen:,.0f} |")
    print(f"| generate time / memory-bound floor | {t_gen * 1e3:.1f} ms / {floor * 1e3:.1f} ms = {t_gen / floor:.1f}x |")
    print(f"| step: generate | {t_gen * 1e3:.1f} ms ({t_gen / t_step:.0%}) |")
    print(f"| step: score (reward {host * 1e3:.1f} ms on host + {'old/' if old_pass else ''}ref log-probs) | "
          f"{(t_score + host) * 1e3:.1f} ms ({(t_score + host) / t_step:.0%}) |")
    update = t_step - t_gen - t_score - host
    print(f"| step: update (remainder) | {update * 1e3:.1f} ms ({update / t_step:.0%}) |")
    print(f"| step total | {t_step * 1e3:.1f} ms |")
    if args.peer_python:
      model_dir = pathlib.Path(tmp) / "model"
      save_hf(nnx.merge(run.fns.graphdef, run.state.trainable), mcfg, model_dir, tokenizer=run.tokenizer)
      steps = args.repeats + 2
      hf = run_peer(args.peer_python, "trl", "decode", model_dir,
                    {"rows": num_rows, "prompt": prompt_length, "new_tokens": args.new_tokens, "steps": steps})
      print(f"| HF {hf['peer']} generate, same rows | {hf['seconds'] * 1e3:.1f} ms = "
            f"{tokens / hf['seconds']:,.0f} tokens/s (jaxalign decode {hf['seconds'] / t_gen:.2f}x faster) |")
      trl = run_peer(args.peer_python, "trl", "grpo", model_dir,
                     {"prompts": args.prompts, "group": args.group, "prompt": prompt_length,
                      "new_tokens": args.new_tokens, "steps": steps, "beta": 0.04})
      print(f"| {trl['peer']} GRPOTrainer step | {trl['seconds'] * 1e3:.1f} ms "
            f"(jaxalign {trl['seconds'] / t_step:.2f}x faster) |")


if __name__ == "__main__":
  main()
