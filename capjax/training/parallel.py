"""Data parallelism over every device of every process.

One 1-D mesh axis, 'data': parameters and optimizer state are replicated,
batches are split along their first axis. The train step is a single `jax.jit`
with these shardings (what `pmap` used to do), and the same code runs on one
CPU, a GPU host or a multi-host cluster, where each process feeds only its own
slice of the global batch.
"""

from collections.abc import Callable
import importlib.util
import os
import pathlib
from typing import cast, TypeVar

from absl import logging
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from capjax import errors
from capjax.data import schedule

DATA_AXIS = 'data'
T = TypeVar('T')


def _cluster_detected() -> bool:
  """Whether this is an srun job step of several tasks or a Cloud TPU VM.

  SLURM_STEP_NUM_TASKS counts the tasks of the job step `srun` started;
  SLURM_NTASKS counts the allocation's, which a batch script running a single
  process sees too.
  TPU chips show up as /dev/accel* (/dev/vfio/* on newer generations, which
  other VFIO hosts have too, hence the libtpu check).
  """
  tpu_vfio = (
    pathlib.Path('/dev/vfio/0').exists()
    and importlib.util.find_spec('libtpu') is not None
  )
  return (
    int(os.environ.get('SLURM_STEP_NUM_TASKS', '1')) > 1
    or pathlib.Path('/dev/accel0').exists()
    or tpu_vfio
  )


def maybe_initialize_distributed(
  coordinator_address: str = '', num_processes: int = 0, process_id: int = -1
) -> None:
  """Joins a multi-process job when one is asked for or detected.

  Explicit arguments win; otherwise SLURM and Cloud TPU are detected and
  `jax.distributed.initialize()` finds the coordinator, the process count and
  this process's id on its own. A lone process needs nothing.
  """
  if coordinator_address or num_processes > 1:
    if not (coordinator_address and num_processes > 0 and process_id >= 0):
      raise errors.UserError(
        'a multi-process job needs all of --coordinator_address, '
        '--num_processes and --process_id'
      )
    jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
    )
  elif _cluster_detected():
    jax.distributed.initialize()
  else:
    return
  logging.info(
    'process %d of %d, %d local of %d devices',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def make_mesh() -> Mesh:
  """A 1-D 'data' mesh over all devices.

  The axis is 'auto': the compiler propagates the batch sharding through the
  model, so the model code needs no sharding annotations.
  """
  return jax.make_mesh(
    (jax.device_count(),),
    (DATA_AXIS,),
    axis_types=(jax.sharding.AxisType.Auto,),
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def per_process_batch_size(global_batch_size: int) -> int:
  """This process's share of the global batch, checking that it divides."""
  devices = jax.device_count()
  if global_batch_size % devices:
    raise errors.UserError(
      f'batch size {global_batch_size} does not divide over {devices} '
      f'devices; use a multiple of {devices}'
    )
  return schedule.local_batch_size(global_batch_size, jax.process_count())


def global_batch(
  local_batch: dict[str, np.ndarray], mesh: Mesh
) -> dict[str, jax.Array]:
  """Assembles each process's slice into one batch-sharded global array."""
  sharding = batch_sharded(mesh)
  return {
    name: jax.make_array_from_process_local_data(sharding, value)
    for name, value in local_batch.items()
  }


class ProcessFailedError(errors.UserError):
  """Another process of the job failed; this one stops with it."""


def agreed(activity: str, fn: Callable[[], T]) -> T:
  """fn() on this process; if it raises on any process, every process stops.

  Without it, a process that fails alone (process 0 preparing the data, or
  computing the metrics only it computes) leaves the others waiting in the
  next collective until the distributed runtime gives up. Every process
  must call `agreed` at the same point: one small all-gather tells each
  whether any failed. The failing process raises its own error, the others
  a ProcessFailedError naming it.
  """
  error = None
  result: T | None
  try:
    result = fn()
  except Exception as e:  # noqa: BLE001
    error, result = e, None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    failed = np.asarray(
      multihost_utils.process_allgather(np.array(error is not None))
    )
    if error is None and failed.any():
      raise ProcessFailedError(
        f'process {int(np.argmax(failed))} failed while {activity}; '
        'stopping with it'
      )
  if error is not None:
    raise error
  # fn returned: result is its value, whatever T is (None included).
  return cast(T, result)


def from_process_0(value: float) -> float:
  """Process 0's `value` on every process, exactly; the others' are ignored.

  For what only process 0 computes (the caption metrics). Sent as its 8
  bytes: JAX without x64 would round a float64 to float32.
  """
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # noqa: PLC0415

  sent = np.frombuffer(np.float64(value).tobytes(), np.uint8)
  got = np.asarray(multihost_utils.broadcast_one_to_all(sent), np.uint8)
  return float(np.frombuffer(got.tobytes(), np.float64)[0])


def sync_processes(name: str) -> None:
  """Waits until every process gets here (a no-op for a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices(name)
