"""Feature grids resident on the devices, and batches gathered inside the step.

On an accelerator the train step outruns any host: a batch of 1024 grids of
64 x 2048 float16 is 268 MB, which the host would have to gather and copy at
every step of a few milliseconds. With config.device_data on, the split's
grids (float16) and token arrays are put on the devices once, and each step
gathers its batch from the schedule's example ids (`gather_rows`); the ids
are those the host pipeline uses, so the batches are the same bits.

Two layouts of a table of rows (M, L, D) over the n devices of the mesh:

- 'replicated': every device holds all M rows and gathers its own slice of
  the batch locally, with no communication;
- 'sharded': device i holds rows [i * m, (i + 1) * m), m = ceil(M / n). Each
  device's rows of the global batch are gathered where they live: every
  device takes, of all B ids (one all-gather of B int32s), the rows it holds
  (zeros for the others), and one reduce-scatter over the devices hands each
  its B / n rows, summed as integers of the same width, so that the sum of one
  row and zeros is exact to the bit (a float sum would turn -0 into +0).

`choose` decides between them and the host path: config.device_data 'on'
takes the replicated layout where a replica fits in each device's free
memory, else the sharded one, else refuses in one line with the numbers;
'auto' does the same within FREE_MEMORY_FRACTION of the free memory (the
rest is left for the step itself), and takes the host path where neither
fits, so that it never runs out of memory where 'off' would have run.
"""

from collections.abc import Callable, Sequence
import dataclasses
import math
import os

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from capjax import errors
from capjax.training import parallel

# 'auto' keeps the resident data within this share of each device's free
# memory: the other half is the step's (parameters, optimizer state,
# activations of the largest batch), which the tutorial's model at batch 1024
# keeps far below.
FREE_MEMORY_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class Tables:
  """The sizes of the data a run would keep on the devices.

  Attributes:
    grid_rows: rows of each feature table (train, and eval where evaluated
      from the devices).
    grid_row_bytes: bytes of one row (L * D * itemsize).
    small_bytes: token arrays, image indices, references: always replicated.
  """

  grid_rows: Sequence[int]
  grid_row_bytes: int
  small_bytes: int

  def per_device(self, layout: str, num_devices: int) -> int:
    """Bytes each device holds in `layout`."""
    rows = (
      sum(self.grid_rows)
      if layout == 'replicated'
      else sum(math.ceil(r / num_devices) for r in self.grid_rows)
    )
    return rows * self.grid_row_bytes + self.small_bytes


@dataclasses.dataclass(frozen=True)
class Choice:
  """The data path a run takes and why."""

  on: bool
  layout: str  # 'replicated' or 'sharded' when on, else ''
  reason: str


def _gb(num_bytes: float) -> str:
  return f'{num_bytes / 1e9:.2f} GB'


def _host_available_bytes() -> int | None:
  """MemAvailable of /proc/meminfo, else total physical memory."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError):
    return None


def free_memory() -> tuple[int | None, str]:
  """(free bytes on the fullest local device, where the figure comes from).

  Accelerators report their memory (`Device.memory_stats`: bytes_limit less
  bytes_in_use). CPU devices report none: they share the host's memory, so
  each gets an equal part of what the host has available. With several
  processes, the least any process has, so that all choose alike.
  """
  devices = jax.local_devices()
  stats = [d.memory_stats() or {} for d in devices]
  if all('bytes_limit' in s for s in stats):
    free = min(s['bytes_limit'] - s.get('bytes_in_use', 0) for s in stats)
    source = f'{devices[0].device_kind} memory_stats'
  else:
    host = _host_available_bytes()
    free = None if host is None else host // len(devices)
    source = (
      f'the host memory available, shared by {len(devices)} '
      f'{devices[0].platform} device(s)'
    )
  if free is not None and jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    free = int(
      np.min(multihost_utils.process_allgather(np.array(free, np.int64)))
    )
  return free, source


def choose(
  mode: str,
  layout: str,
  tables: Tables,
  num_devices: int,
  free_bytes: int | None,
  source: str,
) -> Choice:
  """The data path of config.device_data `mode` (module docstring).

  Args:
    mode: 'auto', 'on' or 'off'.
    layout: 'auto', or the layout 'on' must take.
    tables: what would be resident.
    num_devices: devices of the mesh.
    free_bytes: free memory per device (None: unknown).
    source: where free_bytes comes from, for the reason.

  Raises:
    UserError: 'on' and the data fits no device in any allowed layout.
  """
  if mode == 'off':
    return Choice(False, '', 'config.device_data is off')
  layouts = ['replicated'] if num_devices == 1 else ['replicated', 'sharded']
  if layout != 'auto':
    layouts = [layout]
  if free_bytes is None:
    if mode == 'auto':
      return Choice(False, '', f'the free memory is unknown ({source})')
    return Choice(True, layouts[0], f'config.device_data is on ({source})')
  budget = free_bytes * (FREE_MEMORY_FRACTION if mode == 'auto' else 1.0)
  sizes = {name: tables.per_device(name, num_devices) for name in layouts}
  where = (
    f'{_gb(free_bytes)} free per device ({source})'
    if mode == 'on'
    else f'{FREE_MEMORY_FRACTION:.0%} of the {_gb(free_bytes)} free per '
    f'device ({source})'
  )
  for name, size in sizes.items():
    if size <= budget:
      return Choice(
        True,
        name,
        f'the {name} data takes {_gb(size)} per device, within {where}',
      )
  needs = ', '.join(f'{_gb(s)} {n}' for n, s in sizes.items())
  if mode == 'on':
    raise errors.UserError(
      f'config.device_data is on but the resident data does not fit: it '
      f'needs {needs} per device, and there are {_gb(free_bytes)} free per '
      f'device ({source}); set --config.device_data=auto or off'
    )
  return Choice(
    False, '', f'the resident data needs {needs} per device, over {where}'
  )


def decide(config, tables: Tables, mesh: Mesh) -> Choice:
  """`choose` for this job's devices, logged with the numbers."""
  free, source = (None, 'off') if config.device_data == 'off' else free_memory()
  choice = choose(
    config.device_data,
    config.device_data_layout,
    tables,
    mesh.size,
    free,
    source,
  )
  logging.info(
    'device_data=%s: %s, because %s (grids %s, tokens %s; %s replicated, '
    '%s sharded per device)',
    config.device_data,
    f'batches gathered on the devices, {choice.layout}'
    if choice.on
    else 'batches read on the host',
    choice.reason,
    _gb(sum(tables.grid_rows) * tables.grid_row_bytes),
    _gb(tables.small_bytes),
    _gb(tables.per_device('replicated', mesh.size)),
    _gb(tables.per_device('sharded', mesh.size)),
  )
  return choice


