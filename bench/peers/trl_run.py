"""TRL's side of bench/versus.py (and of bench/dpo_step.py, bench/rl_step.py): one workload, run with the
python of a virtual environment that has trl, transformers and torch, on the HF model the driver saved.

  python trl_run.py WORKLOAD MODEL_DIR '{"shape": ...}'

Workloads (the shape keys of bench/versus.py; float32 on the CPU):
- sft {batch, length, steps}: SFTTrainer on pre-tokenised rows of `length` random ids (loss on every token).
- dpo {pairs, prompt, response, steps}: DPOTrainer (beta 0.1, its reference model) on rows of `prompt` and
  `response` - 1 digit words (one token each; TRL appends EOS).
- grpo {prompts, group, prompt, new_tokens, steps, beta}: GRPOTrainer (HF generate, one optimiser step per
  rollout) on prompts of `prompt` digit words, `new_tokens` new tokens each (min_new_tokens: EOS never ends a
  row early), a host reward.
- decode {rows, prompt, new_tokens, steps}: Hugging Face `generate` (KV cache, sampling, EOS off).
The median is over the steps after the first two. The last stdout line is JSON: peer, workload, seconds,
times, peak_rss_mb.
"""

import json
import random
import resource
import statistics
import sys
import tempfile
import time

import torch
import transformers
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

WARMUP = 2


class StepTimer(TrainerCallback):
  """Wall time of every optimiser step."""

  def __init__(self):
    self.times, self.start = [], None

  def on_step_begin(self, args, state, control, **kwargs):
    self.start = time.perf_counter()

  def on_step_end(self, args, state, control, **kwargs):
    self.times.append(time.perf_counter() - self.start)


def words(rng: random.Random, n: int) -> str:
  return " ".join(str(rng.randrange(10)) for _ in range(n))  # one token per word with the digits tokenizer


def common(out: str, steps: int, lr: float) -> dict:
  return dict(output_dir=out, max_steps=steps, learning_rate=lr, logging_steps=10_000, report_to=[],
              save_strategy="no", use_cpu=True, dataloader_num_workers=0, max_grad_norm=1.0)


def train(trainer_cls, config_cls, model_dir: str, rows: list[dict], steps: int, lr: float, reward=None,
          **config) -> list[float]:
  tokenizer = AutoTokenizer.from_pretrained(model_dir)
  model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  timer = StepTimer()
  with tempfile.TemporaryDirectory() as out:
    extra = {"reward_funcs": reward} if reward else {}
    trainer = trainer_cls(model=model, args=config_cls(**common(out, steps, lr), **config), processing_class=tokenizer,
                          train_dataset=Dataset.from_list(rows), callbacks=[timer], **extra)
    trainer.train()
  return timer.times


def sft(model_dir: str, shape: dict) -> list[float]:
  vocab = AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size
  rng = random.Random(0)
  rows = [{"input_ids": [rng.randrange(1, vocab) for _ in range(shape["length"])]}
          for _ in range(shape["batch"] * shape["steps"])]
  return train(trl.SFTTrainer, trl.SFTConfig, model_dir, rows, shape["steps"], 1e-5,
               per_device_train_batch_size=shape["batch"], max_length=shape["length"], packing=False)


def dpo(model_dir: str, shape: dict) -> list[float]:
  rng = random.Random(0)
  rows = [{"prompt": words(rng, shape["prompt"]), "chosen": " " + words(rng, shape["response"] - 1),
           "rejected": " " + words(rng, shape["response"] - 1)} for _ in range(shape["pairs"] * shape["steps"])]
  return train(trl.DPOTrainer, trl.DPOConfig, model_dir, rows, shape["steps"], 1e-6,
               per_device_train_batch_size=shape["pairs"], max_length=shape["prompt"] + shape["response"], beta=0.1)


def grpo(model_dir: str, shape: dict) -> list[float]:
  rng = random.Random(0)
  rows = [{"prompt": words(rng, shape["prompt"])} for _ in range(shape["prompts"] * shape["steps"])]
  reward = lambda completions, **kw: [float(len(c.split()) % 2) for c in completions]
  return train(trl.GRPOTrainer, trl.GRPOConfig, model_dir, rows, shape["steps"], 1e-6, reward=reward,
               per_device_train_batch_size=shape["prompts"] * shape["group"], num_generations=shape["group"],
               max_completion_length=shape["new_tokens"], beta=shape["beta"], temperature=1.0,
               generation_kwargs={"min_new_tokens": shape["new_tokens"]})


def decode(model_dir: str, shape: dict) -> list[float]:
  model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  generator = torch.Generator().manual_seed(0)
  ids = torch.randint(3, model.config.vocab_size, (shape["rows"], shape["prompt"]), generator=generator)
  kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=shape["new_tokens"],
                min_new_tokens=shape["new_tokens"], do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                pad_token_id=0, eos_token_id=None)
  times = []
  with torch.inference_mode():
    for _ in range(shape["steps"]):
      start = time.perf_counter()
      out = model.generate(ids, **kwargs)
      times.append(time.perf_counter() - start)
  assert out.shape == (shape["rows"], shape["prompt"] + shape["new_tokens"]), out.shape
  return times


def main():
  workload, model_dir, shape = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
  times = {"sft": sft, "dpo": dpo, "grpo": grpo, "decode": decode}[workload](model_dir, shape)
  peer = f"transformers {transformers.__version__}" if workload == "decode" else f"TRL {trl.__version__}"
  print(json.dumps({"peer": peer, "workload": workload, "seconds": statistics.median(times[WARMUP:]),
                    "times": times, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
  main()
