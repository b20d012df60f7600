"""Device mesh, logical-axis sharding rules, and multi-process start-up.

Parameters carry logical axis names (``embed``, ``mlp``, ``q_heads``, ``vocab``, ...) in their
``logical_axes`` metadata. One rules table maps each logical name to zero or more mesh axes of the
(data, fsdp, tensor) mesh, so changing parallelism is a config change. Model code never names a
mesh axis: it calls :func:`constrain` with logical names, a no-op outside :func:`use_mesh`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Logical name -> mesh axes. FSDP shards the model width; tensor parallelism the heads, MLP and vocab.
DEFAULT_RULES: Rules = (
  ("batch", ("data", "fsdp")),
  ("seq", None),
  ("embed", "fsdp"),
  ("act_embed", None),
  ("mlp", "tensor"),
  ("q_heads", "tensor"),
  ("kv_heads", "tensor"),
  ("vocab", "tensor"),
  ("norm", None),
  ("head_dim", None),
  ("scalar", None),
  ("layers", None),  # the stacked-blocks axis of scan_layers: every device holds every layer's shard
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape and the logical-to-mesh rules table.

  Each of data/fsdp/tensor is a device count; one of them may be -1, meaning "all remaining devices".
  """

  data: int = 1
  fsdp: int = -1
  tensor: int = 1
  rules: Rules = DEFAULT_RULES
  # "auto": call jax.distributed.initialize() when the environment describes a multi-process job.
  distributed: str = "auto"

  def __post_init__(self):
    sizes = (self.data, self.fsdp, self.tensor)
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} must be positive, with at most one -1")
    if self.distributed not in ("auto", "on", "off"):
      raise ValueError(f"mesh.distributed={self.distributed!r} must be one of 'auto', 'on', 'off'")
    known = {name for name, _ in self.rules}
    for _, axes in self.rules:
      for axis in _as_tuple(axes):
        if axis not in MESH_AXES:
          raise ValueError(f"mesh rule names mesh axis {axis!r}; mesh axes are {MESH_AXES}")
    missing = {"batch", "embed", "vocab"} - known
    if missing:
      raise ValueError(f"mesh.rules has no entry for logical axes {sorted(missing)}")

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % fixed:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
      sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, found {num_devices}")
    return tuple(sizes)


def _as_tuple(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes (so sharding constraints and GSPMD propagation apply)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = (config.data, config.fsdp, config.tensor)
  if -1 not in sizes and math.prod(sizes) < len(devices):
    log.warning("mesh %s uses %d of %d devices", sizes, math.prod(sizes), len(devices))
    devices = devices[:math.prod(sizes)]
  shape = config.shape(len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh,
                    rules: Rules = DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec for an array of `shape` whose axes have logical `names`.

  A mesh axis is used at most once per array, and a dimension that its mesh axes do not divide
  evenly stays replicated over them (e.g. 2 KV heads on a 4-way tensor axis).
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape, strict=True):
    axes = [a for a in _as_tuple(table.get(name)) if a not in used and mesh.shape[a] > 1]
    while axes and size % math.prod(mesh.shape[a] for a in axes):
      axes.pop()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*spec)


def param_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
  """NamedSharding for every variable of an (abstract or concrete) model state, from its logical axes."""

  def sharding_of(var):
    names = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
    return var.replace(NamedSharding(mesh, logical_to_spec(names, var.shape, mesh, rules)))

  return jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(build, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
  """Build an NNX module with every parameter created directly in its sharding (no replicated copy).

  `build` is a zero-argument function returning the module; it must make its own `nnx.Rngs` from a
  seed (e.g. ``lambda: CausalLM(cfg, rngs=nnx.Rngs(0))``), since it runs under jit.
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  shardings = param_shardings(abstract, mesh, rules)

  def init():
    return nnx.split(build())[1]

  with use_mesh(mesh, rules):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def shard_module(module, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
  """Move an existing module's parameters to their rule-given shardings (in place)."""
  state = nnx.state(module)
  nnx.update(module, jax.device_put(state, param_shardings(state, mesh, rules)))
  return module


_ACTIVE_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("jaxalign_rules", default=None)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
  """Make `mesh` current and turn on activation constraints by logical name."""
  token = _ACTIVE_RULES.set(rules)
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _ACTIVE_RULES.reset(token)


def active_rules() -> Rules | None:
  """The rules table of the enclosing `use_mesh`, or None outside one."""
  return _ACTIVE_RULES.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical axis names; identity outside `use_mesh`."""
  rules = _ACTIVE_RULES.get()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, rules))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, rules: Rules = DEFAULT_RULES,
                   batch_size: int | None = None) -> NamedSharding:
  """Sharding for a batch array [B, ...]: batch over its rule's mesh axes, the rest replicated."""
  shape = (batch_size if batch_size is not None else int(np.prod(mesh.devices.shape)),) + (1,) * (ndim - 1)
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), shape, mesh, rules))


def _multiprocess_env() -> bool:
  """True when the launcher describes a job of more than one process."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(mode: str = "auto", **kwargs) -> bool:
  """Start jax.distributed when asked ("on") or when the environment is a multi-process job ("auto").

  kwargs (coordinator_address, num_processes, process_id) go to jax.distributed.initialize; without
  them JAX reads the cluster (SLURM, Open MPI, Cloud TPU, JAX_* variables). Returns whether it ran.
  """
  if mode == "off" or (mode == "auto" and not kwargs and not _multiprocess_env()):
    return False
  jax.distributed.initialize(**kwargs)
  log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
