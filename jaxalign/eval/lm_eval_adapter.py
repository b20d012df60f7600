"""An lm-evaluation-harness model (`lm_eval.api.model.LM`) backed by a jaxalign causal LM on its mesh.

    import lm_eval
    from jaxalign.eval.lm_eval_adapter import JaxalignLM

    lm = JaxalignLM("path/to/hf_dir", batch_size=16)            # or JaxalignLM(model=model, tokenizer=tok)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])      # or `lm_eval --model jaxalign
                                                                #   --model_args pretrained=path/to/hf_dir`

Importing this module registers the model name "jaxalign" with lm-eval. Request types:

- `loglikelihood` (context, continuation): tokenised as lm-eval's HF model does (`TemplateLM`: context +
  continuation encoded together, the continuation is the tail; an empty context becomes the prefix token, BOS
  or else EOS). Rows are left-padded so every continuation ends at the row's last position; the decoder runs
  once per row, and only the last C positions go through the LM head, as the training path's fused
  `ops.token_logprobs` (no [tokens, vocab] logits): once for the log-probs, and once with `logit_floor` at the
  target's own logit for is_greedy (the distribution renormalised over the tokens whose logit reaches the
  target's: log-prob 0 when the target is the strict maximum, at most -log 2 when another token reaches it).
- `loglikelihood_rolling` (text): lm-eval's disjoint rolling windows of `max_length` tokens
  (`get_rolling_token_windows`, `make_disjoint_window`, one token of context), scored as above and summed.
- `generate_until` (context, gen_kwargs): `jaxalign.rollout.generate` (KV cache, one jitted loop) on the left-
  padded contexts (left-truncated to max_length - max_gen_toks), greedy unless gen_kwargs ask to sample, then
  the text cut at the first `until` string. The loop stops at EOS only: every row generates up to
  max_gen_toks tokens unless it ends with EOS.

Shapes are bucketed so a task compiles a handful of programs: rows padded to a power of two >= 16 positions
(capped at max_length), continuation windows to a power of two >= 4 (capped at the row length), every batch
filled to `batch_size` rows; requests are sorted by length (longest first) and answered in request order.
`compile_counts` counts the traces of each kind.

Single-process only: under a multi-process JAX job every process would need to feed its share of global
arrays, which this adapter does not do.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import types
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from jaxalign import ops, sharding
from jaxalign.models import load_hf
from jaxalign.ops.xla_chunked import soft_cap
from jaxalign.rollout.sampler import SamplingConfig, generate, left_pad

log = logging.getLogger(__name__)

# A row's target counts as greedy when its log-prob renormalised over {v : logit_v >= logit_target} exceeds
# this: 0 when the target is the strict maximum, <= -log 2 when another token reaches its logit.
_GREEDY_LOGP = -0.5 * math.log(2.0)


def bucket(length: int, smallest: int, largest: int) -> int:
  """The padded size of `length`: the next power of two >= smallest, capped at largest."""
  return min(largest, max(smallest, 1 << max(length - 1, 0).bit_length()))


def continuation_scores(model, ids: jax.Array, mask: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed log-probs [B] of continuation tokens and whether each is the greedy continuation [B].

  ids, mask [B, T]: left-padded rows (context + continuation minus its last token). targets [B, C]: the
  continuation tokens right-aligned, -1 before them; target j is predicted at position T - C + j. Log-probs
  come from the last C hidden states through `ops.token_logprobs` (never [B, C, V] logits); is_greedy from a
  second fused pass renormalised over the tokens whose logit reaches the target's (see the module docstring).
  """
  b, c = targets.shape
  hidden = model.hidden_states(ids, mask)[:, -c:]  # [B, C, D]
  hidden = hidden.reshape(b * c, hidden.shape[-1])
  flat = targets.reshape(-1)
  valid = flat >= 0
  weight = model.head_weight().astype(hidden.dtype)  # [D, V], the compute dtype (as the training path)
  cap = model.config.final_logit_softcap
  logps = ops.token_logprobs(hidden, weight, flat, logit_softcap=cap)
  rows = jnp.take(weight.T, jnp.maximum(flat, 0), axis=0)  # [N, D] the targets' head columns
  own = soft_cap(jnp.sum(hidden.astype(jnp.float32) * rows.astype(jnp.float32), axis=-1), cap)  # [N]
  top = ops.token_logprobs(hidden, weight, flat, logit_floor=jnp.where(valid, own, -jnp.inf), logit_softcap=cap)
  greedy = (top > _GREEDY_LOGP) | ~valid
  return jnp.sum(jnp.where(valid, logps, 0.0).reshape(b, c), axis=1), jnp.all(greedy.reshape(b, c), axis=1)


