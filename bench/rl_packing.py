"""The training passes of a GRPO step (old-policy and reference log-probs, then the update) on padded vs
packed rollout rows, with HH-RLHF's prompt and response lengths.

  python bench/rl_packing.py                                         # tiny model, CPU
  python bench/rl_packing.py --preset 1b --dtype bfloat16 --prompts 16 --group 8 --new-tokens 1024   # GPU

The rollout is built, not sampled (a random model's completions have no realistic lengths): each prompt is an
HH-RLHF prompt's token count (left-truncated to --max-prompt-length), each of its --group completions an HH-RLHF
response's (chosen or rejected of a random example; cut at --new-tokens, then it counts as truncated), with
random token ids. Both layouts run `online.step.learn` (what the jitted RL step runs after scoring), jitted, on
the same rollout; `rl.pack_ratio` / `rl.pack_length` are the packed layout's settings. Real tokens are the
non-padding ones of the rollout rows; tokens/s counts only those. Data: $JAXALIGN_DATA or ../shared/data,
tokenised with its GPT-2 tokenizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from model_throughput import PRESETS, time_call  # noqa: E402
from packing import SUBSETS, data_dir  # noqa: E402

from jaxalign import sharding  # noqa: E402
from jaxalign.algorithms.online.step import learn  # noqa: E402
from jaxalign.config import TrainConfig, from_dict  # noqa: E402
from jaxalign.data import parse_records, read_records  # noqa: E402
from jaxalign.rollout.sampler import Rollout  # noqa: E402
from jaxalign.trainer import build_run, online_fns  # noqa: E402


def hh_lengths(args) -> tuple[np.ndarray, np.ndarray]:
  """Token counts of HH-RLHF prompts and of its responses (chosen and rejected)."""
  root = data_dir()
  tokenizer = tokenizers.Tokenizer.from_file(str(root / "tokenizers/gpt2/tokenizer.json"))
  examples = []
  for subset in args.subset:
    examples += parse_records(read_records(str(root / "hh_rlhf" / subset / "test.jsonl.gz")), "preference")[0]
  examples = examples[:args.limit] if args.limit else examples
  count = lambda texts: np.array([len(e.ids) for e in tokenizer.encode_batch(texts)])
  return count([e.prompt for e in examples]), count([r for e in examples for r in e.responses])


def rollout_of(args, prompt_lengths, response_lengths, eos: int) -> tuple[Rollout, jax.Array]:
  """A rollout with HH-RLHF lengths, and random rewards [R]."""
  rng = np.random.default_rng(0)
  rows, p, n = args.prompts * args.group, args.max_prompt_length, args.new_tokens
  prompt = np.minimum(np.repeat(rng.choice(prompt_lengths, args.prompts), args.group), p)
  response = rng.choice(response_lengths, rows) + 1  # + EOS
  finished = response <= n
  completion = np.minimum(response, n)
  prompt_mask = np.arange(p)[None] >= p - prompt[:, None]
  mask = np.arange(n)[None] < completion[:, None]
  tokens = rng.integers(1, eos, (rows, n)) * mask
  tokens[np.arange(rows)[finished], completion[finished] - 1] = eos
  rollout = Rollout(prompt_ids=jnp.asarray(rng.integers(1, eos, (rows, p)) * prompt_mask, jnp.int32),
                    prompt_mask=jnp.asarray(prompt_mask, jnp.int32), tokens=jnp.asarray(tokens, jnp.int32),
                    mask=jnp.asarray(mask, jnp.int32), logprobs=jnp.zeros((rows, n), jnp.float32),
                    finished=jnp.asarray(finished), logit_floor=jnp.full((rows, n), -jnp.inf, jnp.float32))
  return rollout, jnp.asarray(rng.random(rows), jnp.float32)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=PRESETS, default="tiny")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--subset", nargs="+", choices=SUBSETS, default=["helpful-base"])
  parser.add_argument("--limit", type=int, default=0, help="examples read (0: all)")
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--group", type=int, default=4)
  parser.add_argument("--max-prompt-length", type=int, default=256)
  parser.add_argument("--new-tokens", type=int, default=256)
  parser.add_argument("--minibatches", type=int, default=2)
  parser.add_argument("--pack-ratio", type=float, default=0.6, help="rl.pack_ratio of the packed layout")
  parser.add_argument("--pack-length", type=int, default=0, help="rl.pack_length of the packed layout")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  prompt_lengths, response_lengths = hh_lengths(args)
  with tempfile.TemporaryDirectory() as tmp:
    cfg = from_dict(TrainConfig, {
      "algorithm": "grpo", "model": {**PRESETS[args.preset], "dtype": args.dtype, "param_dtype": args.dtype,
                                     "max_position_embeddings": args.max_prompt_length + args.new_tokens},
      "tokenizer": "builtin:digits", "run_dir": tmp, "loss": {"params": {"beta": 0.04}},
      "data": {"format": "prompt", "train": ["synthetic:max"], "batch_size": args.prompts,
               "max_prompt_length": args.max_prompt_length, "max_length": args.max_prompt_length + args.new_tokens},
      "rl": {"group_size": args.group, "max_new_tokens": args.new_tokens, "minibatches": args.minibatches},
      "log": {"progress": False, "tensorboard": False}})
    run = build_run(cfg)
  ctx = online_fns(run, [], None, None)
  eos = run.model_config.vocab_size - 1
  rollout, scores = rollout_of(args, prompt_lengths, response_lengths, eos)
  uid = jnp.zeros(scores.shape, jnp.int32)
  group_ids = jnp.repeat(jnp.arange(args.prompts), args.group)
  real = int(jnp.sum(rollout.prompt_mask) + jnp.sum(rollout.mask))
  layouts = {"padded": dataclasses.replace(cfg.rl, pack_ratio=0.0),
             "packed": dataclasses.replace(cfg.rl, pack_ratio=args.pack_ratio, pack_length=args.pack_length)}
  results = {}
  with sharding.use_mesh(run.mesh, cfg.mesh.rules):
    for name, rl in layouts.items():
      layout = dataclasses.replace(ctx, rl=rl)
      keys = (jax.random.key(1), jax.random.key(2))
      passes = jax.jit(lambda state, c=layout: learn(c, state, run.frozen, rollout, uid, scores, group_ids, keys)[2])
      seconds = time_call(passes, run.state, repeats=args.repeats)
      metrics = passes(run.state)
      results[name] = (seconds, metrics)

  slots = rollout.mask.size + rollout.prompt_mask.size
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}; model {args.preset} "
        f"{run.model_config.num_params() / 1e6:.1f}M {args.dtype}; GRPO (beta 0.04: reference pass), {args.prompts} "
        f"prompts x {args.group} = {scores.size} rows of {args.max_prompt_length} + {args.new_tokens} tokens, "
        f"{args.minibatches} minibatches; HH-RLHF {'+'.join(args.subset)} lengths (padding {1 - real / slots:.1%}); "
        f"median of {args.repeats}")
  print("| layout | packed passes (scoring, update) | fill of the rows | old + ref + update ms | tokens/s (real) |\n"
        "|---|---|---|---|---|")
  for name, (seconds, m) in results.items():
    applied = (f"{float(m['packing/scoring_packed_fraction']):.0%}, {float(m['packing/update_packed_fraction']):.0%}"
               if "packing/scoring_packed_fraction" in m else "-")
    fill = float(m["packing/update_pack_fill"]) if "packing/update_pack_fill" in m else real / slots
    print(f"| {name} | {applied} | {fill:.1%} | {seconds * 1e3:.1f} | {real / seconds:,.0f} |")
  (padded, _), (packed, _) = results["padded"], results["packed"]
  print(f"\npacked / padded tokens/s: {padded / packed:.2f}x (rl.pack_ratio={args.pack_ratio}, "
        f"rl.pack_length={args.pack_length or 'P + N'})")


if __name__ == "__main__":
  main()
