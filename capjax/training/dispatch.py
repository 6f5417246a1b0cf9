"""Running train steps: k steps per jitted call, inputs on the device ahead.

config.steps_per_dispatch = k runs k train steps in one jitted call, a
`lax.scan` over the step, its k inputs stacked in one transfer: for small
models, where launching a step and the host's work per step take longer
than the step itself. The loop looks at metrics, checkpoints, evaluates and
stops only between dispatches, whose boundaries are the multiples of k (and
the last step), so config_checks requires k to divide the logging,
evaluation and checkpoint intervals. A scan needs its k inputs to have one
shape: k steps of different caption lengths T (buckets) run one call each,
as do the steps up to the first boundary of a run resumed elsewhere.

Whatever the path, inputs are put on the devices two units ahead of the one
that runs (`prefetch_to_device`): the transfer of the next overlaps the
current step.
"""

import collections
from collections.abc import Callable, Iterator
import dataclasses
import functools
import time
from typing import Any, TypeVar

from absl import logging
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from capjax.training import objectives
from capjax.training import parallel

# Units whose inputs are on the device before the one running ends.
PREFETCH_UNITS = 2
T = TypeVar('T')


@dataclasses.dataclass(frozen=True)
class Unit:
  """One jitted call: steps [first, stop), scanned when there are several."""

  first: int
  stop: int
  inputs: Any  # this process's inputs, then global arrays once prefetched
  key: int

  @property
  def scanned(self) -> bool:
    return self.stop - self.first > 1


def boundary(step: int, k: int, num_steps: int) -> int:
  """The dispatch boundary after `step`: the next multiple of k, or the end."""
  return min((step // k + 1) * k, num_steps)


def units(
  items: Iterator[objectives.Item], start: int, num_steps: int, k: int
) -> Iterator[Unit]:
  """The calls that run steps [start, num_steps), in order."""
  step = start
  while step < num_steps:
    stop = boundary(step, k, num_steps)
    group = [next(items) for _ in range(stop - step)]
    if len(group) == k > 1 and len({key for _, key in group}) == 1:
      stacked = jax.tree_util.tree_map(
        lambda *x: np.stack(x), *[inputs for inputs, _ in group]
      )
      yield Unit(step, stop, stacked, group[0][1])
    else:
      for i, (inputs, key) in enumerate(group):
        yield Unit(step + i, step + i + 1, inputs, key)
    step = stop


def _global(unit: Unit, mesh: Mesh) -> Unit:
  """The unit with its inputs assembled from every process's slice."""
  if not unit.scanned:
    return dataclasses.replace(
      unit, inputs=parallel.global_batch(unit.inputs, mesh)
    )
  sharding = NamedSharding(mesh, PartitionSpec(None, parallel.DATA_AXIS))
  processes = jax.process_count()
  inputs = {
    name: jax.make_array_from_process_local_data(
      sharding,
      value,
      (value.shape[0], value.shape[1] * processes, *value.shape[2:]),
    )
    for name, value in unit.inputs.items()
  }
  return dataclasses.replace(unit, inputs=inputs)


def prefetch_to_device(
  iterator: Iterator[T], put: Callable[[T], T], size: int = PREFETCH_UNITS
) -> Iterator[T]:
  """put(item) of each item, `size` items ahead of the one handed out.

  `put` starts the transfer to the devices (asynchronously where the
  backend can), so the next items' transfers overlap the step running.
  """
  queue: collections.deque[T] = collections.deque()
  for item in iterator:
    queue.append(put(item))
    if len(queue) > size:
      yield queue.popleft()
  yield from queue


class Dispatcher:
  """Runs the steps of an objective from a start step, dispatch by dispatch."""

  def __init__(
    self,
    objective: objectives.Objective,
    mesh: Mesh,
    start: int,
    num_steps: int,
    steps_per_dispatch: int,
  ):
    self._objective = objective
    self._mesh = mesh
    self._k = steps_per_dispatch
    self._num_steps = num_steps
    self._units = prefetch_to_device(
      units(objective.items(start), start, num_steps, steps_per_dispatch),
      lambda unit: _global(unit, mesh),
    )
    # Seconds spent waiting for inputs: where the step outruns the host,
    # the host path's steps wait.
    self.input_wait_s = 0.0
    self._constants_sharding = jax.tree_util.tree_map(
      lambda a: a.sharding, objective.constants
    )

  @functools.cache  # noqa: B019 (one Dispatcher per run)
  def _call(self, key: int, scanned: bool) -> Callable:
    logging.info(
      'compiling the train step%s, key %d',
      f' scanned {self._k} times' if scanned else '',
      key,
    )
    step = lambda state, inputs, constants: self._objective.step(
      state, inputs, constants, key
    )
    replicated = parallel.replicated(self._mesh)
    if scanned:
      inputs_sharding = NamedSharding(
        self._mesh, PartitionSpec(None, parallel.DATA_AXIS)
      )

      def fn(state, stacked, constants):
        return jax.lax.scan(
          lambda s, inputs: step(s, inputs, constants), state, stacked
        )

    else:
      inputs_sharding = parallel.batch_sharded(self._mesh)
      fn = step
    return jax.jit(
      fn,
      in_shardings=(replicated, inputs_sharding, self._constants_sharding),
      out_shardings=(replicated, replicated),
      donate_argnums=0,
    )

  def run(self, state, step: int) -> tuple[Any, int, list]:
    """Runs the steps from `step` to the next boundary.

    Returns:
      (the state, the step reached, the metrics of the steps run: entries for
      `per_step`, still on the device).
    """
    stop = boundary(step, self._k, self._num_steps)
    entries = []
    while step < stop:
      start = time.perf_counter()
      unit = next(self._units)
      self.input_wait_s += time.perf_counter() - start
      assert unit.first == step, (unit.first, step)
      state, metrics = self._call(unit.key, unit.scanned)(
        state, unit.inputs, self._objective.constants
      )
      entries.append((unit.first, unit.stop, metrics))
      step = unit.stop
    return state, step, entries


def per_step(entries: list) -> list[tuple[int, dict]]:
  """(step reached, its metrics) of each step of host-side `Dispatcher.run`
  entries: a scanned call's metrics have one row per step."""
  out = []
  for first, stop, metrics in entries:
    if stop - first == 1:
      out.append((stop, metrics))
    else:
      out += [
        (first + i + 1, {k: v[i] for k, v in metrics.items()})
        for i in range(stop - first)
      ]
  return out
