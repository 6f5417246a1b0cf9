"""Starting `python -m capjax.serve` in a subprocess, for tests and load tests."""

from collections.abc import Sequence
import re
import subprocess
import sys
import time

_READY_PATTERN = re.compile(r'serving on (http://\S+)')


def start_subprocess(args: Sequence[str], log_path: str,
                     timeout_s: float = 300.0
                     ) -> tuple[subprocess.Popen, str]:
  """Runs `python -m capjax.serve ARGS --port 0` until it listens.

  For tests and benchmarks: output goes to log_path.

  Returns:
    The process and the server's URL.

  Raises:
    RuntimeError: the server exited or did not listen within timeout_s.
  """
  with open(log_path, 'wb') as log:
    process = subprocess.Popen(
        [sys.executable, '-m', 'capjax.serve', *args, '--port', '0'],
        stdout=log, stderr=subprocess.STDOUT)
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
