"""The lm-evaluation-harness adapter (`jaxalign.eval.lm_eval_adapter.JaxalignLM`) on a tiny random Llama with the
GPT-2 tokenizer: log-likelihoods against float64 NumPy log-softmax of the model's own logits (and transformers'
PyTorch model), rolling windows, greedy generation against full recompute, and local tasks end to end through
`lm_eval.simple_evaluate` (no network)."""

import json
import random

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import PreTrainedTokenizerFast

import lm_eval
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from jaxalign.eval.lm_eval_adapter import JaxalignLM, bucket
from jaxalign.models import CausalLM, save_hf, tiny
from jaxalign.sharding import MeshConfig

PAIRS = [  # (context, continuation): lengths from 1 to ~25 tokens, an empty context, a trailing space
  ("The cat sat on the", " mat"),
  ("", "Hello world"),
  ("Question: what is two plus two?\nAnswer: ", "four"),
  ("Once upon a time there was a little dog who lived in a big house near the", " river and the forest"),
  ("x", " y z w v u t s r q p o n m l k j"),
  ("Paris is the capital of", " France."),
]


VOCAB = 50304  # GPT-2's 50257 tokens padded to a multiple of 128 (a vocabulary a tensor axis splits)


@pytest.fixture(scope="module")
def tokenizer(data_dir):
  return PreTrainedTokenizerFast(tokenizer_file=str(data_dir / "tokenizers/gpt2/tokenizer.json"),
                                 eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def hf_dir(tokenizer, tmp_path_factory):
  cfg = tiny("llama", vocab_size=VOCAB)
  return save_hf(CausalLM(cfg, rngs=nnx.Rngs(0)), cfg, tmp_path_factory.mktemp("lm") / "hf", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def lm(hf_dir):
  """The adapter built from the HF directory (model and tokenizer read from it)."""
  return JaxalignLM(str(hf_dir), batch_size=4, max_length=64)


_ROWS, _WIDTH = 8, 64  # the one shape the references run at (each new shape costs seconds on CPU)
_forward = nnx.jit(lambda model, ids, mask: model(ids, mask))


def log_softmax64(model, sequences) -> list[np.ndarray]:
  """float64 log-softmax [n-1, V] of the model's own full logits (`CausalLM.__call__`) on each sequence's
  tokens[:-1] (row i predicts tokens[i+1]), the sequences right-padded into [8, 64] batches."""
  out = []
  for start in range(0, len(sequences), _ROWS):
    chunk = sequences[start:start + _ROWS]
    ids, mask = np.zeros((_ROWS, _WIDTH), np.int32), np.zeros((_ROWS, _WIDTH), np.int32)
    for row, tokens in enumerate(chunk):
      ids[row, :len(tokens) - 1], mask[row, :len(tokens) - 1] = tokens[:-1], 1
    logits = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)), np.float64)
    for row, tokens in enumerate(chunk):
      z = logits[row, :len(tokens) - 1]
      top = z.max(-1, keepdims=True)
      out.append(z - top - np.log(np.exp(z - top).sum(-1, keepdims=True)))
  return out


def scored(logps: np.ndarray, tokens, n_cont: int) -> tuple[float, bool]:
  """Summed log-prob of the last n_cont tokens and whether each is the argmax, from log_softmax64's rows."""
  rows = np.arange(len(tokens) - n_cont - 1, len(tokens) - 1)
  cont = np.asarray(tokens[-n_cont:])
  return float(logps[rows, cont].sum()), bool((logps[rows].argmax(-1) == cont).all())


def encode_pair(tokenizer, context, continuation):
  """lm-eval's tokenisation of a (context, continuation) pair, written out: the continuation is the tail of the
  encoded whole, trailing spaces of the context move to the continuation, an empty context becomes EOS."""
  if not context:
    return [tokenizer.eos_token_id], tokenizer.encode(continuation)
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
  return ctx, whole[len(ctx):]


