"""Micro-batching: requests of one kind decoded together by one worker thread."""

from collections.abc import Callable, Hashable, Iterator
import collections
import concurrent.futures
import contextlib
import dataclasses
import threading
import time
from typing import Any

from absl import logging

from capjax.serving import requests


# (kind, items) -> one result per item, in order.
BatchFn = Callable[[Hashable, list[Any]], list[Any]]


@dataclasses.dataclass(frozen=True)
class _Waiting:
  item: Any
  future: concurrent.futures.Future
  arrival: float


class Batcher:
  """Runs `batch_fn` in one worker thread on batches of same-kind requests.

  The worker takes the kind of the oldest waiting request and waits for more
  of it until max_batch_size wait, max_wait_s has passed since the oldest
  arrived, or no other request is on its way (see `expecting`), whichever
  comes first. A lone request thus goes at once, and requests that arrived
  while the worker was busy go together.
  """

  def __init__(self, batch_fn: BatchFn, *, max_batch_size: int,
               max_wait_s: float, max_queue: int):
    self._batch_fn = batch_fn
    self._max_batch_size = max_batch_size
    self._max_wait_s = max_wait_s
    self._max_queue = max_queue
    self._cond = threading.Condition()
    self._waiting: dict[Hashable, collections.deque[_Waiting]] = {}
    self._size = 0
    self._expected = 0
    self._stopped = False
    # Written by the worker only.
    self.num_batches = 0
    self.num_decoded = 0
    self._thread = threading.Thread(target=self._run, name='batcher',
                                    daemon=True)

  def start(self) -> None:
    self._thread.start()

  def stop(self) -> None:
    """Stops the worker after its current batch; waiting requests fail."""
    with self._cond:
      self._stopped = True
      self._cond.notify_all()
    if self._thread.is_alive():
      self._thread.join()
    with self._cond:
      for queue in self._waiting.values():
        for waiting in queue:
          if waiting.future.set_running_or_notify_cancel():
            waiting.future.set_exception(
                requests.busy('the server is shutting down'))
      self._waiting.clear()
      self._size = 0

  @property
  def alive(self) -> bool:
    return self._thread.is_alive()

  @property
  def queue_size(self) -> int:
    return self._size

  @contextlib.contextmanager
  def expecting(self) -> Iterator[None]:
    """Announces a request that will be submitted within the block.

    While it is being prepared (its image decoded), the worker waits for it
    (within max_wait_s) rather than start a batch without it.
    """
    with self._cond:
      self._expected += 1
    try:
      yield
    finally:
      with self._cond:
        self._expected -= 1
        self._cond.notify()

  def submit(self, kind: Hashable, item: Any) -> concurrent.futures.Future:
    """Queues an item; its future gets its result.

    Raises:
      RequestError: 503, the queue is full.
    """
    future = concurrent.futures.Future()
    with self._cond:
      if self._stopped:
        raise requests.busy('the server is shutting down')
      if self._size >= self._max_queue:
        raise requests.busy(f'the server is busy ({self._size} requests waiting); '
                    'retry later')
      self._waiting.setdefault(kind, collections.deque()).append(
          _Waiting(item, future, time.monotonic()))
      self._size += 1
      self._cond.notify()
    return future

  def _next_batch(self) -> tuple[Hashable, list[_Waiting]] | None:
    """Blocks for the next batch; None once stopped."""
    with self._cond:
      while not self._size and not self._stopped:
        self._cond.wait()
      if self._stopped:
        return None
      kind = min(self._waiting, key=lambda k: self._waiting[k][0].arrival)
      queue = self._waiting[kind]
      deadline = queue[0].arrival + self._max_wait_s
      while (len(queue) < self._max_batch_size and self._expected
             and not self._stopped
             and (left := deadline - time.monotonic()) > 0):
        self._cond.wait(left)
      batch = [queue.popleft()
               for _ in range(min(len(queue), self._max_batch_size))]
      if not queue:
        del self._waiting[kind]
      self._size -= len(batch)
      return kind, batch

  def _run(self) -> None:
    while (next_batch := self._next_batch()) is not None:
      kind, batch = next_batch
      # Requests that gave up waiting are cancelled; skip them.
      batch = [w for w in batch if w.future.set_running_or_notify_cancel()]
      if not batch:
        continue
      try:
        results = self._batch_fn(kind, [w.item for w in batch])
      # A failing batch fails its requests, never the worker.
      except Exception as e:  # pylint: disable=broad-except
        logging.exception('a batch of %d failed', len(batch))
        for w in batch:
          w.future.set_exception(e)
        continue
      self.num_batches += 1
      self.num_decoded += len(batch)
      for w, result in zip(batch, results):
        w.future.set_result(result)


def batch_sizes(max_batch_size: int) -> tuple[int, ...]:
  """The sizes batches are padded to: powers of two, and max_batch_size."""
  sizes = [1]
  while sizes[-1] * 2 < max_batch_size:
    sizes.append(sizes[-1] * 2)
  return tuple(sizes + [max_batch_size] if max_batch_size > 1 else sizes)
