"""What every capjax program does the same way around its `main`.

  if __name__ == '__main__':
    programs.run(main)

`run` parses the flags (absl), keeps the console to capjax's own lines,
keeps TensorFlow off the accelerators (JAX owns them), and turns a
`UserError` into one line, `error: MESSAGE`, on stderr and exit status 1. Any other exception
is a bug and keeps its traceback.
"""

from collections.abc import Callable, Sequence
import functools
import logging as py_logging
import pathlib
import sys

from absl import app
from absl import logging

from capjax import errors

Main = Callable[[Sequence[str]], None]

_PACKAGE_DIR = str(pathlib.Path(__file__).resolve().parent)


class _OwnInfoOnly(py_logging.Filter):
  """Passes capjax's own messages, and only warnings and errors of libraries."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return (record.levelno >= py_logging.WARNING
            or record.pathname.startswith(_PACKAGE_DIR))


def concise_console_logging() -> None:
  """Keeps the console to capjax's progress lines.

  Orbax, JAX and TensorFlow log many INFO lines of their own through absl.
  """
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_OwnInfoOnly())


def hide_gpus_from_tensorflow() -> None:
  """Keeps TensorFlow (tf.data, image resizing) off the GPUs JAX uses."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')


def refuse_arguments(argv: Sequence[str]) -> None:
  """Refuses positional arguments, for programs that take flags only.

  A boolean flag given its value after a space (`--config.flag false`)
  leaves the value behind as a positional argument; absl would read the
  flag alone as True.
  """
  if len(argv) > 1:
    raise app.UsageError(
        f'unexpected arguments: {" ".join(argv[1:])} (boolean flags take '
        'their value after "=", e.g. --config.group_by_length=false)')


def _run_main(main: Main, tensorflow_gpus: bool, argv: list[str]) -> None:
  concise_console_logging()
  if not tensorflow_gpus:
    hide_gpus_from_tensorflow()
  try:
    main(argv)
  except errors.UserError as e:
    sys.exit(f'error: {e}')


def run(main: Main, *, tensorflow_gpus: bool = False) -> None:
  """Runs a program's `main(argv)` (see the module docstring).

  Args:
    main: the program; raises UserError for the user's mistakes.
    tensorflow_gpus: let TensorFlow use the GPUs (feature extraction only).
  """
  app.run(functools.partial(_run_main, main, tensorflow_gpus))