def requests(kind, args):
  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_matches_float64_logits_and_transformers(lm, hf_dir, tokenizer):
  model = lm.model
  before = lm.compile_counts.get("loglikelihood", 0)
  out = lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
  encoded = [encode_pair(tokenizer, context, continuation) for context, continuation in PAIRS]
  logps = log_softmax64(model, [ctx + cont for ctx, cont in encoded])
  expected = [scored(lp, ctx + cont, len(cont)) for lp, (ctx, cont) in zip(logps, encoded, strict=True)]
  np.testing.assert_allclose([o[0] for o in out], [e[0] for e in expected], rtol=1e-5, atol=1e-4)
  assert [o[1] for o in out] == [e[1] for e in expected]
  # Two batches of 4 rows: at most one program per (row, continuation) bucket.
  assert lm.compile_counts["loglikelihood"] - before <= 2

  # is_greedy on continuations that are (and are not) the model's argmax, at the token level.
  ctx = tokenizer.encode("The cat sat on the mat and")
  cont = greedy_reference(model, [ctx], 3)[0]
  wrong = cont[:2] + [(cont[2] + 1) % len(tokenizer)]
  token_out = lm._loglikelihood_tokens([(None, ctx, cont), (None, ctx, wrong), (None, ctx, cont[:1])])
  assert [g for _, g in token_out] == [True, False, True]
  conts = [cont, wrong, cont[:1]]
  for (logp, _), c, lp in zip(token_out, conts, log_softmax64(model, [ctx + c for c in conts]), strict=True):
    np.testing.assert_allclose(logp, scored(lp, ctx + c, len(c))[0], rtol=1e-5)

  # Request order is kept whatever the order (and nothing new compiles for the same shapes).
  compiled = lm.compile_counts["loglikelihood"]
  shuffled = list(range(len(PAIRS)))
  random.Random(0).shuffle(shuffled)
  again = lm.loglikelihood(requests("loglikelihood", [PAIRS[i] for i in shuffled]), disable_tqdm=True)
  np.testing.assert_allclose([a[0] for a in again], [out[i][0] for i in shuffled], rtol=1e-6)
  assert lm.compile_counts["loglikelihood"] == compiled

  import torch
  import transformers

  hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
  for (context, continuation), (logp, _) in zip(PAIRS, out, strict=True):
    ctx, cont = encode_pair(tokenizer, context, continuation)
    whole = ctx + cont
    with torch.no_grad():
      logits = hf(torch.tensor([whole[:-1]])).logits[0].double()
    reference = torch.log_softmax(logits, -1)[len(ctx) - 1:, :].gather(1, torch.tensor(cont)[:, None]).sum()
    np.testing.assert_allclose(logp, float(reference), rtol=1e-4, atol=1e-3)


def test_loglikelihood_rolling_one_window_and_window_splits(lm, tokenizer):
  text = "The quick brown fox jumps over the lazy dog. " * 3
  tokens = tokenizer.encode(text)
  assert len(tokens) < lm.max_length
  (whole,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
  seq = [lm.prefix_token_id] + tokens
  direct = log_softmax64(lm.model, [seq])[0][np.arange(len(tokens)), tokens].sum()
  np.testing.assert_allclose(whole, direct, rtol=1e-5)

  # Windows of 8 tokens: each token scored once, conditioned on its window's context only.
  small = JaxalignLM(model=lm.model, tokenizer=lm.tokenizer, batch_size=4, max_length=8)
  (split,) = small.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
  windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
      tokens, lm.prefix_token_id, max_seq_len=8, context_len=1)]
  assert sum(len(pred) for _, pred in windows) == len(tokens) and len(windows) > 2
  per_window = sum(scored(lp, c + p, len(p))[0]
                   for lp, (c, p) in zip(log_softmax64(lm.model, [c + p for c, p in windows]), windows, strict=True))
  np.testing.assert_allclose(split, per_window, rtol=1e-5)
  assert small.compile_counts == {"loglikelihood": 1}  # every window is one bucket: 8 positions


def greedy_reference(model, prompts, n):
  """n greedy tokens after each prompt, recomputing the full forward pass on the whole sequence at every step."""
  sequences = [list(p) + [0] for p in prompts]  # log_softmax64 drops each sequence's last token
  for _ in range(n):
    for tokens, lp in zip(sequences, log_softmax64(model, sequences), strict=True):
      tokens.insert(-1, int(lp[-1].argmax()))
  return [tokens[len(p):-1] for tokens, p in zip(sequences, prompts, strict=True)]


def test_generate_until_is_greedy_and_cuts_at_the_stop_string(lm, tokenizer):
  contexts = ["The capital of France is", "Once upon a time", "1, 2, 3,"]
  texts = [tokenizer.decode(t) for t in greedy_reference(lm.model, [tokenizer.encode(c) for c in contexts], 4)]
  never = "\u2603"  # a stop string that does not occur
  kwargs = {"until": [never], "max_gen_toks": 4, "do_sample": False}
  out = lm.generate_until(requests("generate_until", [(c, kwargs) for c in contexts]), disable_tqdm=True)
  assert out == texts

  stop = texts[0][-3:]
  (cut,) = lm.generate_until(requests("generate_until", [(contexts[0], {**kwargs, "until": [stop]})]),
                             disable_tqdm=True)
  assert cut == texts[0].split(stop)[0] and len(cut) < len(texts[0])
  assert lm.compile_counts["generate"] == 1  # one prompt bucket, one sampling config


