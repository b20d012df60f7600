"""The whole GRPO step compiled for an 8-device FSDP mesh: generation runs in the decode layout (no weight
gathered inside the decode loop or whole anywhere in it), and generation's per-device footprint stays within
(weights + KV cache) / devices plus a stated working set."""

import jax
from flax import nnx

from jaxalign import plan as plan_lib
from jaxalign import sharding
from jaxalign.config import TrainConfig, from_dict
from jaxalign.models import CausalLM
from jaxalign.trainer import batch_shardings, online_fns

from compiled import arrays, computations, matrix_shapes, scoped_ops  # tests/compiled.py

PROMPTS, GROUP, PROMPT, NEW = 8, 3, 16, 16  # 24 rows: no weight dimension (or its 1/8) is 24
MOVES = ("all-gather", "all-to-all", "collective-permute")


def grpo_config(tmp_path, scan_layers: bool) -> TrainConfig:
  """Heads, KV heads, MLP width and vocab divide by 8: every weight splits over the whole mesh."""
  return from_dict(TrainConfig, {
    "algorithm": "grpo", "tokenizer": "builtin:digits", "run_dir": str(tmp_path),
    "model": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 256, "num_layers": 2, "num_heads": 8,
              "num_kv_heads": 8, "max_position_embeddings": 64, "remat": "none", "scan_layers": scan_layers},
    "data": {"format": "prompt", "train": ["synthetic:max"], "max_length": PROMPT + NEW, "max_prompt_length": PROMPT,
             "batch_size": PROMPTS},
    "rl": {"group_size": GROUP, "max_new_tokens": NEW, "top_k": 5}, "mesh": {"data": 1, "fsdp": 8, "tensor": 1}})


def test_rl_step_generates_without_moving_weights_and_within_weights_plus_cache_per_device(tmp_path):
  # scan_layers=false: without the decode layout XLA hoists whole-weight gathers out of the loop, the case the
  # step's HLO hides best (tests/rollout/test_decode_layout.py covers generation with scanned layers too).
  cfg = grpo_config(tmp_path, scan_layers=False)
  mesh = sharding.make_mesh(cfg.mesh)
  n = mesh.size
  run = plan_lib.abstract_run(cfg, cfg.model, mesh)
  host = plan_lib.example_batch(cfg)
  prompts = plan_lib._shaped(host, batch_shardings(host, mesh, cfg.mesh.rules, 0))
  with sharding.use_mesh(mesh, cfg.mesh.rules):
    step = jax.jit(run.train_fn).lower(run.state, prompts, run.frozen).compile()
  comps, _ = computations(step.as_text())
  abstract = nnx.state(nnx.eval_shape(lambda: CausalLM(cfg.model, rngs=nnx.Rngs(0))), nnx.Param)
  weights = matrix_shapes(abstract)
  generation = scoped_ops(comps, "decode_layout")
  loop = [op for op in generation if "/while/body" in op[3]]
  assert loop, "no generation loop found under the decode_layout scope"
  # A weight (or a shard of one) moved in the loop: a collective whose result has a weight's shape, whole or
  # with one dimension split n ways. The loop's activations ([24, 1, 64], a step's [24, 512] logits) have none.
  weightlike = weights | {s[:i] + (s[i] // n,) + s[i + 1:] for s in weights for i in range(len(s))}
  moved_in_loop = [(shape, op) for _, shape, op, _ in loop
                   if op.startswith(MOVES) and set(_shapes(shape)) & weightlike]
  assert moved_in_loop == []

  # Generation alone as the step runs it, from the FSDP-sharded trainable weights: no weight is gathered whole
  # anywhere (in the step, a gather hoisted out of the loop could be shared with the training passes).
  ctx = online_fns(run, [], None, None)
  key = jax.random.key(0)
  generate = jax.jit(lambda trainable, p: ctx.generate(ctx.policy(trainable, run.frozen), p, key, GROUP))
  with sharding.use_mesh(mesh, cfg.mesh.rules):
    compiled = generate.lower(run.state.trainable, prompts).compile()
  whole = [(shape, op) for ops in computations(compiled.as_text())[0].values() for shape, op, _ in ops
           if op.startswith("all-gather") and set(_shapes(shape)) & weights]
  assert whole == []
  memory = compiled.memory_analysis()
  m, f32 = cfg.model, 4
  leaves = jax.tree.leaves(run.state.trainable)
  weight_bytes = sum(x.size for x in leaves) * f32 * 2  # the float32 arguments and their compute-dtype copy
  rows, slots = PROMPTS * GROUP, PROMPT + NEW - 1
  cache = 2 * m.num_layers * rows * slots * m.num_kv_heads * m.head_size * f32
  working = (4 * PROMPTS * PROMPT * m.hidden_size * f32  # prefill hidden states, replicated over the TP devices
             + 2 * PROMPTS * (m.num_heads // n) * PROMPT**2 * f32  # prefill attention scores and probabilities
             + 2 * rows * PROMPT * m.num_kv_heads * m.head_size * f32  # the prefill cache repeated over the group
             + 4 * rows * m.vocab_size * f32  # a step's logits, sorted (top-k) and softmaxed
             + 4 * cache // (2 * m.num_layers * n))  # a few copies of one layer's K or V
  used = memory.argument_size_in_bytes + memory.temp_size_in_bytes
  assert used <= (weight_bytes + cache) // n + working, (used, (weight_bytes + cache) // n, working)


def _shapes(shape_text) -> list[tuple[int, ...]]:
  """The result's array shapes without their size-1 dimensions."""
  return [tuple(d for d in a if d != 1) for a in arrays(shape_text)]
