"""Starting `python -m capjax.serve` in a subprocess, for tests, load tests."""

from collections.abc import Mapping, Sequence
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

_READY_PATTERN = re.compile(r'serving on (http://\S+)')


def compilation_cache_env(directory: pathlib.Path) -> dict[str, str]:
  """Environment variables that make servers share JAX's compilation cache.

  The first server started with them compiles its decoder; later ones (with
  the same shapes) load it: seconds instead of half a minute in tests.
  """
  return {
    'JAX_COMPILATION_CACHE_DIR': str(directory),
    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
    'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
  }


def start_subprocess(
  args: Sequence[str],
  log_path: str,
  timeout_s: float = 300.0,
  *,
  env: Mapping[str, str] | None = None,
  ignore_sigint: bool = False,
) -> tuple[subprocess.Popen, str]:
  """Runs `python -m capjax.serve ARGS --port 0` until it is ready.

  For tests and benchmarks: output goes to log_path. Ready means warmed up:
  the server logs "serving on URL" once its decoder is compiled.

  Args:
    args: the server's flags.
    log_path: where its output goes.
    timeout_s: how long it may take to be ready.
    env: variables added to this process's environment.
    ignore_sigint: start the server with SIGINT ignored, as a shell starts
      a command with `&` (call from the main thread).

  Returns:
    The process and the server's URL.

  Raises:
    RuntimeError: the server exited or was not ready within timeout_s.
  """
  # An ignored signal stays ignored in the child (not so a handled one).
  previous = (
    signal.signal(signal.SIGINT, signal.SIG_IGN) if (ignore_sigint) else None
  )
  try:
    with open(log_path, 'wb') as log:
      process = subprocess.Popen(
        [sys.executable, '-m', 'capjax.serve', *args, '--port', '0'],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
      )
  finally:
    if ignore_sigint:
      signal.signal(signal.SIGINT, previous)
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline and process.poll() is None:
    with open(log_path, encoding='utf-8', errors='replace') as log:
      if match := _READY_PATTERN.search(log.read()):
        return process, match.group(1)
    time.sleep(0.2)
  process.kill()
  process.wait()
  with open(log_path, encoding='utf-8', errors='replace') as log:
    raise RuntimeError(f'capjax.serve did not start:\n{log.read()[-3000:]}')
