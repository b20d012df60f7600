"""Peer timing for bench/rl_step.py: TRL's GRPOTrainer (HF generate) on the same HF model and shapes.

  python trl_grpo.py MODEL_DIR PROMPTS GROUP NEW_TOKENS REPEATS
Prints one JSON line: {"version": trl version, "seconds": median step time}.
"""

import json
import random
import statistics
import sys
import tempfile

import torch
import trl
from datasets import Dataset
from _timer import StepTimer  # this folder is on sys.path when the script runs
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
  model_dir, prompts, group, new_tokens, repeats = sys.argv[1], *map(int, sys.argv[2:6])
  rng = random.Random(0)
  rows = [{"prompt": [{"role": "user", "content": "max : " + " ".join(str(rng.randrange(10)) for _ in range(5))}]}
          for _ in range(prompts * (repeats + 2))]
  reward = lambda completions, **kw: [float(len(c[0]["content"].split()) == 1) for c in completions]
  tokenizer = AutoTokenizer.from_pretrained(model_dir)
  model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  timer = StepTimer()
  with tempfile.TemporaryDirectory() as out:
    args = trl.GRPOConfig(output_dir=out, per_device_train_batch_size=prompts * group, num_generations=group,
                          max_completion_length=new_tokens, max_steps=repeats + 2, learning_rate=1e-6, beta=0.04,
                          logging_steps=10_000, report_to=[], save_strategy="no", use_cpu=True,
                          dataloader_num_workers=0, temperature=1.0)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tokenizer,
                              train_dataset=Dataset.from_list(rows), callbacks=[timer])
    trainer.train()
  print(json.dumps({"version": trl.__version__, "seconds": statistics.median(timer.times[2:])}))


if __name__ == "__main__":
  main()
