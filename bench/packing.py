"""DPO step throughput with padded vs packed preference batches, on HH-RLHF's length distribution.

  python bench/packing.py                                   # tests' tiny model, CPU-sized
  python bench/packing.py --preset small --dtype bfloat16 --batch-size 32 --max-length 1024 --batches 16  # GPU

Both layouts train through the real path: `trainer.build_run` (data.packing false / true, the same examples in
the same order), `make_train_step` jitted, batches from `run.train_data` via `stack_micro_batches` / `put_batch`.
Every batch shape is compiled in a warm-up pass over the batches, then passes over the same batches are
timed (median). Real tokens are the non-padding ones (prompt + response of every sequence, the prompt counted
once per response, as the model processes it); tokens/s counts only those. Data: $JAXALIGN_DATA or
../shared/data (see its README), tokenised with its GPT-2 tokenizer.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from model_throughput import PRESETS  # noqa: E402

from jaxalign.algorithms.step import make_train_step  # noqa: E402
from jaxalign.config import TrainConfig, from_dict  # noqa: E402
from jaxalign.data import batching  # noqa: E402
from jaxalign.trainer import build_run, put_batch, stack_micro_batches  # noqa: E402

# The tests' model (tests/train/conftest.py): what a 2-core CPU runs in seconds.
PRESETS = {"test": dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2), **PRESETS}
SUBSETS = ("helpful-base", "harmless-base", "helpful-rejection-sampled")


def data_dir() -> pathlib.Path:
  default = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
  path = pathlib.Path(os.environ.get("JAXALIGN_DATA", default))
  if not path.is_dir():
    raise SystemExit(f"shared data folder {path} not found; set JAXALIGN_DATA")
  return path


def config(args, packing: bool, run_dir: str) -> TrainConfig:
  root = data_dir()
  model = {**PRESETS[args.preset], "vocab_size": 50304, "max_position_embeddings": args.max_length,
           "dtype": args.dtype, "param_dtype": args.dtype, "remat": args.remat}
  return from_dict(TrainConfig, {
    "algorithm": "preference", "loss": {"name": "dpo"}, "model": model,
    "tokenizer": str(root / "tokenizers/gpt2/tokenizer.json"), "run_dir": run_dir, "steps": 1000,
    "data": {"format": "preference", "train": [str(root / "hh_rlhf" / s / "test.jsonl.gz") for s in args.subset],
             "max_length": args.max_length, "max_prompt_length": args.max_prompt_length,
             "batch_size": args.batch_size, "packing": packing, "limit": args.limit, "eval_fraction": 0.01},
    "optim": {"lr": 1e-5}, "logprob_impl": args.impl, "checkpoint": {"export_hf": False},
    "log": {"progress": False, "tensorboard": False},
  })


def layout_stats(batches: list[dict]) -> dict:
  """Rows per batch, row length(s), padding fraction and real tokens of host batches."""
  rows = [int(np.prod(b["input_ids"].shape[:-1])) for b in batches]
  slots = sum(b["input_ids"].size for b in batches)
  real = sum(int(np.sum(b["segment_ids"] != 0)) for b in batches)
  lengths = sorted({b["input_ids"].shape[-1] for b in batches})
  shapes = len({b["input_ids"].shape for b in batches})
  return {"rows": float(np.mean(rows)), "lengths": lengths, "padding": 1 - real / slots, "real": real,
          "shapes": shapes}


def measure(args, packing: bool) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    run = build_run(config(args, packing, tmp))
  rules = run.cfg.mesh.rules
  host = [next(run.train_data) for _ in range(args.batches)]
  stats = layout_stats(host)
  device = [put_batch(stack_micro_batches(batching.equal_packed_rows([b])), run.mesh, rules, 1) for b in host]
  step = jax.jit(make_train_step(run.fns), donate_argnums=0)
  state = run.state

  def one_pass(state):
    for batch in device:
      state, metrics = step(state, batch, run.frozen)
    jax.block_until_ready(metrics["loss"])
    return state

  start = time.perf_counter()
  state = one_pass(state)  # compiles every shape
  stats["compile_s"] = time.perf_counter() - start
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    state = one_pass(state)
    times.append(time.perf_counter() - start)
  stats["seconds"] = float(np.median(times))
  stats["tokens_per_s"] = stats["real"] / stats["seconds"]
  return stats


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=PRESETS, default="test", help="model size (vocab: GPT-2's, 50304)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--remat", default="none")
  parser.add_argument("--subset", nargs="+", choices=SUBSETS, default=["helpful-base"])
  parser.add_argument("--limit", type=int, default=400, help="examples read (0: all)")
  parser.add_argument("--batch-size", type=int, default=8, help="pairs per batch")
  parser.add_argument("--max-length", type=int, default=512)
  parser.add_argument("--max-prompt-length", type=int, default=384)
  parser.add_argument("--batches", type=int, default=6, help="distinct batches per pass")
  parser.add_argument("--repeats", type=int, default=3, help="timed passes")
  parser.add_argument("--impl", default="auto", help="token_logprobs implementation")
  args = parser.parse_args()

  results = {name: measure(args, packing) for name, packing in (("padded", False), ("packed", True))}
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}; model {args.preset} "
        f"{args.dtype}; DPO, {args.batch_size} pairs per batch, max_length {args.max_length}, HH-RLHF "
        f"{'+'.join(args.subset)}; {args.batches} batches, median of {args.repeats} passes")
  print("| layout | rows per batch | row length | shapes | padding | real tokens / batch | step ms | "
        "tokens/s (real) |\n|---|---|---|---|---|---|---|---|")
  for name, r in results.items():
    print(f"| {name} | {r['rows']:.1f} | {'/'.join(map(str, r['lengths']))} | {r['shapes']} | {r['padding']:.1%} | "
          f"{r['real'] / args.batches:,.0f} | {r['seconds'] / args.batches * 1e3:.1f} | {r['tokens_per_s']:,.0f} |")
  padded, packed = results["padded"], results["packed"]
  assert padded["real"] == packed["real"], "the two layouts saw different examples"
  print(f"\npacked / padded: rows {packed['rows'] / padded['rows']:.2f}x, tokens/s "
        f"{packed['tokens_per_s'] / padded['tokens_per_s']:.2f}x (compile pass: padded {padded['compile_s']:.1f} s, "
        f"packed {packed['compile_s']:.1f} s)")


if __name__ == "__main__":
  main()
