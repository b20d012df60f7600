"""GRPO step: decode tokens/s against the memory-bound floor, and the generate / score / update split.

  python bench/rl_step.py                                            # tiny model, CPU
  python bench/rl_step.py --peer-python /path/to/trl-venv/bin/python   # + TRL GRPOTrainer, same model/shape
  python bench/rl_step.py --preset 1b --dtype bfloat16 --prompts 8 --group 8 --new-tokens 256   # GPU anchor

Decode floor: each decode step must read the weights and the KV cache once, so
floor = new_tokens * (weight bytes + KV-cache bytes) / measured memory bandwidth (a large copy on this device).
The split times `generate` alone, the scoring (reward + old/reference log-prob passes) alone, and the whole
jitted step; the update is the remainder.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from model_throughput import PRESETS, time_call  # noqa: E402

from jaxalign import sharding  # noqa: E402
from jaxalign.algorithms import online  # noqa: E402
from jaxalign.config import TrainConfig, from_dict  # noqa: E402
from jaxalign.models import save_hf  # noqa: E402
from jaxalign.rollout import generate  # noqa: E402
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
  parser.add_argument("--peer-python", help="python of a venv with trl installed (runs bench/peers/trl_grpo.py)")
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    cfg, run = build(args, tmp)
    of = online.OnlineFns(run.fns, online.ALGORITHMS["grpo"], cfg.rl, cfg.rl.sampling(run.tokenizer), None, True)
    prompts = run.next_batch()
    ids = jnp.repeat(prompts["prompt_ids"], args.group, axis=0)
    mask = jnp.repeat(prompts["prompt_mask"], args.group, axis=0)
    policy_of = lambda state: run.fns.policy(state.trainable, run.frozen)
    # decode never stops early here: EOS is set to an id the model cannot produce
    sampling = cfg.rl.sampling(run.tokenizer).__class__(**{**cfg.rl.sampling(run.tokenizer).__dict__,
                                                           "eos_token_id": -1})
    gen = jax.jit(lambda state, key: generate(policy_of(state), ids, mask, key, sampling))
    rollout = gen(run.state, jax.random.PRNGKey(0))
    rows = online.rollout_rows(rollout.prompt_ids, rollout.prompt_mask, rollout.tokens, rollout.mask)
    score = jax.jit(lambda state: (of.completion_logps(policy_of(state), rows)[0],
                                   of.completion_logps(run.fns.reference(run.frozen), rows)[0]))
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
    seq = ids.shape[1] + args.new_tokens
    kv_bytes = 2 * mcfg.num_layers * ids.shape[0] * seq * mcfg.num_kv_heads * mcfg.head_size * \
        jnp.dtype(mcfg.dtype).itemsize
    bandwidth = memory_bandwidth(args.repeats)
    floor = args.new_tokens * (weight_bytes + kv_bytes) / bandwidth
    tokens = ids.shape[0] * args.new_tokens
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, model {args.preset} "
          f"{mcfg.num_params() / 1e6:.1f}M {args.dtype}; {args.prompts} prompts x {args.group} samples x "
          f"{args.new_tokens} new tokens; memory bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("| quantity | value |\n|---|---|")
    print(f"| decode tokens/s | {tokens / t_gen:,.0f} |")
    print(f"| generate time / memory-bound floor | {t_gen * 1e3:.1f} ms / {floor * 1e3:.1f} ms = {t_gen / floor:.1f}x |")
    print(f"| step: generate | {t_gen * 1e3:.1f} ms ({t_gen / t_step:.0%}) |")
    print(f"| step: score (reward {host * 1e3:.1f} ms on host + old/ref log-probs) | "
          f"{(t_score + host) * 1e3:.1f} ms ({(t_score + host) / t_step:.0%}) |")
    update = t_step - t_gen - t_score - host
    print(f"| step: update (remainder) | {update * 1e3:.1f} ms ({update / t_step:.0%}) |")
    print(f"| step total | {t_step * 1e3:.1f} ms |")
    if args.peer_python:
      save_hf(nnx.merge(run.fns.graphdef, run.state.trainable), mcfg, pathlib.Path(tmp) / "model",
              tokenizer=run.tokenizer)
      script = pathlib.Path(__file__).parent / "peers" / "trl_grpo.py"
      out = subprocess.run([args.peer_python, str(script), str(pathlib.Path(tmp) / "model"), str(args.prompts),
                            str(args.group), str(args.new_tokens), str(args.repeats)], capture_output=True, text=True)
      if out.returncode:
        raise SystemExit(f"peer failed:\n{out.stderr[-3000:]}")
      peer = json.loads(out.stdout.strip().splitlines()[-1])
      print(f"| TRL {peer['version']} GRPOTrainer step | {peer['seconds'] * 1e3:.1f} ms "
            f"(jaxalign {peer['seconds'] / t_step:.2f}x faster) |")


if __name__ == "__main__":
  main()
