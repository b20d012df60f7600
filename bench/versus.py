"""jaxalign against Tunix and TRL, side by side, on identical work: SFT, DPO, GRPO (generation, scoring and
update apart and as a whole step) and decode alone.

  python bench/versus.py --tunix-python /tmp/tunix-venv/bin/python --trl-python /tmp/trl-venv/bin/python
  python bench/versus.py --preset small --rounds 2 ...        # the 56M preset

One randomly initialised Llama-style model is saved once in HF format; every peer loads it in its own process
and virtual environment (bench/peers/{jaxalign,tunix,trl}_run.py: same command line, same token shapes, JSON
out). Rounds interleave the peers (the order rotates each round), so a noisy machine slows all of them alike;
each cell is the median of a process's steady-state steps (its first two steps compile), one per round.
GRPO's parts (generation, scoring, update) come from the peers that report them: jaxalign times each part
jitted alone (the update is the step minus the other two), Tunix from its perf tracer; TRL reports none.
Speed ratios are the peer's time over jaxalign's (> 1: jaxalign faster), from the medians over rounds. Peak
RSS is the process's maximum resident set (`ru_maxrss`). Peers without a python are left out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

import jax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from model_throughput import PRESETS  # noqa: E402

from jaxalign.data import digits_tokenizer  # noqa: E402
from jaxalign.models import CausalLM, ModelConfig, save_hf  # noqa: E402

MODELS = {
  # The model: Llama-3-style, vocab 2048, hidden 256, 4 layers.
  "peer": dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=2048),
  "small": PRESETS["small"],
}
SHAPES = {
  "sft": {"batch": 8, "length": 256},
  "dpo": {"pairs": 4, "prompt": 128, "response": 128},
  "grpo": {"prompts": 4, "group": 4, "prompt": 32, "new_tokens": 64, "beta": 0.04},
  "decode": {"rows": 16, "prompt": 32, "new_tokens": 64},
}
PEERS = ("jaxalign", "tunix", "trl")
NAMES = {"jaxalign": "jaxalign", "tunix": "Tunix", "trl": "TRL"}


def save_model(preset: str, directory: pathlib.Path) -> ModelConfig:
  cfg = ModelConfig(family="llama", dtype="float32", param_dtype="float32", max_position_embeddings=512,
                    **MODELS[preset])
  save_hf(CausalLM(cfg, rngs=nnx.Rngs(0)), cfg, directory, tokenizer=digits_tokenizer())
  return cfg


def run_peer(python: str, peer: str, workload: str, model_dir: pathlib.Path, shape: dict) -> dict:
  script = pathlib.Path(__file__).parent / "peers" / f"{peer}_run.py"
  out = subprocess.run([python, str(script), workload, str(model_dir), json.dumps(shape)], capture_output=True,
                       text=True, check=False)
  if out.returncode:
    raise SystemExit(f"{peer} {workload} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def value(result: dict, key: str) -> float | None:
  """A process's median step time (key "seconds") or one part of its step (None when it reports none)."""
  return result[key] if key == "seconds" else result.get("parts", {}).get(key)


def cell(results: list[dict], key: str) -> str:
  values = [value(r, key) for r in results]
  return "-" if None in values else ", ".join(f"{v * 1e3:.0f}" for v in values)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=MODELS, default="peer")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=6, help="steps per process (the first two compile)")
  parser.add_argument("--workloads", nargs="+", choices=SHAPES, default=list(SHAPES))
  parser.add_argument("--tunix-python", help="python of a venv with google-tunix")
  parser.add_argument("--trl-python", help="python of a venv with trl, transformers and torch")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a jaxalign config override (e.g. model.remat=none), repeatable")
  args = parser.parse_args()

  pythons = {"jaxalign": sys.executable, "tunix": args.tunix_python, "trl": args.trl_python}
  peers = [p for p in PEERS if pythons[p]]
  results = {(w, p): [] for w in args.workloads for p in peers}
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = pathlib.Path(tmp) / "model"
    cfg = save_model(args.preset, model_dir)
    for round_ in range(args.rounds):
      order = peers[round_ % len(peers):] + peers[:round_ % len(peers)]
      for workload in args.workloads:
        for peer in order:
          shape = {**SHAPES[workload], "steps": args.steps,
                   "jaxalign_set": dict(kv.split("=", 1) for kv in args.set)}
          results[workload, peer].append(run_peer(pythons[peer], peer, workload, model_dir, shape))
          print(f"round {round_} {workload} {peer}: {results[workload, peer][-1]['seconds'] * 1e3:.0f} ms",
                file=sys.stderr)

  versions = {p: results[args.workloads[0], p][0]["peer"] for p in peers}
  print(f"machine: {jax.devices()[0].device_kind} CPU, {args.rounds} interleaved rounds, {args.steps} steps per "
        f"process; model {args.preset}: Llama-style {cfg.num_params() / 1e6:.1f}M float32 (vocab {cfg.vocab_size}, "
        f"hidden {cfg.hidden_size}, {cfg.num_layers} layers); {', '.join(versions.values())}")
  head = " | ".join(f"{NAMES[p]} ms" for p in peers)
  ratios = " | ".join(f"speed vs {NAMES[p]}" for p in peers[1:])
  rss = "/".join(NAMES[p] for p in peers)
  print(f"| workload | {head} | {ratios} | peak RSS MB ({rss}) |")
  print("|---" * (2 + len(peers) + len(peers) - 1) + "|")
  rows = [(w, None) for w in args.workloads]
  if "grpo" in args.workloads:
    at = args.workloads.index("grpo") + 1
    rows[at:at] = [("grpo", part) for part in ("generate", "score", "update")]
  for workload, part in rows:
    per_peer = [results[workload, p] for p in peers]
    key = part or "seconds"
    medians = [None if cell(rs, key) == "-" else statistics.median(value(r, key) for r in rs) for rs in per_peer]
    label = f"{workload}: {part}" if part else workload
    cells = " | ".join(cell(rs, key) for rs in per_peer)
    speed = " | ".join("-" if m is None or medians[0] is None else f"{m / medians[0]:.2f}x" for m in medians[1:])
    memory = "/".join(f"{max(r['peak_rss_mb'] for r in rs):.0f}" for rs in per_peer) if not part else ""
    print(f"| {label} | {cells} | {speed} | {memory} |")


if __name__ == "__main__":
  main()
