"""Peer timing for bench/rl_step.py: Hugging Face `generate` (KV cache, sampling) on the same model and batch.

  python hf_generate.py MODEL_DIR ROWS PROMPT_LENGTH NEW_TOKENS REPEATS
Every row decodes exactly NEW_TOKENS tokens (EOS off, as on the jaxalign side). Prints one JSON line:
{"version": transformers version, "seconds": median generate time}.
"""

import json
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


def main():
  model_dir, rows, prompt_length, new_tokens, repeats = sys.argv[1], *map(int, sys.argv[2:6])
  model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  generator = torch.Generator().manual_seed(0)
  ids = torch.randint(3, model.config.vocab_size, (rows, prompt_length), generator=generator)
  mask = torch.ones_like(ids)
  kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=None)
  times = []
  with torch.inference_mode():
    for _ in range(repeats + 1):  # the first call warms up
      start = time.perf_counter()
      out = model.generate(ids, **kwargs)
      times.append(time.perf_counter() - start)
  assert out.shape == (rows, prompt_length + new_tokens), out.shape
  print(json.dumps({"version": transformers.__version__, "seconds": statistics.median(times[1:])}))


if __name__ == "__main__":
  main()
