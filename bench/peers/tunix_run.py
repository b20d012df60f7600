"""Peer timing worker for Google's Tunix (runs in Tunix's own virtual environment, CPU, float32).

  python tunix_run.py WORKLOAD MODEL_DIR '{"shape": ...}'
The last stdout line is JSON: {"peer", "workload", "seconds" (median of the timed steps), "times",
"parts" (grpo only), "peak_rss_mb"}. The first 2 steps are warm-up (compilation) and are not reported.

Model: tunix.models.llama3 (Llama3 + ModelConfig mapped from the HF config.json), weights read from
MODEL_DIR/*.safetensors by Tunix's own loader (llama3.params.create_model_from_safe_tensors), placed on
a 1-device ("fsdp", "tp") mesh. Token ids: numpy default_rng(0) integers in [1, vocab_size - 1].

Workloads (every step gets a fresh random batch):
- sft:    tunix.sft.peft_trainer.PeftTrainer, full fine-tuning (no LoRA), its default next-token loss
          on all tokens (input_mask all ones), optax.adamw(1e-5), trainer.train() over `steps` batches.
- dpo:    tunix.sft.dpo.dpo_trainer.DPOTrainer, pre-tokenised TrainingInput (prompt/chosen/rejected,
          masks all ones), reference = a second copy loaded from the same files, beta 0.1,
          optax.adamw(1e-6). The reference forward pass runs inside the timed step (Tunix's _prepare_inputs).
- grpo:   tunix.rl.grpo.grpo_learner.GRPOLearner on an RLCluster (rollout engine "vanilla", i.e.
          tunix.generate.sampler.Sampler; actor, rollout and reference on the same mesh, the rollout
          sharing the actor's weights), num_generations=group, num_iterations=1, mini batch = the
          whole batch (one optimizer update per rollout), beta from the shapes, optax.adamw(1e-6),
          temperature 1.0 (top_p 1.0, no top_k), kv cache = prompt + new_tokens. Reward (host): fraction
          of completion tokens with an even id.
- decode: tunix.generate.sampler.Sampler called on `rows` prompts, max_generation_steps=new_tokens,
          temperature 1.0 / top_p 1.0 (plain categorical sampling), kv cache = prompt + new_tokens,
          seed = step index; each call is timed (it returns host-side tokens and text).

Timing: for sft/dpo/grpo the trainer's own loop runs; the data iterator blocks on the model's
parameters (jax.block_until_ready) and takes a timestamp each time the loop asks for the next batch,
plus once when the loop asks past the last batch, so each interval is one whole step, finished on the
device. GRPO parts come from Tunix's perf tracer (PerfMetricsConfig.custom_export_fn, device spans):
generate = "rollout", score = "refer_inference" (reference per-token log-probs; no old-policy pass
with num_iterations 1, rewards/advantages are host work not included), update = "peft_train_step".

Deviations / notes:
- Tunix generates from text through a tokenizer. No tokenizer is used: IdTokenizer maps whitespace-
  separated decimal ids <-> token ids (no BOS), with eos_id = vocab_size and pad_id = vocab_size + 1,
  both outside the vocabulary, so sampling can never stop early and no sampled token is masked as
  padding; every completion has exactly new_tokens tokens (checked).
- Tunix's Llama3 attention ignores ModelConfig.rope_theta (apply_rope uses its default 1e6); the HF
  value is still passed. This changes numerics only, not cost.
- Tunix's sampler runs new_tokens decode iterations after the prefill (the last one's token is dropped).
- optax.adamw uses its default weight decay (1e-4).
- The mesh has Auto axis types (jax.make_mesh now defaults to Explicit, which Tunix's sharding
  constraints reject) and is entered with the legacy `with mesh:` as Tunix's own RLCluster does
  (JAX prints a DeprecationWarning on stderr).
- GRPO runs with Tunix's v1 perf tracer on (one waiter thread per device span) to get the parts.
"""

import importlib.metadata
import json
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tunix.generate import sampler as sampler_lib
from tunix.models.llama3 import model as llama_lib
from tunix.models.llama3 import params as llama_params
from tunix.perf import metrics as perf_metrics
from tunix.perf import span as perf_span
from tunix.perf import trace as perf_trace
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner
from tunix.rl.rollout import base_rollout
from tunix.sft import peft_trainer
from tunix.sft import utils as sft_utils
from tunix.sft.dpo import dpo_trainer

WARMUP = 2
PEER = f"tunix {importlib.metadata.version('google-tunix')}"


