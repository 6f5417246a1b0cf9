"""Keeping what native code and child processes print off the console.

Some libraries write to file descriptor 2 themselves (C++ logging, a Java
child process), past Python's `sys.stderr` and logging, so only the
descriptor can be filtered.
"""

from collections.abc import Iterator
import contextlib
import os
import re
import sys
import tempfile


@contextlib.contextmanager
def stderr_without(noise: re.Pattern) -> Iterator[None]:
  """Runs the block with file descriptor 2 into a file, then writes the
  lines that do not start with `noise` to stderr.

  Everything else the block prints, Python's own lines included, is kept,
  in order, once the block ends.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors='replace').splitlines(True):
        if not noise.match(line):
          sys.stderr.write(line)
      sys.stderr.flush()
