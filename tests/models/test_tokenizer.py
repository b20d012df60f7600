"""Tokenizer round trip through an HF model directory (real GPT-2 tokenizer from the shared data)."""

import pytest
from flax import nnx
from transformers import PreTrainedTokenizerFast

from jaxalign.models import CausalLM, load_tokenizer, save_hf, tiny
from jaxalign.models.hf import CheckpointError

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_tokenizer_and_chat_template_survive_save_hf(tmp_path, data_dir):
  tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(data_dir / "tokenizers/gpt2/tokenizer.json"),
                                      eos_token="<|endoftext|>", pad_token="<|endoftext|>")
  tokenizer.chat_template = TEMPLATE
  assert tokenizer.encode("Hello world!") == [15496, 995, 0]
  cfg = tiny("llama", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
  save_hf(CausalLM(cfg, rngs=nnx.Rngs(0)), cfg, tmp_path, tokenizer=tokenizer)

  loaded = load_tokenizer(tmp_path)
  messages = [{"role": "user", "content": "2+2?"}]
  text = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert text == "<|user|>2+2?<|end|><|assistant|>"
  assert loaded.encode("Hello world!") == [15496, 995, 0]
  assert loaded.eos_token_id == 50256


def test_missing_tokenizer_is_a_clear_error(tmp_path):
  with pytest.raises(CheckpointError, match="no tokenizer files"):
    load_tokenizer(tmp_path)
