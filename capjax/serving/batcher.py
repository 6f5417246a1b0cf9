"""The batch worker: one thread that decodes what the requests hand it.

A request hands over its prepared image and gets a future:

  future = batcher.submit(kind, image)   # from any thread; never blocks
  result = await asyncio.wrap_future(future)

Requests of a `continuous` kind (greedy decoding) join a decoder that
advances all of its rows one token per step and lets rows join and leave
between steps (capjax.serving.continuous): a request waits at most one step
to start, and leaves as soon as its caption ends. Other kinds (beam search)
are decoded in whole batches of their kind, up to `max_batch_size`, after
waiting up to `max_wait_s` for others to join.

All the decoder's work, its warm-up included, runs in the worker thread, so
the event loop is never blocked by it.
"""

import collections
from collections.abc import Callable, Hashable, Sequence
import concurrent.futures
import dataclasses
import threading
import time
from typing import Any, Protocol

from absl import logging

from capjax.serving import metrics as metrics_lib
from capjax.serving import requests

# (kind, items) -> one result per item, in order.
BatchFn = Callable[[Hashable, list[Any]], list[Any]]


class Continuous(Protocol):
  """A decoder whose rows join and leave between steps."""

  @property
  def room(self) -> int:
    """How many rows may join now."""

  @property
  def active(self) -> int:
    """How many rows are being decoded."""

  def admit(
    self, keys: Sequence[Any], kinds: Sequence[Hashable], items: Sequence[Any]
  ) -> None:
    """Starts decoding items; `step` returns each with its key."""

  def step(self) -> list[tuple[Any, Any]]:
    """One step of every row: (key, result) of the rows that ended."""

  def abandon(self) -> list[Any]:
    """Drops every row; their keys."""

  def warm_up(self, stop: Callable[[], bool]) -> None:
    """Compiles what decoding will need; stops early once stop() is True."""


@dataclasses.dataclass(eq=False)
class _Waiting:
  kind: Hashable
  item: Any
  future: concurrent.futures.Future
  arrival: float
  started: float = 0.0  # when decoding began