class IdTokenizer:
  """Text of whitespace-separated ids <-> ids; eos/pad lie outside the vocabulary (never sampled)."""

  def __init__(self, vocab_size):
    self.vocab_size = vocab_size

  def encode(self, text, **_):
    return [int(t) for t in text.split()]

  def decode(self, ids, **_):
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return 0  # falsy: Tunix prepends no BOS

  def eos_id(self):
    return self.vocab_size

  def pad_id(self):
    return self.vocab_size + 1


def load_model(model_dir, mesh):
  """Tunix Llama3 with the HF config mapped onto its ModelConfig, weights from Tunix's loader."""
  with open(os.path.join(model_dir, "config.json")) as f:
    hf = json.load(f)
  rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 500_000)
  config = llama_lib.ModelConfig(
      num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
      hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
      head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
      num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
      rope_theta=int(rope), norm_eps=hf["rms_norm_eps"],
      weight_tying=bool(hf.get("tie_word_embeddings", False)))
  model = llama_params.create_model_from_safe_tensors(model_dir, config, mesh=mesh, dtype=jnp.float32)
  return model, config


def token_ids(rng, vocab_size, shape):
  return rng.integers(1, vocab_size, size=shape, dtype=np.int32)


def params_ready(model):
  return lambda: jax.block_until_ready(nnx.state(model, nnx.Param))


def timed_batches(batches, ready):
  """Yields the batches; before each one and once after the last, waits for `ready` and stamps time."""
  stamps = []

  def gen():
    for batch in batches:
      ready()
      stamps.append(time.perf_counter())
      yield batch
    ready()
    stamps.append(time.perf_counter())

  return gen(), stamps


def step_times(stamps):
  return [b - a for a, b in zip(stamps, stamps[1:])]


def sft_model_inputs(x):
  return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
          "positions": sft_utils.build_positions_from_mask(x.input_mask),
          "attention_mask": sft_utils.make_causal_attn_mask(x.input_mask)}


def run_sft(model_dir, s, mesh):
  model, cfg = load_model(model_dir, mesh)
  rng = np.random.default_rng(0)
  shape = (s["batch"], s["length"])
  batches = [peft_trainer.TrainingInput(input_tokens=token_ids(rng, cfg.vocab_size, shape),
                                        input_mask=np.ones(shape, np.bool_)) for _ in range(s["steps"])]
  config = peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=None)
  trainer = peft_trainer.PeftTrainer(model, optax.adamw(1e-5), config)
  trainer = trainer.with_gen_model_input_fn(sft_model_inputs)
  data, stamps = timed_batches(batches, params_ready(trainer.model))
  with mesh:
    trainer.train(data)
  return step_times(stamps), None


def run_dpo(model_dir, s, mesh):
  model, cfg = load_model(model_dir, mesh)
  reference, _ = load_model(model_dir, mesh)
  rng = np.random.default_rng(0)
  n, p, r = s["pairs"], s["prompt"], s["response"]
  ones = lambda k: np.ones((n, k), np.int32)
  batches = [dpo_trainer.TrainingInput(
      prompt_ids=token_ids(rng, cfg.vocab_size, (n, p)), prompt_mask=ones(p),
      chosen_ids=token_ids(rng, cfg.vocab_size, (n, r)), chosen_mask=ones(r),
      rejected_ids=token_ids(rng, cfg.vocab_size, (n, r)), rejected_mask=ones(r))
             for _ in range(s["steps"])]
  config = dpo_trainer.DPOTrainingConfig(eval_every_n_steps=10**9, max_steps=None, beta=0.1)
  trainer = dpo_trainer.DPOTrainer(model, reference, optax.adamw(1e-6), config)
  data, stamps = timed_batches(batches, params_ready(trainer.model))
  with mesh:
    trainer.train(data)
  return step_times(stamps), None


def even_fraction_reward(prompts, completions, **_):
  del prompts
  return [float(np.mean([int(t) % 2 == 0 for t in c.split()])) if c else 0.0 for c in completions]


class DeviceSpans:
  """Keeps the perf tracer's query and sums device-span durations per global step."""

  def __init__(self):
    self.query = None

  def export(self, query):
    self.query = query
    return {}

  def per_step(self, tracer):
    tracer.synchronize()
    device = perf_trace.create_device_timeline_id(jax.devices()[0])
    groups = self.query().timeline(device).all_groups("global_step").get()
    return [self._sum_spans(g, {}) for g in groups]

  def _sum_spans(self, group, totals):
    for item in group.inner:
      if isinstance(item, perf_span.SpanGroup):
        self._sum_spans(item, totals)
      else:
        totals[item.name] = totals.get(item.name, 0.0) + item.duration
    return totals


