"""Mesh sharding on 8 fake CPU devices: placement by the rules table, and results equal to 1 device."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxalign import sharding
from jaxalign.models import CausalLM, load_hf, save_hf, tiny

MESH = sharding.MeshConfig(data=2, fsdp=2, tensor=2)


def lm_loss(model, ids, mask):
  logits = model(ids[:, :-1], mask[:, :-1])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
  weights = mask[:, 1:]
  return jnp.sum(nll * weights) / jnp.sum(weights)


def test_parameters_are_sharded_as_the_rules_say():
  mesh = sharding.make_mesh(MESH)
  model = sharding.create_sharded(lambda: CausalLM(tiny("llama", vocab_size=64), rngs=nnx.Rngs(0)), mesh)
  layer = model.model.layers[0]
  expected = {
    "embedding": (model.model.embed_tokens.embedding, P("tensor", "fsdp")),
    "q_proj": (layer.self_attn.q_proj.kernel, P("fsdp", "tensor")),
    "o_proj": (layer.self_attn.o_proj.kernel, P("tensor", "fsdp")),
    "down_proj": (layer.mlp.down_proj.kernel, P("tensor", "fsdp")),
    "norm": (layer.input_layernorm.weight, P(None)),
    "lm_head": (model.lm_head.kernel, P("fsdp", "tensor")),
  }
  for name, (var, spec) in expected.items():
    array = var[...]
    assert array.sharding.spec == spec, name
    shard_shape = array.addressable_shards[0].data.shape
    assert shard_shape == array.sharding.shard_shape(array.shape), name
  q = layer.self_attn.q_proj.kernel[...]
  assert q.addressable_shards[0].data.shape == (q.shape[0] // 2, q.shape[1] // 2)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2_moe"])  # gemma2: Gemma's switches and more
def test_sharded_forward_and_gradients_equal_one_device(family):
  cfg = tiny(family, vocab_size=64)
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 64, size=(4, 12)))
  mask = jnp.asarray(np.arange(12)[None] < np.array([[12], [9], [7], [12]])).astype(jnp.int32)

  loss_and_grad = nnx.jit(nnx.value_and_grad(lm_loss))
  loss_1, grads_1 = loss_and_grad(model, ids, mask)

  mesh = sharding.make_mesh(MESH)
  sharded = sharding.shard_module(nnx.clone(model), mesh)
  batch = jax.device_put((ids, mask), sharding.batch_sharding(mesh, 2))
  with sharding.use_mesh(mesh):
    loss_8, grads_8 = loss_and_grad(sharded, *batch)
  assert len(loss_8.sharding.device_set) == 8
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-6)
  for g1, g8 in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_8), strict=True):
    np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=1e-4, atol=1e-6)


def test_load_hf_with_mesh_reads_each_parameter_into_its_sharding(tmp_path):
  cfg = tiny("qwen2", vocab_size=64)
  save_hf(CausalLM(cfg, rngs=nnx.Rngs(4)), cfg, tmp_path)
  mesh = sharding.make_mesh(MESH)
  sharded, _ = load_hf(tmp_path, mesh=mesh)
  plain, _ = load_hf(tmp_path)
  q_bias = sharded.model.layers[1].self_attn.q_proj.bias[...]
  assert q_bias.sharding.spec == P("tensor")
  embedding = sharded.model.embed_tokens.embedding[...]
  assert embedding.sharding.spec == P("tensor", "fsdp")
  assert embedding.addressable_shards[0].data.shape == (32, 32)
  for a, b in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(plain)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_indivisible_dimensions_stay_replicated():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=4))
  assert sharding.logical_to_spec(("embed", "kv_heads"), (64, 6), mesh) == P("fsdp", None)
  assert sharding.logical_to_spec(("batch", "seq"), (6, 5), mesh) == P("fsdp", None)
  assert sharding.logical_to_spec(("vocab", "embed"), (64, 64), mesh) == P("tensor", "fsdp")


def test_mesh_config_shapes_and_errors():
  assert sharding.MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 2)
  assert sharding.MeshConfig().shape(8) == (1, 8, 1)
  with pytest.raises(ValueError, match="needs 12 devices"):
    sharding.MeshConfig(data=3, fsdp=2, tensor=2).shape(8)
  assert sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=1)).size == 1
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.MeshConfig(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    sharding.MeshConfig(rules=(("batch", "data"), ("embed", "model"), ("vocab", None)))


def test_distributed_entry_point_stays_off_for_single_process(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  assert sharding.initialize_distributed("auto") is False
  assert sharding.initialize_distributed("off") is False
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert sharding._multiprocess_env()


def test_process_keys_come_from_the_config_else_the_jax_variables(monkeypatch):
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert sharding.distributed_kwargs(sharding.MeshConfig()) == {
    "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
  config = sharding.MeshConfig(coordinator_address="h:1", num_processes=2, process_id=1)
  assert sharding.distributed_kwargs(config) == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
  monkeypatch.setenv("JAX_PROCESS_ID", "three")
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='three' is not an integer"):
    sharding.distributed_kwargs(sharding.MeshConfig())
  monkeypatch.delenv("JAX_PROCESS_ID")
  with pytest.raises(ValueError, match="pass mesh.process_id=N"):
    sharding.initialize_distributed(sharding.MeshConfig())


WORKER = textwrap.dedent("""
  import sys, jax
  jax.config.update("jax_num_cpu_devices", 2)
  from jaxalign import sharding
  sharding.initialize_distributed("on", coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=1))
  x = jax.make_array_from_callback((4,), sharding.batch_sharding(mesh, 1), lambda i: jax.numpy.arange(4.0)[i])
  total = jax.jit(lambda a: a.sum(), out_shardings=jax.sharding.NamedSharding(mesh, jax.P()))(x)
  print("RESULT", jax.process_count(), jax.device_count(), float(total))
""")


def test_two_processes_form_one_mesh(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_")}
  procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
    assert out.splitlines()[-1].split() == ["RESULT", "2", "4", "6.0"]


def test_mesh_experts_key_maps_the_experts_axis_and_keeps_the_other_rules():
  cfg = sharding.MeshConfig(experts="fsdp")
  assert dict(cfg.rules)["experts"] == "fsdp"
  assert {k: v for k, v in cfg.rules if k != "experts"} == {k: v for k, v in sharding.DEFAULT_RULES if k != "experts"}
  assert dict(sharding.MeshConfig(experts=["data", "fsdp"]).rules)["experts"] == ("data", "fsdp")
  with pytest.raises(ValueError, match="mesh axis 'expert'"):
    sharding.MeshConfig(experts="expert")
