"""generate_text: chat-template prompts, left padding into fixed batches, decoding up to EOS."""

import jax
import numpy as np
from flax import nnx
from transformers import PreTrainedTokenizerFast

from jaxalign.data.tokenize import prompt_ids
from jaxalign.models import CausalLM, tiny
from jaxalign.rollout import SamplingConfig, generate, generate_text, left_pad

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_generate_text_matches_generate_on_the_rendered_prompts(data_dir):
  tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(data_dir / "tokenizers/gpt2/tokenizer.json"),
                                      eos_token="<|endoftext|>", pad_token="<|endoftext|>")
  tokenizer.chat_template = TEMPLATE
  model = CausalLM(tiny("llama", vocab_size=len(tokenizer)), rngs=nnx.Rngs(0))
  prompts = ["The capital of France is", [{"role": "user", "content": "2+2?"}], "Hi"]
  cfg = SamplingConfig(max_new_tokens=4, temperature=0.0, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
  texts = generate_text(model, tokenizer, prompts, cfg=cfg, batch_size=2)  # two batches, the last filled

  encoded = [prompt_ids(tokenizer, p) for p in prompts]
  assert tokenizer.decode(encoded[1]) == "<|user|>2+2?<|end|><|assistant|>"
  ids, mask = left_pad(encoded, tokenizer.pad_token_id)
  rollout = jax.device_get(nnx.jit(generate, static_argnames="cfg")(model, ids, mask, jax.random.key(0), cfg))
  expected = [tokenizer.decode(t[m == 1].tolist()) for t, m in zip(rollout.tokens, rollout.mask)]
  assert texts == expected
  assert all(isinstance(t, str) for t in texts) and len(texts) == 3


def test_left_pad():
  ids, mask = left_pad([[5, 6], [7], []], pad_id=0, length=3)
  np.testing.assert_array_equal(ids, [[0, 5, 6], [0, 0, 7], [0, 0, 0]])
  np.testing.assert_array_equal(mask, [[0, 1, 1], [0, 0, 1], [0, 0, 0]])
