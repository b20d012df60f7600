"""Tokenizer round trip through an HF model directory (real GPT-2 tokenizer from the shared data)."""

import pytest
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jaxalign.data.readers import DataError
from jaxalign.data.synthetic import digits_tokenizer
from jaxalign.data.tokenize import check_same_tokenizer
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


def gpt2(data_dir, **special):
  return PreTrainedTokenizerFast(tokenizer_file=str(data_dir / "tokenizers/gpt2/tokenizer.json"),
                                 eos_token="<|endoftext|>", **special)


def test_same_tokenizer_passes(data_dir):
  check_same_tokenizer(digits_tokenizer(), digits_tokenizer(), "rl.reward_model=/x")
  # no pad token pads with EOS, so it matches a copy whose pad token is EOS
  check_same_tokenizer(gpt2(data_dir, pad_token="<|endoftext|>"), gpt2(data_dir), "rl.reward_model=/x")


def test_different_vocabulary_is_a_one_line_error_naming_where(data_dir):
  with pytest.raises(DataError) as error:
    check_same_tokenizer(digits_tokenizer(), gpt2(data_dir), "rl.reward_model=/x")
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith("rl.reward_model=/x: token '<pad>' is missing in its tokenizer, id 0 in the policy's: ")
  with pytest.raises(DataError, match=r"^rm: its tokenizer has 19 tokens, the policy's has 50257: "):
    check_same_tokenizer(gpt2(data_dir), digits_tokenizer(), "rm")


def test_extra_tokens_and_another_pad_token_do_not_matter():
  """Tokens only the reward model's tokenizer has are never sampled by the policy; padding is masked."""
  extended = digits_tokenizer()
  extended.add_special_tokens({"pad_token": "<rm_pad>"})
  assert len(extended) == len(digits_tokenizer()) + 1 and extended.pad_token_id != digits_tokenizer().pad_token_id
  check_same_tokenizer(digits_tokenizer(), extended, "rm")


def test_same_size_other_ids_or_special_tokens_are_errors():
  vocab = digits_tokenizer().get_vocab()
  vocab["1"], vocab["2"] = vocab["2"], vocab["1"]
  core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  swapped = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                    unk_token="<unk>")  # the digits tokenizer with "1" and "2" swapped
  with pytest.raises(DataError, match=r"^reward: token '1' has id 8 in its tokenizer, id 7 in the policy's: "):
    check_same_tokenizer(digits_tokenizer(), swapped, "reward")
  other_eos = digits_tokenizer()
  other_eos.eos_token = "<unk>"
  with pytest.raises(DataError, match=r"^reward: its eos_token_id is 3, the policy's is 2: "):
    check_same_tokenizer(digits_tokenizer(), other_eos, "reward")
