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
  ("experts", None),  # the stacked experts of a mixture-of-experts MLP (each expert FSDP-sharded like an MLP)
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
  # Multi-process jobs (one process per host): "auto" calls jax.distributed.initialize() when the environment
  # describes one (SLURM, Open MPI, Cloud TPU, JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES / JAX_PROCESS_ID)
  # or the keys below are set; "on" always, "off" never.
  distributed: str = "auto"
  # Expert parallelism: the mesh axes a mixture of experts' stacked experts split over (the "experts" rule),
  # e.g. "fsdp"; each device then holds E / n whole experts and tokens travel to them (`models.moe`). null: the
  # rules table's entry (by default every device holds a slice of every expert).
  experts: str | tuple[str, ...] | None = None
  coordinator_address: str | None = None  # host:port of process 0
  num_processes: int | None = None
  process_id: int | None = None  # this process's index (differs per process: pass it on the command line)

  def __post_init__(self):
    sizes = (self.data, self.fsdp, self.tensor)
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} must be positive, with at most one -1")
    if self.distributed not in ("auto", "on", "off"):
      raise ValueError(f"mesh.distributed={self.distributed!r} must be one of 'auto', 'on', 'off'")
    if self.num_processes is not None and self.num_processes < 1:
      raise ValueError(f"mesh.num_processes={self.num_processes} must be >= 1")
    if self.process_id is not None and not 0 <= self.process_id < (self.num_processes or self.process_id + 1):
      raise ValueError(f"mesh.process_id={self.process_id} must be in [0, mesh.num_processes)")
    if self.experts is not None:
      experts = self.experts if isinstance(self.experts, str) else tuple(self.experts)
      others = tuple((name, axes) for name, axes in self.rules if name != "experts")
      object.__setattr__(self, "rules", others + (("experts", experts),))
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


@contextlib.contextmanager
def use_rules(rules: Rules):
  """Switch the active rules table (what `constrain` reads) without entering a mesh: e.g. inside a traced
  function already under `use_mesh`, to run one part of it (generation) in another layout."""
  token = _ACTIVE_RULES.set(rules)
  try:
    yield rules
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


def shards(name: str, size: int) -> int:
  """How many pieces a dimension of logical `name` and `size` splits into under the enclosing `use_mesh`
  (1 outside one)."""
  rules = _ACTIVE_RULES.get()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh.empty:
    return 1
  return math.prod(mesh.shape[a] for a in _as_tuple(logical_to_spec((name,), (size,), mesh, rules)[0]))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, rules: Rules = DEFAULT_RULES,
                   batch_size: int | None = None) -> NamedSharding:
  """Sharding for a batch array [B, ...]: batch over its rule's mesh axes, the rest replicated."""
  shape = (batch_size if batch_size is not None else int(np.prod(mesh.devices.shape)),) + (1,) * (ndim - 1)
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), shape, mesh, rules))


def _multiprocess_env() -> bool:
  """True when the environment describes a job of more than one process."""
  return bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or _launcher_env()


def _launcher_env() -> bool:
  """True under a cluster launcher JAX reads process ids from (SLURM, Open MPI, Cloud TPU)."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def distributed_kwargs(config: MeshConfig) -> dict:
  """jax.distributed.initialize's arguments from the config keys, else JAX_COORDINATOR_ADDRESS /
  JAX_NUM_PROCESSES / JAX_PROCESS_ID (JAX itself reads only the first; without the others it needs SLURM,
  Open MPI or Cloud TPU metadata). Unset values are left to JAX's cluster detection."""
  env = {"coordinator_address": os.environ.get("JAX_COORDINATOR_ADDRESS"),
         "num_processes": os.environ.get("JAX_NUM_PROCESSES"), "process_id": os.environ.get("JAX_PROCESS_ID")}
  kwargs = {}
  for key, from_env in env.items():
    value = getattr(config, key)
    if value is None and from_env:
      value = from_env if key == "coordinator_address" else _env_int(f"JAX_{key.upper()}", from_env)
    if value is not None:
      kwargs[key] = value
  return kwargs


def _env_int(name: str, value: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def initialize_distributed(config: MeshConfig | str = "auto", **kwargs) -> bool:
  """Start jax.distributed once per process: when asked ("on"), or ("auto") when the config or the
  environment describes a multi-process job. Later calls (the next stage) are no-ops. Returns whether the
  process is part of a multi-process job.

  `config` is a MeshConfig (its coordinator / process keys and `distributed` mode) or just the mode; kwargs
  override the coordinator_address, num_processes and process_id it gives.
  """
  if isinstance(config, str):
    config = MeshConfig(distributed=config)
  if jax.distributed.is_initialized():
    return True
  kwargs = {**distributed_kwargs(config), **kwargs}
  if config.distributed == "off" or (config.distributed == "auto" and not kwargs and not _multiprocess_env()):
    return False
  if "num_processes" in kwargs and "process_id" not in kwargs and not _launcher_env():
    raise ValueError("mesh.coordinator_address and mesh.num_processes are set but not this process's index: "
                     "pass mesh.process_id=N (or JAX_PROCESS_ID)")
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as error:  # e.g. "Number of processes must be defined." without a cluster launcher
    raise ValueError(f"jax.distributed: {error} Set mesh.num_processes and mesh.process_id (or JAX_NUM_PROCESSES "
                     "and JAX_PROCESS_ID) beside the coordinator address") from None
  log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def process_rows(mesh: jax.sharding.Mesh, rules: Rules, batch_size: int) -> list[int] | None:
  """Rows of a [batch_size, ...] batch that this process's devices hold (None in a single-process job):
  the only rows it needs to build."""
  if jax.process_count() == 1:
    return None
  spans = batch_sharding(mesh, 1, rules, batch_size).addressable_devices_indices_map((batch_size,)).values()
  return sorted({row for (span,) in spans for row in range(*span.indices(batch_size))})


def local_batch_shards(mesh: jax.sharding.Mesh, rules: Rules, batch_size: int) -> int:
  """How many distinct slices of a [batch_size, ...] batch this process's devices hold (packed rows are made a
  multiple of it, so they split evenly over the batch axes)."""
  spans = batch_sharding(mesh, 1, rules, batch_size).addressable_devices_indices_map((batch_size,)).values()
  return len({span.indices(batch_size) for (span,) in spans})


def global_array(local: np.ndarray, sharding: NamedSharding, global_shape: tuple[int, ...]) -> jax.Array:
  """One array of `global_shape` from each process's rows of it (see `process_rows`); a plain device_put
  in a single-process job."""
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  return jax.make_array_from_process_local_data(sharding, local, global_shape)


def barrier(name: str) -> None:
  """Wait until every process of a multi-process job gets here (a no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def processes_where(flag: bool) -> list[int]:
  """Indices of the processes whose `flag` is true (every process must call this; [0] or [] for one process)."""
  if jax.process_count() == 1:
    return [0] if flag else []
  from jax.experimental import multihost_utils
  return [int(i) for i in np.flatnonzero(multihost_utils.process_allgather(np.asarray(flag)))]


def raise_together(error: BaseException | None, what: str) -> None:
  """Raise on every process when `what` failed on any (`error`: this process's failure, or None). A process
  that went on alone would wait forever in the next collective for the one that stopped."""
  failed = processes_where(error is not None)
  if error is not None:
    raise error
  if failed:
    raise RuntimeError(f"{what} failed on process {failed[0]} (its output says why)")


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-host) array as one numpy array on every process; every process must call it."""
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