class Batcher:
  """One worker thread running a continuous decoder and whole batches."""

  def __init__(
    self,
    continuous: Continuous,
    batch_fn: BatchFn,
    *,
    is_continuous: Callable[[Hashable], bool],
    max_batch_size: int,
    max_wait_s: float,
    max_queue: int,
    warm_up: Callable[[], None] | None = None,
    metrics: metrics_lib.Metrics | None = None,
  ):
    """Makes the batcher; `start` it.

    Args:
      continuous: the decoder of continuous kinds.
      batch_fn: decodes a whole batch of another kind.
      is_continuous: whether a kind goes to `continuous`.
      max_batch_size: the most items of a whole batch.
      max_wait_s: how long the oldest item of a whole-batch kind may wait
        for others.
      max_queue: the most items waiting; more are refused (503).
      warm_up: run by the worker before it takes any item.
      metrics: where batch sizes, calls and times are counted.
    """
    self._continuous = continuous
    self._batch_fn = batch_fn
    self._is_continuous = is_continuous
    self._max_batch_size = max_batch_size
    self._max_wait_s = max_wait_s
    self._max_queue = max_queue
    self._warm_up = warm_up
    self._metrics = metrics
    self._cond = threading.Condition()
    self._joining: collections.deque[_Waiting] = collections.deque()
    self._batches: dict[Hashable, collections.deque[_Waiting]] = {}
    self._size = 0
    self._stopped = False
    self._drain_at: float | None = None
    self.ready = False
    self._on_ready: Callable[[], None] | None = None
    # Written by the worker only.
    self.num_batches = 0  # admissions to the continuous decoder included
    self.num_decoded = 0
    self.num_calls = 0  # of the continuous decoder
    self._thread = threading.Thread(
      target=self._run, name='batcher', daemon=True
    )

  def start(self, on_ready: Callable[[], None] | None = None) -> None:
    """Starts the worker: warm-up, then on_ready(), then the requests."""
    self._on_ready = on_ready
    self._thread.start()

  @property
  def alive(self) -> bool:
    return self._thread.is_alive()

  @property
  def queue_size(self) -> int:
    return self._size

  def submit(self, kind: Hashable, item: Any) -> concurrent.futures.Future:
    """Queues an item; its future gets its result.

    Raises:
      RequestError: 503, not warmed up yet, shutting down, or the queue is
        full.
    """
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    with self._cond:
      if (
        self._stopped
        or self._drain_at is not None
        and (time.monotonic() >= self._drain_at)
      ):
        raise requests.busy('the server is shutting down')
      if not self.ready:
        raise requests.busy('the server is warming up; retry later')
      if self._size >= self._max_queue:
        raise requests.busy(
          f'the server is busy ({self._size} requests waiting); retry later'
        )
      waiting = _Waiting(kind, item, future, time.monotonic())
      if self._is_continuous(kind):
        self._joining.append(waiting)
      else:
        self._batches.setdefault(kind, collections.deque()).append(waiting)
      self._size += 1
      self._cond.notify()
    return future

  def drain(self, seconds: float) -> None:
    """Requests still waiting in `seconds` are refused then; later ones now.

    Rows being decoded then are finished.
    """
    with self._cond:
      self._drain_at = time.monotonic() + seconds
      self._cond.notify()

  def stop(self) -> None:
    """Stops the worker after its current step; the rest is refused."""
    with self._cond:
      self._stopped = True
      self._cond.notify()
    if self._thread.is_alive():
      self._thread.join()
    with self._cond:
      self._refuse(self._take_all(), 'the server is shutting down')
    self._refuse(self._continuous.abandon(), 'the server is shutting down')

  # --- The worker ------------------------------------------------------------

  def _take_all(self) -> list[_Waiting]:
    taken = list(self._joining) + [w for q in self._batches.values() for w in q]
    self._joining.clear()
    self._batches.clear()
    self._size = 0
    return taken

  @staticmethod
  def _refuse(taken: Sequence[_Waiting], message: str) -> None:
    for waiting in taken:
      if waiting.future.set_running_or_notify_cancel():
        waiting.future.set_exception(requests.busy(message))

  def _due_batch(self, now: float) -> tuple[Hashable, list[_Waiting]] | None:
    """The whole batch to decode now, taken from its queue, if one is due."""
    if not self._batches:
      return None
    kind = min(self._batches, key=lambda k: self._batches[k][0].arrival)
    queue = self._batches[kind]
    if (
      len(queue) < self._max_batch_size
      and now < queue[0].arrival + self._max_wait_s
    ):
      return None
    batch = [
      queue.popleft() for _ in range(min(len(queue), self._max_batch_size))
    ]
    if not queue:
      del self._batches[kind]
    self._size -= len(batch)
    return kind, batch

  def _next_wake(self, now: float) -> float | None:
    """Seconds until a whole batch or the drain deadline is due."""
    times = [q[0].arrival + self._max_wait_s for q in self._batches.values()]
    if self._drain_at is not None and self._size:
      times.append(self._drain_at)
    return max(min(times) - now, 0.0) if times else None

  def _take(
    self,
  ) -> tuple[tuple[Hashable, list[_Waiting]] | None, list[_Waiting]] | None:
    """Blocks for work: (a due whole batch, rows to admit); None: stop."""
    with self._cond:
      while True:
        if self._stopped:
          return None
        now = time.monotonic()
        if self._drain_at is not None and now >= self._drain_at:
          self._refuse(self._take_all(), 'the server is shutting down')
        batch = self._due_batch(now)
        room = self._continuous.room
        joining = [
          self._joining.popleft() for _ in range(min(room, len(self._joining)))
        ]
        self._size -= len(joining)
        if batch or joining or self._continuous.active:
          return batch, joining
        self._cond.wait(self._next_wake(now))

  @property
  def stopping(self) -> bool:
    """Whether `stop` was called (a long warm-up may end early)."""
    return self._stopped

  def _run(self) -> None:
    if self._warm_up:
      try:
        self._warm_up()
      # The worker ends, and GET /healthz says the decoder is not running.
      except Exception:  # noqa: BLE001
        logging.exception('warm-up failed')
        return
    with self._cond:
      self.ready = not self._stopped
    if self.ready and self._on_ready:
      self._on_ready()
    while (work := self._take()) is not None:
      batch, joining = work
      if batch:
        self._run_batch(*batch)
      joining = [w for w in joining if w.future.set_running_or_notify_cancel()]
      self._started(joining)
      try:
        if joining:
          self._continuous.admit(
            joining, [w.kind for w in joining], [w.item for w in joining]
          )
          self._count_batch(len(joining))
        if self._continuous.active:
          rows = self._continuous.active
          finished = self._continuous.step()
          self.num_calls += 1
          if self._metrics:
            self._metrics.steps.inc()
            self._metrics.rows_per_step.observe(rows)
          self._finish(finished)
      # A failing decoder fails its requests, never the worker.
      except Exception as e:  # noqa: BLE001
        logging.exception('the continuous decoder failed')
        for waiting in set(joining) | set(self._continuous.abandon()):
          if not waiting.future.done():
            waiting.future.set_exception(e)

  def _run_batch(self, kind: Hashable, batch: list[_Waiting]) -> None:
    # Requests that gave up waiting are cancelled; skip them.
    batch = [w for w in batch if w.future.set_running_or_notify_cancel()]
    if not batch:
      return
    self._started(batch)
    try:
      results = self._batch_fn(kind, [w.item for w in batch])
    # A failing batch fails its requests, never the worker.
    except Exception as e:  # noqa: BLE001
      logging.exception('a batch of %d failed', len(batch))
      for w in batch:
        w.future.set_exception(e)
      return
    self._count_batch(len(batch))
    self._finish(list(zip(batch, results)))

  def _started(self, started: list[_Waiting]) -> None:
    now = time.monotonic()
    for waiting in started:
      waiting.started = now
      if self._metrics:
        self._metrics.phase['queue'].observe(now - waiting.arrival)

  def _finish(self, finished: list[tuple[_Waiting, Any]]) -> None:
    now = time.monotonic()
    for waiting, result in finished:
      if self._metrics:
        self._metrics.phase['decode'].observe(now - waiting.started)
      waiting.future.set_result(result)
    self._count_decoded(len(finished))

  def _count_batch(self, size: int) -> None:
    self.num_batches += 1
    if self._metrics:
      self._metrics.batch_size.observe(size)

  def _count_decoded(self, count: int) -> None:
    self.num_decoded += count
    if self._metrics and count:
      self._metrics.decoded.inc(count)