def write_task(folder, name, records, config):
  data = folder / f"{name}.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in records))
  lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {data}",
           "test_split: test", *config]
  (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n")


def test_local_tasks_run_through_simple_evaluate(lm, tmp_path, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  mc = [{"question": "What colour is the sky?", "choices": ["blue", "green", "red"], "answer": 0},
        {"question": "How many legs has a cat?", "choices": ["two", "four"], "answer": 1},
        {"question": "Which is a fruit?", "choices": ["apple", "chair", "river"], "answer": 0}]
  write_task(tmp_path, "jaxalign_mc", mc, [
      "output_type: multiple_choice", 'doc_to_text: "Question: {{question}}\\nAnswer:"', "doc_to_target: answer",
      "doc_to_choice: choices", "metric_list:", "  - metric: acc", "  - metric: acc_norm"])
  gen = [{"question": "2+2?", "answer": "4"}, {"question": "Capital of France?", "answer": "Paris"}]
  write_task(tmp_path, "jaxalign_gen", gen, [
      "output_type: generate_until", 'doc_to_text: "Q: {{question}}\\nA:"', 'doc_to_target: "{{answer}}"',
      "generation_kwargs:", '  until: ["\\n"]', "  max_gen_toks: 4", "  do_sample: false",
      "metric_list:", "  - metric: exact_match", "    aggregation: mean", "    higher_is_better: true"])
  ppl = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "Hello world, hello again."}]
  write_task(tmp_path, "jaxalign_ppl", ppl, [
      "output_type: loglikelihood_rolling", 'doc_to_text: ""', 'doc_to_target: "{{text}}"',
      "metric_list:", "  - metric: word_perplexity", "  - metric: bits_per_byte"])

  manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
  before = lm.compile_counts
  out = lm_eval.simple_evaluate(model=lm, tasks=["jaxalign_mc", "jaxalign_gen", "jaxalign_ppl"],
                                task_manager=manager, bootstrap_iters=0, log_samples=True)
  results = out["results"]
  new = {k: v - before.get(k, 0) for k, v in lm.compile_counts.items()}
  assert new.get("loglikelihood", 0) <= 2 and new.get("generate", 0) <= 1  # buckets: a handful of programs
  # acc is the argmax over the choices of the adapter's own log-likelihoods (lm-eval's " " target delimiter).
  choices = [(f"Question: {d['question']}\nAnswer:", " " + c) for d in mc for c in d["choices"]]
  lls = iter(ll for ll, _ in lm.loglikelihood(requests("loglikelihood", choices), disable_tqdm=True))
  picks = [int(np.argmax([next(lls) for _ in d["choices"]])) for d in mc]
  assert results["jaxalign_mc"]["acc,none"] == pytest.approx(np.mean([p == d["answer"] for p, d in zip(picks, mc)]))
  assert 0.0 <= results["jaxalign_mc"]["acc_norm,none"] <= 1.0
  assert results["jaxalign_gen"]["exact_match,none"] == 0.0  # a random model answers neither
  responses = [s["resps"][0][0] for s in out["samples"]["jaxalign_gen"]]
  assert all(isinstance(r, str) and "\n" not in r for r in responses)
  assert results["jaxalign_ppl"]["word_perplexity,none"] > 1.0
  assert results["jaxalign_ppl"]["bits_per_byte,none"] > 0.0


def test_a_mesh_gives_the_one_device_results(lm):
  """8 fake devices, (data, fsdp, tensor) = (2, 2, 2): batches split 4 ways, the head's vocabulary in two."""
  sharded = JaxalignLM(model=lm.model, tokenizer=lm.tokenizer, batch_size=3, max_length=lm.max_length,
                       mesh=MeshConfig(data=2, fsdp=2, tensor=2))
  assert sharded.batch_size == 4  # rounded up to the batch axes' devices
  head = sharded._split()[1]["lm_head"]["kernel"][...]
  assert tuple(head.sharding.spec) == ("fsdp", "tensor")
  pairs = requests("loglikelihood", PAIRS)
  a, b = lm.loglikelihood(pairs, disable_tqdm=True), sharded.loglikelihood(pairs, disable_tqdm=True)
  np.testing.assert_allclose([x for x, _ in b], [x for x, _ in a], rtol=1e-5)
  assert [g for _, g in b] == [g for _, g in a]
  kwargs = {"until": ["\u2603"], "max_gen_toks": 4, "do_sample": False}
  prompts = requests("generate_until", [(c, kwargs) for c in ("Hi", "The sky is", "1, 2, 3,")])
  assert sharded.generate_until(prompts, disable_tqdm=True) == lm.generate_until(prompts, disable_tqdm=True)


def test_buckets_and_constructor_errors(tokenizer):
  assert [bucket(n, 16, 64) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
  assert [bucket(n, 4, 12) for n in (1, 5, 9)] == [4, 8, 12]
  with pytest.raises(ValueError, match="exactly one of pretrained"):
    JaxalignLM()
  model = CausalLM(tiny("llama", vocab_size=100), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="the model's vocabulary 100"):
    JaxalignLM(model=model, tokenizer=tokenizer)
