"""Timing that is fair on a noisy machine (interleaved medians, the peak),
and the report files a benchmark leaves."""

from collections.abc import Callable, Hashable, Mapping
import json
import pathlib
import platform
import statistics
import time
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

_PEAK_MATMUL_SIZE = 2048

K = TypeVar('K', bound=Hashable)


def interleaved_medians(
  fns: Mapping[K, Callable[[], Any]], repeats: int
) -> dict[K, float]:
  """Median wall seconds of each fn(), the fns taking turns.

  Each fn is called once untimed first (compilation, tracing, caches); its
  result is waited for, so fns must return device arrays or host values.
  Taking turns exposes every fn to the same changes in machine load.
  """
  for fn in fns.values():
    jax.block_until_ready(fn())
  seconds: dict[K, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      seconds[name].append(time.perf_counter() - start)
  return {name: statistics.median(s) for name, s in seconds.items()}


def matmul_peak_flops(repeats: int) -> float:
  """Median float32 FLOP/s of a large `jnp.dot` on JAX's default device."""
  n = _PEAK_MATMUL_SIZE
  a = jnp.asarray(np.random.default_rng(0).random((n, n), np.float32))
  dot = jax.jit(jnp.dot)
  # Several products per timing, so that dispatch is negligible on a GPU too.
  seconds = interleaved_medians(
    {'dot': lambda: [dot(a, a) for _ in range(4)]}, max(repeats, 5)
  )['dot']
  return 4 * 2 * n**3 / seconds


def processor_name() -> str:
  """The CPU's model name where Linux tells it, else the architecture."""
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        return line.partition(':')[2].strip()
  except OSError:
    pass
  return platform.machine()


def write_report(
  out_dir: pathlib.Path,
  name: str,
  report: dict[str, Any],
  make_table: Callable[[dict[str, Any]], str],
) -> None:
  """Writes {name}.json, then the table as {name}.md, and prints the table.

  The measurements first: a table that fails to build loses none.
  """
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / f'{name}.json').write_text(json.dumps(report, indent=2) + '\n')
  table = make_table(report)
  (out_dir / f'{name}.md').write_text(table)
  print(table)
