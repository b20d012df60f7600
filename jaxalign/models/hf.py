"""Hugging Face checkpoints in and out: config.json + safetensors (+ tokenizer files).

Parameter names follow HF's, so a jaxalign path ``model/layers/0/self_attn/q_proj/kernel`` is the
HF key ``model.layers.0.self_attn.q_proj.weight`` (kernels are stored transposed, [out, in]).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxalign import sharding
from jaxalign.models.config import DTYPES, ModelConfig, RopeConfig
from jaxalign.models.decoder import CausalLM, ScalarModel
from jaxalign.models.families import FAMILIES, Family

_ACTIVATION_FROM_HF = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
                       "gelu_new": "gelu_tanh"}
_IGNORED_KEYS = ("rotary_emb.inv_freq",)
_MAX_SHARD_BYTES = 4 << 30


class CheckpointError(ValueError):
  """A checkpoint directory that jaxalign cannot read as the model it describes."""


# ----------------------------------------------------------------------------- config.json


# config.json keys of the Gemma 2 / 3 attention and head, and the ModelConfig fields they fill.
_GEMMA_KEYS = {"attn_logit_softcapping": "attn_logit_softcap", "final_logit_softcapping": "final_logit_softcap",
               "query_pre_attn_scalar": "query_pre_attn_scalar"}


def _rope_from_hf(hf: dict, where: str, params: dict | None = None, theta: float | None = None) -> RopeConfig:
  """The RoPE of config.json's `rope_parameters` (or `params`, one layer type's entry; `theta` its legacy
  base when the entry has none)."""
  if params is None:
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}  # transformers < 5 kept theta and scaling apart
    params = {**legacy, **params}
  theta = params.get("rope_theta", theta if theta is not None else hf.get("rope_theta", 10_000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in ("default", "linear", "llama3"):
    raise CheckpointError(f"{where}: rope type {rope_type!r} is not supported (default, linear, llama3)")
  fields = {k: params[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            if k in params}
  return RopeConfig(theta=float(theta), type=rope_type, **fields)


def _ropes_from_hf(hf: dict, where: str, fam: Family) -> dict:
  """{"rope": ..., "rope_local": ...} of config.json: one RoPE, or (Gemma 3) the global layers' and the local
  ones', from `rope_parameters` per layer type or the legacy `rope_theta` / `rope_scaling` /
  `rope_local_base_freq`."""
  if not fam.rope_per_layer_type:
    return {"rope": _rope_from_hf(hf, where)}
  params = hf.get("rope_parameters") or {}
  if "full_attention" in params:
    return {"rope": _rope_from_hf(hf, where, dict(params["full_attention"])),
            "rope_local": _rope_from_hf(hf, where, dict(params.get("sliding_attention") or {}),
                                        hf.get("rope_local_base_freq", 10_000.0))}
  return {"rope": _rope_from_hf(hf, where, {**(hf.get("rope_scaling") or {}), **params}),
          "rope_local": _rope_from_hf(hf, where, {}, hf.get("rope_local_base_freq", 10_000.0))}


def _layer_types_default(fam: Family, num_layers: int, hf: dict) -> list[str]:
  """Gemma's layer pattern when config.json predates `layer_types`: every `sliding_window_pattern`-th layer
  (Gemma 3: 6) or every other one (Gemma 2) is global, the rest local."""
  period = hf.get("sliding_window_pattern") or (6 if fam.rope_per_layer_type else 2)
  return ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(num_layers)]


def _sliding_from_hf(hf: dict, fam: Family, num_layers: int) -> tuple[int | None, tuple[bool, ...] | None]:
  """(sliding_window, sliding_layers) of config.json, as the family marks them (`Family.sliding`)."""
  window = hf.get("sliding_window")
  if fam.sliding is None:
    return None, None
  if fam.sliding == "all":
    return window, None
  if fam.sliding == "qwen":
    types = hf.get("layer_types") or ["full_attention"] * num_layers
    layers = tuple(t == "sliding_attention" for t in types)
    return (window, layers) if hf.get("use_sliding_window") and any(layers) else (None, None)
  types = hf.get("layer_types") or _layer_types_default(fam, num_layers, hf)
  layers = tuple(t == "sliding_attention" for t in types)
  # Without a window the layer types still choose Gemma 3's local RoPE (`ModelConfig.layer_rope`).
  keep = any(layers) and (window is not None or fam.rope_per_layer_type)
  return (window, layers) if keep else (None, None)


def config_from_hf(hf: dict, where: str = "config.json", dtype: str = "float32") -> ModelConfig:
  """ModelConfig from a parsed HF config.json (`where` names the file in errors)."""
  name = hf.get("model_type")
  if name not in FAMILIES:
    raise CheckpointError(f"{where}: model_type {name!r} is not supported; supported: {sorted(FAMILIES)}")
  fam = FAMILIES[name]
  if "num_experts" in fam.moe_keys and "num_experts" not in hf and "num_local_experts" in hf:
    hf = {**hf, "num_experts": hf["num_local_experts"]}  # transformers 5's name for Qwen's expert count
  hf = {**fam.hf_defaults, **hf}  # keys the file omits take transformers' defaults for the family
  act_name = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
  if act_name not in _ACTIVATION_FROM_HF:
    raise CheckpointError(f"{where}: hidden_act {act_name!r} is not supported")
  for key in ("mlp_bias",) + (("attention_bias",) if not fam.switches["qkv_bias"] else ()):
    if hf.get(key):
      raise CheckpointError(f"{where}: {key}=true is not supported for model_type {name!r}")
  gemma = {field: hf[key] for key, field in _GEMMA_KEYS.items() if hf.get(key) is not None} if fam.gemma_keys else {}
  moe = {field: hf[key] for key, field in fam.moe_keys.items() if hf.get(key) is not None}
  if fam.moe_keys and (hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers")):
    raise CheckpointError(f"{where}: dense MLP layers among the experts are not supported (decoder_sparse_step="
                          f"{hf.get('decoder_sparse_step', 1)}, mlp_only_layers={hf.get('mlp_only_layers', [])}; "
                          f"supported: every layer a mixture of experts)")
  eos = hf.get("eos_token_id")
  try:
    num_layers = hf["num_hidden_layers"]
    window, sliding_layers = _sliding_from_hf(hf, fam, num_layers)
    return ModelConfig(
      family=name, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"], num_layers=num_layers, num_heads=hf["num_attention_heads"],
      num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=hf.get("head_dim"),
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      max_position_embeddings=hf.get("max_position_embeddings", 2048), sliding_window=window,
      sliding_layers=sliding_layers, activation=_ACTIVATION_FROM_HF[act_name],
      tie_embeddings=hf.get("tie_word_embeddings", fam.tied_by_default), bos_token_id=hf.get("bos_token_id"),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos, pad_token_id=hf.get("pad_token_id"),
      param_dtype=dtype, dtype=dtype, **_ropes_from_hf(hf, where, fam), **gemma, **moe, **fam.switches)
  except KeyError as e:
    raise CheckpointError(f"{where}: missing key {e.args[0]!r}") from None
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{where}: {e}") from None


def _rope_to_hf(rope: RopeConfig) -> dict:
  out = {"rope_type": rope.type, "rope_theta": rope.theta}
  if rope.type != "default":
    out["factor"] = rope.factor
  if rope.type == "llama3":
    out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
               original_max_position_embeddings=rope.original_max_position_embeddings)
  return out


def config_to_hf(cfg: ModelConfig, scalar_head: bool = False) -> dict:
  """The HF config.json dict for `cfg` (errors if a switch is not expressible in its model_type)."""
  fam = FAMILIES.get(cfg.family)
  if fam is None:
    raise CheckpointError(f"family {cfg.family!r} has no HF model_type; supported: {sorted(FAMILIES)}")
  for key, value in fam.switches.items():
    if getattr(cfg, key) != value:
      raise CheckpointError(f"HF model_type {cfg.family!r} requires {key}={value}, config has {getattr(cfg, key)}")
  unsupported = [f"{field}={getattr(cfg, field)}" for field in _GEMMA_KEYS.values()
                 if getattr(cfg, field) is not None and not fam.gemma_keys]
  if cfg.rope_local is not None and not fam.rope_per_layer_type:
    unsupported.append(f"rope_local={cfg.rope_local}")
  if cfg.sliding_window is not None and fam.sliding is None:
    unsupported.append(f"sliding_window={cfg.sliding_window}")
  if bool(cfg.num_experts) != bool(fam.moe_keys):
    unsupported.append(f"num_experts={cfg.num_experts}")
  if cfg.num_experts and "moe_intermediate_size" not in fam.moe_keys and cfg.expert_size != cfg.intermediate_size:
    unsupported.append(f"moe_intermediate_size={cfg.moe_intermediate_size} (its experts are intermediate_size wide)")
  if unsupported:
    raise CheckpointError(f"HF model_type {cfg.family!r} cannot express {', '.join(unsupported)}")
  rope = _rope_to_hf(cfg.rope)
  if fam.rope_per_layer_type:
    rope = {"full_attention": rope, "sliding_attention": _rope_to_hf(cfg.rope_local or cfg.rope)}
  activation = "gelu_pytorch_tanh" if cfg.activation == "gelu_tanh" else cfg.activation
  hf = dict(
    architectures=[fam.scalar_class if scalar_head else fam.causal_class], model_type=cfg.family,
    vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
    num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
    head_dim=cfg.head_size, hidden_act=activation, rms_norm_eps=cfg.rms_norm_eps,
    max_position_embeddings=cfg.max_position_embeddings, rope_parameters=rope,
    tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token_id,
    eos_token_id=list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
    pad_token_id=cfg.pad_token_id, dtype=cfg.param_dtype, attention_bias=cfg.qkv_bias)
  if scalar_head:
    hf.update(num_labels=1, id2label={0: "LABEL_0"}, label2id={"LABEL_0": 0})
  if fam.gemma_keys:  # None is a value here: no cap (transformers' Gemma 2 defaults would cap)
    hf.update({key: getattr(cfg, field) for key, field in _GEMMA_KEYS.items()}, hidden_activation=activation)
    if cfg.query_pre_attn_scalar is None:
      hf["query_pre_attn_scalar"] = cfg.head_size
  if fam.moe_keys:
    hf.update({key: getattr(cfg, field) for key, field in fam.moe_keys.items()})
    if "moe_intermediate_size" in fam.moe_keys:  # Qwen: every layer a mixture of experts
      hf.update(moe_intermediate_size=cfg.expert_size, decoder_sparse_step=1, mlp_only_layers=[])
  layer_types = ["sliding_attention" if cfg.local_layer(i) else "full_attention" for i in range(cfg.num_layers)]
  if fam.sliding == "all":
    hf["sliding_window"] = cfg.sliding_window
  elif fam.sliding == "qwen":
    hf.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
              layer_types=layer_types)
  elif fam.sliding == "layer_types":
    hf.update(sliding_window=cfg.sliding_window, layer_types=layer_types)
  return hf


# ----------------------------------------------------------------------------- weights


def hf_key(path: tuple) -> tuple[str, bool]:
  """HF tensor name for a jaxalign parameter path, and whether the tensor is stored transposed."""
  *prefix, leaf = (str(p) for p in path)
  return ".".join(prefix + ["weight" if leaf in ("kernel", "embedding") else leaf]), leaf == "kernel"


def _stacked_axes(path: tuple, cfg: ModelConfig) -> list[tuple[int, int]]:
  """(position in `path` after which HF has an index, stack size) for each leading stacked axis of a parameter:
  the layers of a scan_layers stack (`model/layers/<module>`, no layer index) and the experts of a
  mixture-of-experts kernel (`.../experts/<projection>`), in that order."""
  axes = []
  if "layers" in path and not isinstance(path[path.index("layers") + 1], int):
    axes.append((path.index("layers") + 1, cfg.num_layers))
  if "experts" in path:
    axes.append((path.index("experts") + 1, cfg.num_experts))
  return axes


def hf_keys(path: tuple, cfg: ModelConfig) -> tuple[np.ndarray, bool]:
  """The HF tensor names a parameter holds, shaped like its stacked axes (one name per layer of a scan_layers
  stack [L, ...], per expert of an expert kernel [E, ...], both [L, E, ...]; a 0-d array otherwise), and whether
  they are stored transposed."""
  axes = _stacked_axes(path, cfg)
  keys = np.empty(tuple(size for _, size in axes), dtype=object)
  for index in np.ndindex(keys.shape):
    named = list(path)
    for (at, _), i in sorted(zip(axes, index), reverse=True):  # insert from the back: positions stay valid
      named.insert(at, i)
    keys[index] = hf_key(tuple(named))[0]
  return keys, hf_key(path)[1]


def _tensor_index(path: pathlib.Path) -> dict[str, pathlib.Path]:
  """Tensor name -> safetensors file, from model.safetensors or a sharded index."""
  index = path / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    return {key: path / file for key, file in weight_map.items()}
  single = path / "model.safetensors"
  if not single.exists():
    raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
  with safe_open(single, framework="numpy") as f:
    return {key: single for key in f.keys()}


def _is_scalar_checkpoint(hf: dict) -> bool:
  return any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or ())


def load_hf(path: str | os.PathLike, *, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None,
            rules: sharding.Rules = sharding.DEFAULT_RULES, scan_layers: bool = False):
  """Read a local HF directory into a jaxalign model. Returns (model, config).

  `*ForCausalLM` checkpoints give a `CausalLM`, `*ForSequenceClassification` (one label) a `ScalarModel`.
  With a mesh, each parameter is read slice by slice straight into its sharding (no replicated copy).
  With scan_layers the blocks' parameters are read into [L, ...] stacks (`ModelConfig.scan_layers`).
  """
  path = pathlib.Path(path)
  config_file = path / "config.json"
  if not config_file.exists():
    raise CheckpointError(f"{path}: no config.json (is this a Hugging Face model directory?)")
  if dtype not in DTYPES:
    raise CheckpointError(f"dtype={dtype!r} is not supported; choose one of {tuple(DTYPES)}")
  hf = json.loads(config_file.read_text())
  cfg = config_from_hf(hf, str(config_file), dtype).replace(scan_layers=scan_layers)
  model_cls = ScalarModel if _is_scalar_checkpoint(hf) else CausalLM
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0))))
  if mesh is not None:
    shardings = sharding.param_shardings(abstract, mesh, rules)
  else:
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda v: v.replace(single), abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))

  files = _tensor_index(path)
  handles = {}
  try:
    def open_tensor(key: str, expected: tuple):
      if key not in files:
        raise CheckpointError(f"{path}: tensor {key!r} missing from the checkpoint")
      if files[key] not in handles:
        handles[files[key]] = safe_open(files[key], framework="numpy")
      tensor = handles[files[key]].get_slice(key)
      if tuple(tensor.get_shape()) != tuple(expected):
        raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(tensor.get_shape())}, config.json implies "
                              f"{tuple(expected)}")
      return tensor

    def read(var_path, var, var_sharding):
      keys, transposed = hf_keys(var_path, cfg)
      stack = keys.ndim
      shape = var.shape[stack:]  # one HF tensor's shape (transposed back)
      tensors = np.empty(keys.shape, dtype=object)
      for i in np.ndindex(keys.shape):
        tensors[i] = open_tensor(keys[i], shape[::-1] if transposed else shape)

      def block(tensor, index):
        return np.asarray(tensor[index[::-1]].T if transposed else tensor[index], dtype=var.dtype)

      def shard(index):  # index: slices of var.shape; the stacked ones pick tensors, the rest slice each
        picked = tensors[index[:stack]] if stack else tensors  # an object array (0-d when nothing is stacked)
        parts = [block(tensor, index[stack:]) for tensor in picked.flat]
        return np.stack(parts).reshape(picked.shape + parts[0].shape) if stack else parts[0]

      return var.replace(jax.make_array_from_callback(var.shape, var_sharding.get_value(), shard))

    pairs = zip(nnx.to_flat_state(abstract), nnx.to_flat_state(shardings), strict=True)
    flat = [(p, read(p, v, s)) for (p, v), (_, s) in pairs]
  finally:
    for handle in handles.values():
      handle.__exit__(None, None, None)
  used = {key for p, _ in flat for key in hf_keys(p, cfg)[0].flat}
  if cfg.tie_embeddings:
    used.add("lm_head.weight")
  unexpected = sorted(k for k in files if k not in used and not k.endswith(_IGNORED_KEYS))
  if unexpected:
    raise CheckpointError(f"{path}: tensor {unexpected[0]!r} is not part of a {cfg.family} model with this "
                          f"config ({len(unexpected)} unexpected tensors)")
  return nnx.merge(graphdef, nnx.from_flat_state(flat)), cfg


def save_hf(model: CausalLM | ScalarModel, config: ModelConfig, path: str | os.PathLike, *, tokenizer=None,
            dtype: str | None = None) -> pathlib.Path:
  """Write `model` as an HF directory (config.json, safetensors, generation_config.json for causal LMs,
  tokenizer if given), atomically, readable like any file the process creates.

  The tokenizer's bos/eos/pad ids go into config.json (a tokenizer without a pad token pads with EOS), so
  transformers' `generate` stops at EOS and an exported reward model scores padded batches. Every process
  takes part in gathering sharded parameters; only process 0 writes, and with several processes all of
  them leave together once the directory exists.
  """
  path = pathlib.Path(path)
  scalar = isinstance(model, ScalarModel)
  config = config.replace(**_special_token_ids(config, tokenizer))
  hf = config_to_hf(config if dtype is None else config.replace(param_dtype=dtype), scalar_head=scalar)
  out_dtype = DTYPES[dtype or config.param_dtype]
  writer = jax.process_index() == 0
  tensors = {}
  for var_path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    array = jax.device_get(_gather(var[...]))  # a collective when sharded across processes: all take part
    if not writer:
      continue
    keys, transposed = hf_keys(var_path, config)
    array = np.asarray(array, dtype=out_dtype)
    for key, tensor in zip(keys.flat, array.reshape(-1, *array.shape[keys.ndim:]), strict=True):
      tensors[key] = np.ascontiguousarray(tensor.T if transposed else tensor)

  failure = None
  if writer:
    try:
      _write_dir(path, tensors, hf, tokenizer, generation=not scalar)
    except Exception as error:  # a full disk, a read-only folder, safetensors' own errors: one line
      reason = f"{error.strerror} [Errno {error.errno}]" if isinstance(error, OSError) and error.strerror else error
      failure = CheckpointError(f"cannot write the model export to {path}: {reason}")
  sharding.raise_together(failure, f"writing {path}")  # nobody reads the export before it exists
  return path


def _special_token_ids(config: ModelConfig, tokenizer=None) -> dict:
  """bos/eos/pad ids for the export: the tokenizer's where it has them (pad falls back to EOS), else the
  config's. Extra EOS ids of the config (e.g. Llama 3's list) are kept after the tokenizer's."""
  ids = dict(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
  if tokenizer is None:
    return ids
  eos = tokenizer.eos_token_id
  if eos is not None:
    known = config.eos_token_id if isinstance(config.eos_token_id, tuple) else (config.eos_token_id,)
    extra = tuple(i for i in known if i is not None and i != eos)
    ids["eos_token_id"] = (eos,) + extra if extra else eos
  if tokenizer.bos_token_id is not None:
    ids["bos_token_id"] = tokenizer.bos_token_id
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
  if pad is not None:
    ids["pad_token_id"] = pad
  return ids


def _generation_config(hf: dict):
  """transformers.GenerationConfig for a causal LM: the special-token ids of its config.json."""
  from transformers import GenerationConfig

  keys = ("bos_token_id", "eos_token_id", "pad_token_id")
  return GenerationConfig(**{k: hf[k] for k in keys if hf.get(k) is not None})


def _write_dir(path: pathlib.Path, tensors: dict, hf: dict, tokenizer, generation: bool) -> None:
  """Write the export into a fresh sibling folder, make it readable per the umask, swap it into `path`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  try:
    _write_safetensors(tensors, tmp)
    (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if generation:
      _generation_config(hf).save_pretrained(str(tmp))
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
    _set_modes(tmp, _umask())
    _replace_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _umask() -> int:
  """The process umask, read from /proc where possible (os.umask can only read it by setting it)."""
  try:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith("Umask:"):
        return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o077)
  os.umask(mask)
  return mask


def _set_modes(folder: pathlib.Path, umask: int) -> None:
  """Folders 0o777 & ~umask, files 0o666 & ~umask: what mkdtemp (0o700) and safetensors (0o600) withhold."""
  for root, _, files in os.walk(folder):
    os.chmod(root, 0o777 & ~umask)
    for name in files:
      os.chmod(os.path.join(root, name), 0o666 & ~umask)


def _gather(x: jax.Array) -> jax.Array:
  if x.is_fully_addressable:
    return x
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(x, tiled=True)


def _write_safetensors(tensors: dict[str, np.ndarray], folder: pathlib.Path) -> None:
  shards, current, size = [], {}, 0
  for key, array in tensors.items():
    if current and size + array.nbytes > _MAX_SHARD_BYTES:
      shards.append(current)
      current, size = {}, 0
    current[key], size = array, size + array.nbytes
  shards.append(current)
  if len(shards) == 1:
    save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
    return
  weight_map = {}
  for i, shard in enumerate(shards, 1):
    name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, folder / name, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, name))
  total = sum(a.nbytes for a in tensors.values())
  (folder / "model.safetensors.index.json").write_text(
    json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _replace_dir(new: pathlib.Path, target: pathlib.Path) -> None:
  """Swap `new` into place; the previous `target` (if any) survives until the swap is done."""
  if not target.exists():
    os.replace(new, target)
    return
  old = target.with_name(f".{target.name}.old")
  shutil.rmtree(old, ignore_errors=True)
  os.replace(target, old)
  os.replace(new, target)
  shutil.rmtree(old, ignore_errors=True)


def load_tokenizer(path: str | os.PathLike):
  """The tokenizer (chat template included) saved in an HF model directory, via transformers."""
  from transformers import AutoTokenizer

  path = pathlib.Path(path)
  if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
    raise CheckpointError(f"{path}: no tokenizer files (tokenizer.json, tokenizer.model or tokenizer_config.json)")
  return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
