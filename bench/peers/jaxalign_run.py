"""jaxalign's side of bench/versus.py: one workload in its own process, on the model the driver saved.

  python bench/peers/jaxalign_run.py WORKLOAD MODEL_DIR '{"shape": ...}'

Workloads (shape keys as bench/peers/tunix_run.py reads them; token ids random, seed 0, float32):
- sft {batch, length, steps}: next-token loss on every token, AdamW lr 1e-5.
- dpo {pairs, prompt, response, steps}: DPO (beta 0.1) against the frozen reference, AdamW lr 1e-6; each prompt
  runs once for its chosen and rejected rows (`data.share_prompt`, the default; `--set data.share_prompt=false`:
  whole rows, as the peers run them).
- grpo {prompts, group, prompt, new_tokens, steps, beta}: the whole jitted RL step (generate, score, reference
  log-probs, one optimiser step: no old-policy pass), EOS never sampled; parts: generation, scoring (reward and
  reference) and update timed alone (the update is the step minus the other two).
- decode {rows, prompt, new_tokens, steps}: the sampler alone (temperature 1, decode layout) on the model
  loaded by itself (`load_hf`: no optimiser state or reference).
The others load the HF directory through `init_from`. Every workload runs `steps` steps, and reports the median of
the steps after the first two (compilation). The last stdout line is JSON: peer, workload, seconds, times,
parts (grpo), peak_rss_mb.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import sys
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

import jaxalign
from jaxalign import sharding
from jaxalign.algorithms import online
from jaxalign.config import TrainConfig, from_dict, set_key
from jaxalign.data import batching
from jaxalign.data.tokenize import Encoded
from jaxalign.models import load_hf
from jaxalign.rollout.decode_layout import generate_in_decode_layout
from jaxalign.rollout.sampler import SamplingConfig
from jaxalign.trainer import build_run, online_fns, put_batch

WARMUP = 2


def config(workload: str, model_dir: str, shape: dict, run_dir: str) -> TrainConfig:
  """The run's config (the saved model; batches are made here), with the driver's `--set` overrides."""
  data = config_dict(workload, model_dir, shape, run_dir)
  for key, value in shape.get("jaxalign_set", {}).items():
    set_key(data, key, yaml.safe_load(value))
  return from_dict(TrainConfig, data)


def config_dict(workload: str, model_dir: str, shape: dict, run_dir: str) -> dict:
  base = {"init_from": model_dir, "tokenizer": "builtin:digits", "run_dir": run_dir, "steps": 1000,
          "model": {"dtype": "float32", "param_dtype": "float32"},
          "log": {"progress": False, "tensorboard": False}, "checkpoint": {"export_hf": False}}
  if workload == "sft":
    data = {"format": "sft", "train": ["synthetic:sort"], "batch_size": shape["batch"],
            "max_length": shape["length"], "max_prompt_length": shape["length"] // 2}
    return {**base, "algorithm": "sft", "optim": {"lr": 1e-5}, "data": data}
  if workload == "dpo":
    data = {"format": "preference", "train": ["synthetic:sort"], "batch_size": shape["pairs"],
            "max_prompt_length": shape["prompt"], "max_length": shape["prompt"] + shape["response"]}
    return {**base, "algorithm": "preference", "loss": {"name": "dpo", "params": {"beta": 0.1}},
            "optim": {"lr": 1e-6}, "data": data}
  prompts = shape["prompts"]
  data = {"format": "prompt", "train": ["synthetic:max"], "batch_size": prompts,
          "max_prompt_length": shape["prompt"], "max_length": shape["prompt"] + shape["new_tokens"]}
  rl = {"group_size": shape["group"], "max_new_tokens": shape["new_tokens"], "temperature": 1.0}
  return {**base, "algorithm": "grpo", "loss": {"params": {"beta": shape.get("beta", 0.04)}}, "optim": {"lr": 1e-6},
          "data": data, "rl": rl}


def random_ids(shape, vocab: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(1, vocab, shape).astype(np.int32)


def offline_batch(workload: str, shape: dict, vocab: int, cfg: TrainConfig) -> dict:
  """[1 micro-batch, ...] host arrays of the workload's token shapes, collated as the data pipeline does
  (DPO: the chosen and rejected rows share their prompt, `data.share_prompt`)."""
  if workload == "sft":
    ids = random_ids((1, shape["batch"], shape["length"]), vocab)
    return {"input_ids": ids, "loss_mask": np.ones_like(ids), "segment_ids": np.ones_like(ids)}
  p, r = shape["prompt"], shape["response"]
  ids = random_ids((shape["pairs"], 1 + 2, max(p, r)), vocab)
  pairs = [Encoded(x[0, :p], (x[1, :r], x[2, :r])) for x in ids]
  batch = batching.collate_multi(pairs, cfg.data.bucket_lengths, share_prompt=cfg.data.share_prompt)
  return {k: v[None] for k, v in batch.items()}


def timed(fn, steps: int) -> list[float]:
  """Wall times of `steps` calls of fn (each blocks on its result)."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def run_offline(run, workload: str, shape: dict) -> dict:
  batch = offline_batch(workload, shape, run.model_config.vocab_size, run.cfg)
  batch = put_batch(batch, run.mesh, run.cfg.mesh.rules, 1)
  step = jax.jit(run.train_fn, donate_argnums=0)
  holder = {"state": run.state}

  def one():
    holder["state"], metrics = step(holder["state"], batch, run.frozen)
    return metrics["loss"]

  return {"times": timed(one, shape["steps"])}


