"""save_hf exports that transformers uses as-is: special-token ids (generate stops at EOS, a reward model
scores padded batches), file modes per the umask, one writer among several processes."""

import errno
import json
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.experimental import multihost_utils
from transformers import PreTrainedTokenizerFast

from jaxalign.data.synthetic import digits_tokenizer
from jaxalign.models import CausalLM, ScalarModel, hf, last_token_values, save_hf, tiny
from jaxalign.models.hf import CheckpointError


def small_config(tokenizer, **overrides):
  return tiny("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1,
              **overrides)


def set_params(model, value):
  """Replace every parameter by value(path, shape) (a numpy array)."""
  state = nnx.state(model, nnx.Param)
  flat = [(p, v.replace(jnp.asarray(value(p, v.shape), v.dtype))) for p, v in nnx.to_flat_state(state)]
  nnx.update(model, nnx.from_flat_state(flat))


def chain_model(tokenizer, successor):
  """A causal LM whose greedy next token after `i` is successor(i): blocks contribute nothing (zero output
  projections), embeddings are one-hot and the head maps one-hot i to successor(i)."""
  cfg = small_config(tokenizer)
  model = CausalLM(cfg, rngs=nnx.Rngs(0))

  def value(path, shape):
    name = "/".join(map(str, path))
    if name.endswith(("o_proj/kernel", "down_proj/kernel")):
      return np.zeros(shape)
    if name.endswith("weight"):  # RMSNorm scales
      return np.ones(shape)
    if name == "model/embed_tokens/embedding":
      return np.eye(*shape)
    if name == "lm_head/kernel":
      head = np.zeros(shape)
      head[np.arange(cfg.vocab_size), [successor(i) for i in range(cfg.vocab_size)]] = 1.0
      return head
    return np.random.default_rng(len(name)).normal(0, 0.1, shape)

  set_params(model, value)
  return model, cfg


def test_special_token_ids_in_config_and_generation_config(tmp_path):
  tokenizer = digits_tokenizer()
  cfg = small_config(tokenizer)
  save_hf(CausalLM(cfg, rngs=nnx.Rngs(0)), cfg, tmp_path / "out", tokenizer=tokenizer)
  expected = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
  assert expected == dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
  for name in ("config.json", "generation_config.json"):
    written = json.loads((tmp_path / "out" / name).read_text())
    assert {k: written[k] for k in expected} == expected, name
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
  assert hf_model.generation_config.eos_token_id == tokenizer.eos_token_id
  assert hf_model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_tokenizer_without_pad_exports_eos_as_pad(tmp_path, data_dir):
  tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(data_dir / "tokenizers/gpt2/tokenizer.json"),
                                      eos_token="<|endoftext|>")
  assert tokenizer.pad_token_id is None
  cfg = tiny("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
  save_hf(ScalarModel(cfg, rngs=nnx.Rngs(0)), cfg, tmp_path, tokenizer=tokenizer)
  written = json.loads((tmp_path / "config.json").read_text())
  assert written["eos_token_id"] == written["pad_token_id"] == 50256
  assert not (tmp_path / "generation_config.json").exists()  # a reward model does not generate


def test_transformers_generate_stops_at_eos(tmp_path):
  tokenizer = digits_tokenizer()
  one, two, eos = tokenizer.convert_tokens_to_ids(["1", "2", "<eos>"])
  # 1 -> 2 -> <eos> -> 1 -> ...: without a known EOS, generation runs on to max_new_tokens.
  model, cfg = chain_model(tokenizer, lambda i: two if i == one else eos if i == two else one)
  prompt = tokenizer("3", add_special_tokens=False)["input_ids"]
  np.testing.assert_array_equal(jnp.argmax(model(jnp.asarray([prompt]))[0, -1]), one)  # the chain holds in jaxalign
  save_hf(model, cfg, tmp_path, tokenizer=tokenizer)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  ids = torch.tensor([prompt])
  out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
  assert out[0, len(prompt):].tolist() == [one, two, eos]


def randomize(model, seed):
  rng = np.random.default_rng(seed)
  set_params(model, lambda path, shape: rng.normal(0, 0.15, shape) + (1.0 if len(shape) == 1 else 0.0))


def test_exported_reward_model_scores_a_padded_batch_like_each_row_alone(tmp_path):
  tokenizer = digits_tokenizer()
  cfg = small_config(tokenizer)
  model = ScalarModel(cfg, rngs=nnx.Rngs(3))
  randomize(model, 3)
  save_hf(model, cfg, tmp_path, tokenizer=tokenizer)
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(
    tmp_path, attn_implementation="eager").eval()
  rows = [tokenizer("<bos> sort : 3 1 2 <eos>")["input_ids"], tokenizer("<bos> 1 2 <eos>")["input_ids"]]
  width = max(map(len, rows))
  ids = np.full((2, width), tokenizer.pad_token_id)
  mask = np.zeros((2, width), np.int64)
  for i, row in enumerate(rows):
    ids[i, :len(row)], mask[i, :len(row)] = row, 1
  with torch.no_grad():
    batch = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    alone = [hf_model(input_ids=torch.tensor([row])).logits[0, 0].item() for row in rows]
  np.testing.assert_allclose(batch, alone, rtol=1e-5, atol=1e-6)
  ours = last_token_values(model(jnp.asarray(ids), jnp.asarray(mask)), jnp.asarray(mask))
  np.testing.assert_allclose(ours, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=oct)
def test_export_modes_follow_the_umask(tmp_path, umask):
  tokenizer = digits_tokenizer()
  cfg = small_config(tokenizer)
  previous = os.umask(umask)
  try:
    save_hf(CausalLM(cfg, rngs=nnx.Rngs(0)), cfg, tmp_path / "out", tokenizer=tokenizer)
    save_hf(CausalLM(cfg, rngs=nnx.Rngs(1)), cfg, tmp_path / "out", tokenizer=tokenizer)  # over an export
  finally:
    os.umask(previous)
  out = tmp_path / "out"
  assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
  files = sorted(out.iterdir())
  assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in files}
  for f in files:
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folder left


@pytest.mark.parametrize("process", [0, 1])
def test_only_process_zero_writes_and_all_wait_for_it(tmp_path, monkeypatch, process):
  """Two processes simulated on one: the processes agree (a collective) after process 0's write, and process 1
  writes nothing."""
  barriers = []
  monkeypatch.setattr(jax, "process_index", lambda: process)
  monkeypatch.setattr(jax, "process_count", lambda: 2)

  def allgather(flag):
    barriers.append((None, (tmp_path / "out" / "config.json").exists()))
    return np.asarray([flag, False])

  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  tokenizer = digits_tokenizer()
  cfg = small_config(tokenizer)
  save_hf(CausalLM(cfg, rngs=nnx.Rngs(0)), cfg, tmp_path / "out", tokenizer=tokenizer)
  assert len(barriers) == 1
  assert barriers[0][1] == (process == 0)
  assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if process == 0 else [])


def test_a_failed_export_is_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch):
  tokenizer = digits_tokenizer()
  cfg = small_config(tokenizer)
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  save_hf(model, cfg, tmp_path / "out", tokenizer=tokenizer)

  def full_disk(tensors, folder):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(hf, "_write_safetensors", full_disk)
  with pytest.raises(CheckpointError, match=rf"^cannot write the model export to {tmp_path}/out: No space left on "
                                            r"device \[Errno 28\]$"):
    save_hf(model, cfg, tmp_path / "out", tokenizer=tokenizer)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (tmp_path / "out/model.safetensors").exists()