def grpo_cluster(model_dir, s, mesh, spans):
  actor, cfg = load_model(model_dir, mesh)
  reference, _ = load_model(model_dir, mesh)
  p, n = s["prompt"], s["new_tokens"]
  rollout = base_rollout.RolloutConfig(max_tokens_to_generate=n, max_prompt_length=p, kv_cache_size=p + n,
                                       temperature=1.0, top_p=1.0, top_k=None)
  training = rl_cluster_lib.RLTrainingConfig(
      actor_optimizer=optax.adamw(1e-6), eval_every_n_steps=10**9,
      max_steps=s["steps"] + 1,  # never reached: the loop ends when the prompt iterator runs out
      mini_batch_size=s["prompts"])
  roles = rl_cluster_lib.Role
  cluster_config = rl_cluster_lib.ClusterConfig(
      role_to_mesh={roles.ACTOR: mesh, roles.REFERENCE: mesh, roles.ROLLOUT: mesh},
      rollout_engine="vanilla", offload_to_cpu=False, training_config=training, rollout_config=rollout)
  cluster = rl_cluster_lib.RLCluster(
      actor=actor, reference=reference, tokenizer=IdTokenizer(cfg.vocab_size), cluster_config=cluster_config,
      perf_config=perf_metrics.PerfMetricsConfig(custom_export_fn=spans.export))
  return cluster, cfg


def run_grpo(model_dir, s, mesh):
  spans = DeviceSpans()
  cluster, cfg = grpo_cluster(model_dir, s, mesh, spans)
  algo = grpo_learner.GRPOConfig(num_generations=s["group"], num_iterations=1, beta=s["beta"])
  lengths = []

  def record_lengths(completions, **_):  # checks that EOS never stopped a completion early
    lengths.extend(len(c.split()) for c in completions)
    return {}

  learner = grpo_learner.GRPOLearner(cluster, algo, reward_fns=even_fraction_reward,
                                     metric_fns=[record_lengths])
  rng = np.random.default_rng(0)
  batches = [{"prompts": np.array([" ".join(map(str, row)) for row in
                                   token_ids(rng, cfg.vocab_size, (s["prompts"], s["prompt"]))])}
             for _ in range(s["steps"])]
  data, stamps = timed_batches(batches, params_ready(cluster.actor_trainer.model))
  learner.train(data)
  assert set(lengths) == {s["new_tokens"]}, f"completion lengths {sorted(set(lengths))}"
  per_step = spans.per_step(cluster.perf)[WARMUP:s["steps"]]
  names = {"generate": "rollout", "score": "refer_inference", "update": "peft_train_step"}
  parts = {k: statistics.median(step.get(v, 0.0) for step in per_step) for k, v in names.items()}
  return step_times(stamps), parts


def run_decode(model_dir, s, mesh):
  model, cfg = load_model(model_dir, mesh)
  p, n = s["prompt"], s["new_tokens"]
  cache = sampler_lib.CacheConfig(cache_size=p + n, num_layers=cfg.num_layers,
                                  num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
  sampler = sampler_lib.Sampler(model, IdTokenizer(cfg.vocab_size), cache)
  rng = np.random.default_rng(0)
  times = []
  with mesh:
    for step in range(s["steps"]):
      prompts = [" ".join(map(str, row)) for row in token_ids(rng, cfg.vocab_size, (s["rows"], p))]
      start = time.perf_counter()
      out = sampler(prompts, max_generation_steps=n, max_prompt_length=p,
                    temperature=1.0, top_p=1.0, seed=step)
      times.append(time.perf_counter() - start)
      assert all(len(t) == n for t in out.tokens), [len(t) for t in out.tokens]
  return times, None


WORKLOADS = {"sft": run_sft, "dpo": run_dpo, "grpo": run_grpo, "decode": run_decode}


def main():
  workload, model_dir, shapes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
  auto = jax.sharding.AxisType.Auto  # Tunix shards with with_sharding_constraint, which needs Auto axes
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(auto, auto), devices=jax.devices()[:1])
  times, parts = WORKLOADS[workload](model_dir, shapes, mesh)
  timed = times[WARMUP:] if len(times) > WARMUP else times
  result = {"peer": PEER, "workload": workload, "seconds": statistics.median(timed), "times": timed}
  if parts:
    result["parts"] = parts
  result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