class _Traces:
  """Counts traces (compilations, or loads from the persistent cache) of each jitted program."""

  def __init__(self):
    self.counts = collections.Counter()

  def score(self, graphdef, state, ids, mask, targets):
    self.counts["loglikelihood"] += 1
    return continuation_scores(nnx.merge(graphdef, state), ids, mask, targets)

  def generate(self, graphdef, cfg, state, ids, mask, key):
    self.counts["generate"] += 1
    out = generate(nnx.merge(graphdef, state), ids, mask, key, cfg)
    return out.tokens, out.mask, out.finished


def _as_int(value, name: str) -> int:
  try:
    number = int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r} must be an integer") from None
  if number < 1:
    raise ValueError(f"{name}={value!r} must be >= 1")
  return number


@register_model("jaxalign")
class JaxalignLM(TemplateLM):
  """lm-eval's model interface over a jaxalign `CausalLM` (see the module docstring).

  Args:
    pretrained: a local HF directory (config.json, safetensors, tokenizer files) read with
      `jaxalign.models.load_hf`; or None with `model`.
    model: an in-memory `CausalLM` (its parameters are read at every call, so a model trained further between
      evaluations is evaluated as it is then).
    tokenizer: a transformers tokenizer, or a path (an HF directory, or a bare tokenizer.json whose one special
      token is its end-of-text, as `trainer.build_tokenizer` reads); default: the one in `pretrained`.
    mesh: None (one device), a `jax.sharding.Mesh`, a `sharding.MeshConfig`, or "auto" (`MeshConfig()`: FSDP
      over every device). Parameters are placed by `rules`, batches split over the batch axes.
    dtype: parameter dtype when loading `pretrained` ("float32", "bfloat16").
    batch_size: rows per compiled batch (rounded up to a multiple of the batch-axis devices); lm-eval's "auto"
      is not supported and means the default.
    max_length: the longest row in tokens (default: the model's max_position_embeddings).
    max_gen_toks: new tokens for `generate_until` when a request does not say.
    add_bos_token: as lm-eval's HF model (None: the tokenizer's own default for special tokens).
    prefix_token_id: the token an empty context becomes (default: BOS, else EOS).
    seed: the PRNG seed of sampled generation.
    device, max_batch_size, **unused: lm-eval's generic arguments, ignored.
  """

  def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None, mesh=None,
               rules: sharding.Rules = sharding.DEFAULT_RULES, dtype: str = "float32", batch_size: int | str = 8,
               max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
               prefix_token_id: int | None = None, seed: int = 0, scan_layers: bool = False, device=None,
               max_batch_size=None, **unused):
    super().__init__()
    if unused:
      log.warning("JaxalignLM ignores the arguments %s", sorted(unused))
    if (pretrained is None) == (model is None):
      raise ValueError("JaxalignLM needs exactly one of pretrained= (an HF directory) or model= (a CausalLM)")
    if isinstance(mesh, str):
      if mesh != "auto":
        raise ValueError(f"mesh={mesh!r}: pass a jax Mesh, a sharding.MeshConfig, 'auto' or None")
      mesh = sharding.MeshConfig(rules=rules)
    if isinstance(mesh, sharding.MeshConfig):
      rules, mesh = mesh.rules, sharding.make_mesh(mesh)
    self.mesh, self.rules = mesh, rules
    if pretrained is not None:
      model, _ = load_hf(pretrained, dtype=dtype, mesh=mesh, rules=rules, scan_layers=scan_layers)
      tokenizer = pretrained if tokenizer is None else tokenizer
    if not hasattr(model, "head_weight"):
      raise ValueError(f"JaxalignLM needs a causal LM (jaxalign.models.CausalLM), got {type(model).__name__}")
    if tokenizer is None:
      raise ValueError("JaxalignLM(model=...) needs tokenizer= (a transformers tokenizer or a path)")
    self.model = model
    self.tokenizer = _tokenizer(tokenizer) if isinstance(tokenizer, str) or hasattr(tokenizer, "__fspath__") \
        else tokenizer
    if self.tokenizer.eos_token_id is None:
      raise ValueError("the tokenizer has no EOS token; lm-eval needs one (end of text, empty contexts)")
    if len(self.tokenizer) > model.config.vocab_size:
      raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens, the model's vocabulary "
                       f"{model.config.vocab_size}")
    self.batch_size = self._rows(8 if str(batch_size).startswith("auto") else _as_int(batch_size, "batch_size"))
    self._max_length = _as_int(max_length or model.config.max_position_embeddings, "max_length")
    self.max_gen_toks = _as_int(max_gen_toks, "max_gen_toks")
    self.add_bos_token = add_bos_token
    self.custom_prefix_token_id = prefix_token_id
    self._key = jax.random.key(seed)
    self._calls = 0
    self._traces = _Traces()
    self._score = jax.jit(self._traces.score, static_argnums=0)
    self._generate = jax.jit(self._traces.generate, static_argnums=(0, 1))

  # --- lm-eval's tokenizer interface (as lm_eval.models.huggingface.HFLM) ---

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    if self.custom_prefix_token_id is not None:
      return self.custom_prefix_token_id
    if self.tokenizer.bos_token_id is not None:
      return self.tokenizer.bos_token_id
    return self.tokenizer.eos_token_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def compile_counts(self) -> dict[str, int]:
    """How many times each program ("loglikelihood", "generate") has been traced (one per distinct shape)."""
    return dict(self._traces.counts)

  @property
  def tokenizer_name(self) -> str:
    return str(self.tokenizer.name_or_path).replace("/", "__")

  def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
    return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                              add_generation_prompt=add_generation_prompt,
                                              continue_final_message=not add_generation_prompt)

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                 **kwargs) -> list[int]:
    if add_special_tokens is not None:
      special = {"add_special_tokens": add_special_tokens}
    elif (prefix := self.tokenizer.decode([self.prefix_token_id])) and string.startswith(prefix):
      special = {"add_special_tokens": False}  # the text already starts with the prefix token
    elif self.add_bos_token is not None:
      special = {"add_special_tokens": self.add_bos_token}
    else:
      special = {}
    encoding = self.tokenizer.encode(string, **special)
    return encoding[-left_truncate_len:] if left_truncate_len else encoding

  def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

  def get_model_info(self) -> dict:
    cfg = self.model.config
    return {"model_family": cfg.family, "model_num_layers": cfg.num_layers, "model_hidden_size": cfg.hidden_size,
            "model_dtype": str(cfg.param_dtype), "max_length": self.max_length}

  # --- requests ---

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    """(summed log-prob, is_greedy) of each (cache key, context tokens, continuation tokens), in order."""
    length = self.max_length
    rows = []
    for key, context, continuation in requests:
      if len(continuation) > length:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit max_length={length} "
                         f"(request {key!r:.80})")
      whole = (list(context or [self.prefix_token_id]) + list(continuation))[-(length + 1):]
      rows.append((whole[:-1], list(continuation)))
    # An empty continuation has probability 1; the rest run longest first (few distinct bucketed shapes).
    results: list[tuple[float, bool] | None] = [None if cont else (0.0, True) for _, cont in rows]
    order = sorted((i for i, (_, cont) in enumerate(rows) if cont), key=lambda i: (-len(rows[i][0]), i))
    with self._context(), tqdm(total=len(order), disable=disable_tqdm, desc="loglikelihood") as bar:
      graphdef, state = self._split()
      for start in range(0, len(order), self.batch_size):
        chunk = order[start:start + self.batch_size]
        batch = [rows[i] for i in chunk] + [rows[chunk[0]]] * (self.batch_size - len(chunk))
        t = bucket(max(len(inputs) for inputs, _ in batch), 16, length)
        c = bucket(max(len(cont) for _, cont in batch), 4, t)
        ids, mask = left_pad([inputs for inputs, _ in batch], self.tokenizer.pad_token_id or 0, t)
        targets = np.full((len(batch), c), -1, np.int32)
        for row, (_, cont) in enumerate(batch):
          targets[row, c - len(cont):] = cont
        logps, greedy = jax.device_get(self._score(graphdef, state, *self._place(ids, mask, targets)))
        for row, i in enumerate(chunk):
          results[i] = (float(logps[row]), bool(greedy[row]))
        bar.update(len(chunk))
    for (key, _, _), answer in zip(requests, results, strict=True):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, answer)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Summed log-prob of each whole text, in lm-eval's disjoint rolling windows of max_length tokens."""
    windows, owners = [], []
    for index, request in enumerate(requests):
      (text,) = request.args
      pairs = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                 max_seq_len=self.max_length, context_len=1)
      for context, continuation in map(lm_utils.make_disjoint_window, pairs):
        windows.append((None, context, continuation))
        owners.append(index)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for index, (logp, _) in zip(owners, scores, strict=True):
      totals[index] += logp
    for request, total in zip(requests, totals, strict=True):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Each request's generated text, cut at its first `until` string (and EOS)."""
    eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
    jobs = []  # (sampling config, prompt tokens, stop strings)
    for request in requests:
      context, gen_kwargs = request.args
      cfg, until = self._sampling(dict(gen_kwargs or {}))
      room = self.max_length - cfg.max_new_tokens
      if room < 1:
        raise ValueError(f"max_gen_toks={cfg.max_new_tokens} leaves no room for a context in "
                         f"max_length={self.max_length}")
      prompt = self.tok_encode(context, left_truncate_len=room) or [self.prefix_token_id]
      jobs.append((cfg, prompt, [s for s in until + [eos_text] if s]))
    results: list[str | None] = [None] * len(jobs)
    groups = collections.defaultdict(list)
    for i, (cfg, prompt, _) in enumerate(jobs):
      groups[cfg].append(i)
    self._calls += 1
    with self._context(), tqdm(total=len(jobs), disable=disable_tqdm, desc="generate_until") as bar:
      graphdef, state = self._split()
      for cfg, members in groups.items():
        members.sort(key=lambda i: (-len(jobs[i][1]), i))
        for start in range(0, len(members), self.batch_size):
          chunk = members[start:start + self.batch_size]
          prompts = [jobs[i][1] for i in chunk] + [jobs[chunk[0]][1]] * (self.batch_size - len(chunk))
          p = bucket(max(len(x) for x in prompts), 16, self.max_length - cfg.max_new_tokens)
          ids, mask = left_pad(prompts, cfg.pad_token_id, p)
          key = jax.random.fold_in(jax.random.fold_in(self._key, self._calls), chunk[0])
          tokens, done, finished = jax.device_get(self._generate(graphdef, cfg, state, *self._place(ids, mask), key))
          for row, i in enumerate(chunk):
            completion = tokens[row][done[row] == 1]
            if finished[row]:
              completion = completion[:-1]
            text = self.tok_decode(completion.tolist())
            for stop in jobs[i][2]:
              text = text.split(stop)[0]
            results[i] = text
            self.cache_hook.add_partial("generate_until", requests[i].args, text)
          bar.update(len(chunk))
    return results

  # --- helpers ---

  def _sampling(self, kwargs: dict) -> tuple[SamplingConfig, list[str]]:
    """The sampler's config and the stop strings of a request's gen_kwargs: greedy unless do_sample is true or
    (do_sample unset) temperature > 0; max_gen_toks, top_k, top_p as given."""
    until = kwargs.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    max_new = _as_int(kwargs.pop("max_gen_toks", self.max_gen_toks), "max_gen_toks")
    do_sample = kwargs.pop("do_sample", None)
    temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0) or 0.0)
    if do_sample is False:
      temperature = 0.0
    elif do_sample and temperature == 0.0:
      temperature = 1.0
    top_k, top_p = int(kwargs.pop("top_k", 0) or 0), float(kwargs.pop("top_p", 1.0) or 1.0)
    if kwargs:
      log.warning("generate_until ignores gen_kwargs %s", sorted(kwargs))
    eos = [self.eot_token_id]
    config_eos = self.model.config.eos_token_id
    eos += [e for e in (config_eos if isinstance(config_eos, tuple) else (config_eos,)) if e is not None]
    pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
    cfg = SamplingConfig(max_new_tokens=max_new, temperature=temperature, top_k=top_k if temperature else 0,
                         top_p=top_p if temperature else 1.0, eos_token_id=tuple(dict.fromkeys(eos)),
                         pad_token_id=pad)
    return cfg, until

  def _rows(self, batch_size: int) -> int:
    """batch_size rounded up to a multiple of the devices the batch axis splits over."""
    if self.mesh is None:
      return batch_size
    axes = dict(self.rules).get("batch")
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    devices = math.prod(self.mesh.shape[a] for a in axes)
    return -(-batch_size // devices) * devices

  def _context(self):
    return contextlib.nullcontext() if self.mesh is None else sharding.use_mesh(self.mesh, self.rules)

  def _split(self):
    """(graphdef, state) of the model now, the state placed on the mesh by the rules."""
    graphdef, state = nnx.split(self.model)
    if self.mesh is not None:
      state = jax.device_put(state, sharding.param_shardings(state, self.mesh, self.rules))
    return graphdef, state

  def _place(self, *arrays: np.ndarray):
    """Host batches as device arrays, split over the mesh's batch axes."""
    if self.mesh is None:
      return arrays
    return tuple(jax.device_put(x, sharding.batch_sharding(self.mesh, x.ndim, self.rules, x.shape[0]))
                 for x in arrays)


def _tokenizer(path):
  """A tokenizer from an HF directory or a bare tokenizer.json (`trainer.build_tokenizer`'s rules)."""
  from jaxalign.trainer import build_tokenizer

  return build_tokenizer(types.SimpleNamespace(tokenizer=str(path), init_from=None))