def rl_prompts(run, shape: dict) -> dict:
  rows, p = shape["prompts"], shape["prompt"]
  replicated = jax.sharding.NamedSharding(run.mesh, jax.P())
  host = {"prompt_ids": random_ids((rows, p), run.model_config.vocab_size), "prompt_mask": np.ones((rows, p), np.int32),
          "uid": np.arange(rows, dtype=np.int32)}
  return jax.device_put(host, replicated)


def run_grpo(run, shape: dict) -> dict:
  # EOS is an id the model cannot produce: every row generates exactly new_tokens tokens, as on the peer's side.
  sampling = dataclasses.replace(online.sampling_config(run.cfg.rl, run.tokenizer), eos_token_id=-1)
  prompts = rl_prompts(run, shape)
  # The rule reward runs on the host (one callback), as the peers' reward functions do.
  answers = [types.SimpleNamespace(uid=int(uid), answer="9") for uid in prompts["uid"]]
  ctx = dataclasses.replace(online_fns(run, answers, None, None), sampling=sampling)
  group = shape["group"]
  policy = lambda state: ctx.policy(state.trainable, run.frozen)
  step = jax.jit(online.make_rl_step(ctx), donate_argnums=0)
  holder = {"state": jax.tree.map(jnp.copy, run.state)}

  def one():
    holder["state"], metrics = step(holder["state"], prompts, run.frozen)
    return metrics["loss"]

  times = timed(one, shape["steps"])  # the whole step first: the process's peak memory is the step's compilation
  generate = jax.jit(lambda state, key: ctx.generate(policy(state), prompts, key, group))
  rollout = generate(run.state, jax.random.key(0))
  rows = online.rollout_rows(rollout)
  uid = jnp.repeat(prompts["uid"], group)
  old_pass = ctx.algorithm.needs_old_pass(ctx.rl)  # one optimiser step per rollout: the step skips it
  logps = ctx.with_shared_prompts().completion_logps  # as the step runs them: each prompt once per group
  score = jax.jit(lambda state: (ctx.scores(run.frozen, uid, rollout, rows)[0],
                                 logps(policy(state), rows, None)[0] if old_pass else None,
                                 logps(ctx.fns.reference(run.frozen), rows, None)[0]))
  parts = {"generate": statistics.median(timed(lambda: generate(run.state, jax.random.key(1)), shape["steps"])[WARMUP:]),
           "score": statistics.median(timed(lambda: score(run.state), shape["steps"])[WARMUP:])}
  parts["update"] = statistics.median(times[WARMUP:]) - parts["generate"] - parts["score"]
  return {"times": times, "parts": parts}


def run_decode(model_dir: str, shape: dict) -> dict:
  """The sampler alone on the loaded model (no optimiser state, no reference), as `generate` runs it in the
  step (the decode layout)."""
  mesh = sharding.make_mesh(sharding.MeshConfig())
  model, _ = load_hf(model_dir, mesh=mesh)
  sampling = SamplingConfig(max_new_tokens=shape["new_tokens"], temperature=1.0, eos_token_id=-1)
  ids = jnp.asarray(random_ids((shape["rows"], shape["prompt"]), model.config.vocab_size))
  mask = jnp.ones_like(ids)
  graphdef, state = nnx.split(model)  # jitted over the weights, as the training step runs it (`nnx.jit` on the
  # module itself kept ~0.4 GB more resident on the 56M model)
  with sharding.use_mesh(mesh):
    generate = jax.jit(lambda state, key: generate_in_decode_layout(nnx.merge(graphdef, state), ids, mask, key,
                                                                    sampling).tokens)
    return {"times": timed(lambda: generate(state, jax.random.key(0)), shape["steps"])}


def main():
  workload, model_dir, shape = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
  if workload == "decode":
    result = run_decode(model_dir, shape)
  with tempfile.TemporaryDirectory() as tmp:
    if workload != "decode":
      run = build_run(config(workload, model_dir, shape, tmp))
      with sharding.use_mesh(run.mesh, run.cfg.mesh.rules):
        result = run_offline(run, workload, shape) if workload in ("sft", "dpo") else run_grpo(run, shape)
  times = result["times"]
  print(json.dumps({"peer": f"jaxalign {jaxalign.__version__}", "workload": workload,
                    "seconds": statistics.median(times[WARMUP:]), "times": times, "parts": result.get("parts", {}),
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
  main()
