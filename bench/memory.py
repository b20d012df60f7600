"""Projected per-device training memory at real shapes: `python -m jaxalign.train --plan` per row.

  python bench/memory.py                 # every row below (about 10 minutes on a 2-core CPU)
  python bench/memory.py --rows 1b-dpo-trl 8b-dpo-recipe --set model.scan_layers=true

Each row compiles the training step for its mesh on fake CPU devices from abstract inputs (XLA's compiled
memory analysis; nothing is allocated) and prints arguments, temp and peak per device beside the analytic
state floor (state + frozen bytes / devices). Llama shapes: 1b = Llama-3.2-1B (tied, vocab 128256),
8b = Llama-3.1-8B, 70b = Llama-3-70B. CPU buffer assignment approximates GPU/TPU's; the goal column is
issue 9's.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from model_throughput import PRESETS  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# configs/llama_1b_dpo.yaml at the anchor shape (TRL's DPOTrainer measured 24.4 GiB on an H100 here).
DPO_1B = ["data.batch_size=4", "data.max_length=1024", "data.max_prompt_length=512", "optim.grad_accum=1",
          "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "reference.mode=model"]


def model_keys(preset: str) -> list[str]:
  return ["init_from=null"] + [f"model.{k}={json.dumps(v)}" for k, v in PRESETS[preset].items()]


# name -> (recipe or None, overrides, devices, goal in GiB, what the row is)
ROWS = {
  "tiny-default": (None, [], 1, None, "the embedded default (SFT then DPO stage), 1 device"),
  "1b-dpo-trl": ("configs/llama_1b_dpo.yaml", DPO_1B + model_keys("1b") + ["model.param_dtype=bfloat16", "model.dtype=bfloat16",
                 "optim.mu_dtype=bfloat16"], 1, 20.0,
                 "1.24B, 4 pairs x (512 + 512), bf16 weights, moments and reference (TRL's precision)"),
  "1b-dpo-fp32-master": ("configs/llama_1b_dpo.yaml", DPO_1B + model_keys("1b") + ["model.param_dtype=float32", "model.dtype=bfloat16"],
                         1, 30.0, "1.24B, same shape, float32 master weights and moments, bf16 reference"),
  "8b-dpo-recipe": ("configs/llama_8b_dpo.yaml", model_keys("8b"), 16, 40.0,
                    "configs/llama_8b_dpo.yaml on its (data 2, fsdp 8) mesh"),
  "8b-grpo-recipe": ("configs/llama_8b_grpo.yaml", model_keys("8b"), 16, 60.0,
                     "configs/llama_8b_grpo.yaml: 8 prompts x 8 samples, 512 + 1024 tokens, generation included"),
  "70b-dpo-recipe": ("configs/llama_70b_dpo.yaml", model_keys("70b"), 64, 80.0,
                     "configs/llama_70b_dpo.yaml: 64 devices, 4 rows x 2048 tokens per device"),
  "1b-sft-32k-recipe": ("configs/llama_1b_sft_32k.yaml", model_keys("1b"), 1, 40.0,
                        "configs/llama_1b_sft_32k.yaml: one row of 32768 tokens, 1 device"),
  "gemma2-2b-dpo-recipe": ("configs/gemma2_2b_dpo.yaml", model_keys("gemma2-2b"), 8, 40.0,
                           "configs/gemma2_2b_dpo.yaml: 8 devices, 4 pairs x 1024 tokens per device"),
  "gemma3-1b-dpo-recipe": ("configs/gemma3_1b_dpo.yaml", model_keys("gemma3-1b"), 8, 40.0,
                           "configs/gemma3_1b_dpo.yaml: 8 devices, 4 pairs x 2048 tokens per device"),
  "qwen3-moe-dpo": ("configs/llama_8b_dpo.yaml", model_keys("qwen3-30b-a3b") + ["data.batch_size=32"], 16, 80.0,
                    "Qwen3-30B-A3B on the 8b DPO recipe's mesh (data 2, fsdp 8), 2 pairs (4 rows) x 2048 tokens per "
                    "device, precomputed reference"),
  "qwen3-moe-grpo-recipe": ("configs/qwen3_moe_grpo.yaml", model_keys("qwen3-30b-a3b"), 16, 80.0,
                            "configs/qwen3_moe_grpo.yaml: 8 prompts x 8 samples, 512 + 1024 tokens, generation "
                            "included, expert parallel over fsdp (mesh.experts=fsdp)"),
}


def plan(recipe: str | None, overrides: list[str], devices: int) -> dict[str, float]:
  """Run --plan in a fresh interpreter (each row has its own fake device count); parse its table."""
  command = [sys.executable, "-m", "jaxalign.train", "--plan", "--devices", str(devices), *overrides]
  if recipe:
    command[3:3] = ["--config", str(ROOT / recipe)]
  out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
  if out.returncode:
    raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-2000:]}")
  values = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w[\w ()/+-]*?)\s+([\d.]+) GiB$", out.stdout, re.M)}
  values["compile_s"] = float(re.search(r"compiled in ([\d.]+) s", out.stdout).group(1))
  return values


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", nargs="*", choices=ROWS, default=list(ROWS))
  parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                      help="an extra override for every row (repeatable), e.g. --set model.remat=none")
  args = parser.parse_args()
  print("| row | devices | arguments GiB | temp GiB | peak GiB | state floor GiB | goal GiB | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  for name in args.rows:
    recipe, overrides, devices, goal, _ = ROWS[name]
    v = plan(recipe, overrides + args.overrides, devices)
    floor = v["state floor (state bytes / devices)"]
    print(f"| {name} | {devices} | {v['arguments']:.2f} | {v['temp']:.2f} | {v['peak']:.2f} | {floor:.2f} | "
          f"{'-' if goal is None else f'<= {goal:.0f}'} | {v['compile_s']:.0f} |", flush=True)
  print()
  for name in args.rows:
    print(f"- {name}: {ROWS[name][4]}")


if __name__ == "__main__":
  main()
