"""Peer timing for bench/dpo_step.py: TRL's DPOTrainer on the same HF model and token shapes.

Run by bench/dpo_step.py with the python of a separate virtual environment that has trl installed:
  python trl_dpo.py MODEL_DIR PAIRS PROMPT_LEN RESPONSE_LEN REPEATS
Prints one JSON line: {"version": trl version, "seconds": median optimiser-step time}.
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
  model_dir, pairs, prompt_len, response_len, repeats = sys.argv[1], *map(int, sys.argv[2:6])
  rng = random.Random(0)
  words = lambda n: " ".join(str(rng.randrange(10)) for _ in range(n))  # one token per word
  # the response gets response_len - 1 words; TRL appends EOS
  rows = [{"prompt": words(prompt_len), "chosen": " " + words(response_len - 1),
           "rejected": " " + words(response_len - 1)} for _ in range(pairs * (repeats + 2))]
  tokenizer = AutoTokenizer.from_pretrained(model_dir)
  model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  timer = StepTimer()
  with tempfile.TemporaryDirectory() as out:
    args = trl.DPOConfig(output_dir=out, per_device_train_batch_size=pairs, max_length=prompt_len + response_len,
                         max_steps=repeats + 2, learning_rate=1e-6, beta=0.1, logging_steps=10_000, report_to=[],
                         save_strategy="no", use_cpu=True, dataloader_num_workers=0, max_grad_norm=1.0)
    trainer = trl.DPOTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                             callbacks=[timer])
    trainer.train()
  print(json.dumps({"version": trl.__version__, "seconds": statistics.median(timer.times[2:])}))


if __name__ == "__main__":
  main()
