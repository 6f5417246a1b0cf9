"""Stopping cleanly on SIGTERM or SIGINT, on every process at the same step."""

import signal
import threading

import jax
import numpy as np


class StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def agreed_stop(stop: StopRequest, step: int, interval: int) -> bool:
  """Whether to save and stop after this step, the same on every process.

  Processes get a preemption signal at slightly different steps; one that
  stopped alone would leave the others waiting in a collective. With several
  processes they agree at each logging interval (one small all-gather);
  a lone process stops at once.
  """
  if jax.process_count() == 1:
    return stop.signal_name is not None
  if step % interval:
    return False
  from jax.experimental import multihost_utils  # noqa: PLC0415

  flags = multihost_utils.process_allgather(
    np.array(stop.signal_name is not None)
  )
  return bool(np.any(flags))