def put_table(
  read: Callable[[np.ndarray], np.ndarray],
  num_rows: int,
  row_shape: tuple[int, ...],
  dtype: np.dtype,
  layout: str,
  mesh: Mesh,
) -> jax.Array:
  """A table of rows on the devices of this process, in `layout`.

  Each process reads (`read(rows)`) only what its own devices hold: the
  whole table once for a replica, its devices' rows for a shard. The sharded
  table has ceil(M / n) * n rows, the last ones zeros.
  """
  if layout == 'replicated':
    sharding = NamedSharding(mesh, PartitionSpec())
    shape = (num_rows, *row_shape)
    whole: list[np.ndarray] = []

    def callback(index):
      del index
      if not whole:
        whole.append(read(np.arange(num_rows)))
      return whole[0]

  else:
    sharding = NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))
    shape = (math.ceil(num_rows / mesh.size) * mesh.size, *row_shape)

    def callback(index):
      start, stop, _ = index[0].indices(shape[0])
      out = np.zeros((stop - start, *row_shape), dtype)
      real = np.arange(start, min(stop, num_rows))
      out[: len(real)] = read(real)
      return out

  return jax.make_array_from_callback(shape, sharding, callback)


def put_replicated(value: np.ndarray, mesh: Mesh) -> jax.Array:
  """A small array (tokens, indices) whole on every device."""
  return jax.make_array_from_callback(
    value.shape, NamedSharding(mesh, PartitionSpec()), lambda _: value
  )


def _unsigned(dtype) -> jnp.dtype:
  return jnp.dtype(f'uint{jnp.dtype(dtype).itemsize * 8}')


def gather_rows(
  table: jax.Array, rows_B: jax.Array, layout: str, mesh: Mesh
) -> jax.Array:
  """table[rows_B], batch-sharded, inside a jitted step (module docstring)."""
  batch_sharded = NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))
  if layout == 'replicated':
    return jax.lax.with_sharding_constraint(table[rows_B], batch_sharded)
  axis = parallel.DATA_AXIS

  def local(table_mLD, rows_b):
    rows_all = jax.lax.all_gather(rows_b, axis, tiled=True)
    held = table_mLD.shape[0]
    offset_B = rows_all - jax.lax.axis_index(axis) * held
    mine_B = (offset_B >= 0) & (offset_B < held)
    got = jax.lax.bitcast_convert_type(
      table_mLD[jnp.clip(offset_B, 0, held - 1)], _unsigned(table_mLD.dtype)
    )
    got = jnp.where(mine_B.reshape((-1,) + (1,) * (got.ndim - 1)), got, 0)
    mine = jax.lax.psum_scatter(got, axis, scatter_dimension=0, tiled=True)
    return jax.lax.bitcast_convert_type(mine, table_mLD.dtype)

  spec = PartitionSpec(axis)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=spec)(
    table, rows_B
  )
