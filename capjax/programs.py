"""What every capjax program does the same way around its `main`.

  if __name__ == '__main__':
    programs.run(main)

`run` parses the flags (absl), keeps the console to capjax's own lines,
keeps TensorFlow off the accelerators (JAX owns them), and turns a
`UserError` into one line, `error: MESSAGE`, on stderr and exit status 1.
A missing optional dependency is named in one line too, with the extra that
installs it. Any other exception is a bug and keeps its traceback.
"""

from collections.abc import Callable, Sequence
import contextlib
import dataclasses
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import logging as py_logging
import os
import pathlib
import re
import sys
import types

from absl import app
from absl import flags
from absl import logging

from capjax import console
from capjax import errors

Main = Callable[[Sequence[str]], None]

# The extra (setup.cfg) that installs each optional top-level module.
_EXTRA_OF_MODULE = {
  'tensorflow': 'data',
  'tensorflow_datasets': 'data',
  'tensorboard': 'data',
  'pycocoevalcap': 'metrics',
  'starlette': 'serve',
  'uvicorn': 'serve',
  'httptools': 'serve',
  'multipart': 'serve',
  'python_multipart': 'serve',
  'prometheus_client': 'serve',
  'matplotlib': 'plots',
  'jax2onnx': 'export',
  'onnx': 'export',
  'onnxruntime': 'export',
  'torch': 'bench',
}

_PACKAGE_DIR = str(pathlib.Path(__file__).resolve().parent)

# TF_CPP_MIN_LOG_LEVEL as JAX sets it on import when it is unset.
_JAX_TF_CPP_MIN_LOG_LEVEL = '1'


class _OwnInfoOnly(py_logging.Filter):
  """Passes capjax's own messages, and only warnings and errors of libraries."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or record.pathname.startswith(
      _PACKAGE_DIR
    )


def concise_console_logging() -> None:
  """Keeps the console to capjax's progress lines.

  Orbax, JAX and TensorFlow log many INFO lines of their own through absl.
  """
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_OwnInfoOnly())


class _AfterImport(importlib.abc.MetaPathFinder):
  """Calls `then(module)` once the top-level module `name` is imported.

  The import itself runs in the context `around()`.
  """

  def __init__(
    self,
    name: str,
    then: Callable[[types.ModuleType], None],
    around: Callable[[], contextlib.AbstractContextManager] = (
      contextlib.nullcontext
    ),
  ):
    self._name, self._then, self._around = name, then, around

  def find_spec(self, fullname, path, target=None):
    del target  # the module is found by the path finder
    if fullname != self._name:
      return None
    # Not removed from sys.meta_path yet: libraries look the module up
    # (importlib.util.find_spec) without importing it, Orbax among them.
    spec = importlib.machinery.PathFinder.find_spec(fullname, path)
    if spec is None or spec.loader is None:
      return spec
    exec_module = spec.loader.exec_module

    def exec_then(module):
      sys.meta_path.remove(self)
      with self._around():
        exec_module(module)
      self._then(module)

    spec.loader.exec_module = exec_then
    return spec


def _hide_gpus(tf: types.ModuleType) -> None:
  tf.config.set_visible_devices([], 'GPU')


# What TensorFlow's C++ code prints while it is imported, before its logging
# is set up (absl's notice of that, then INFO lines: oneDNN is on, no CUDA
# driver was found); TF_CPP_MIN_LOG_LEVEL does not reach these.
_TENSORFLOW_IMPORT_NOISE = re.compile(
  r'WARNING: All log messages before absl::InitializeLog\(\) is called'
  r'|I\d{4} [\d:.]+ +\d+ \w+\.cc:\d+\] '
)


def quiet_tensorflow(hide_gpus: bool) -> None:
  """Keeps TensorFlow's start-up lines off the console, and it off JAX's GPUs.

  TensorFlow is not imported for it: this is done when something first
  imports TensorFlow, so programs that never use it (sample, evaluate and
  serve on JAX features) start without its seconds and memory, and run
  where it is not installed.

  Args:
    hide_gpus: keep TensorFlow (tf.data, Keras, image resizing) off the
      GPUs JAX uses.
  """
  # TensorFlow's C++ errors that are not failures (no CUDA device where it
  # looked for one; no float16 oneDNN kernels on this CPU) stay off too,
  # unless the user set TF_CPP_MIN_LOG_LEVEL (to other than what JAX sets
  # when it is unset): what fails raises. TensorFlow reads it as it loads.
  level = os.environ.get('TF_CPP_MIN_LOG_LEVEL', _JAX_TF_CPP_MIN_LOG_LEVEL)
  if level == _JAX_TF_CPP_MIN_LOG_LEVEL and 'tensorflow' not in sys.modules:
    os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'
  then = _hide_gpus if hide_gpus else lambda tf: None
  if sys.modules.get('tensorflow') is not None:
    then(sys.modules['tensorflow'])
  else:
    sys.meta_path.insert(
      0,
      _AfterImport(
        'tensorflow',
        then,
        functools.partial(console.stderr_without, _TENSORFLOW_IMPORT_NOISE),
      ),
    )


@dataclasses.dataclass(frozen=True)
class ProcessFlags:
  """The flags that place a process in a multi-process job."""

  coordinator_address: flags.FlagHolder[str]
  num_processes: flags.FlagHolder[int]
  process_id: flags.FlagHolder[int]

  def values(self) -> tuple[str, int, int]:
    """The arguments of `training.parallel.maybe_initialize_distributed`."""
    return (
      self.coordinator_address.value,
      self.num_processes.value,
      self.process_id.value,
    )


def define_process_flags() -> ProcessFlags:
  """Defines --coordinator_address, --num_processes and --process_id."""
  return ProcessFlags(
    flags.DEFINE_string(
      'coordinator_address',
      '',
      'host:port of process 0, for '
      'multi-process jobs not started by SLURM or on Cloud TPU (which '
      'are detected).',
    ),
    flags.DEFINE_integer(
      'num_processes', 0, 'Processes in a multi-process job.'
    ),
    flags.DEFINE_integer(
      'process_id', -1, 'This process in a multi-process job.'
    ),
  )


@dataclasses.dataclass(frozen=True)
class CheckpointFlags:
  """The flags that choose a trained workdir's checkpoint."""

  workdir: flags.FlagHolder[str]
  step: flags.FlagHolder[int | None]


def define_checkpoint_flags() -> CheckpointFlags:
  """Defines --workdir and --step, for programs that use a trained model."""
  return CheckpointFlags(
    flags.DEFINE_string('workdir', None, 'A trained workdir.', required=True),
    flags.DEFINE_integer(
      'step',
      None,
      "The checkpoint's step; default: the best checkpoint "
      '(config.best_metric), else the newest.',
      lower_bound=0,
    ),
  )


@dataclasses.dataclass(frozen=True)
class DecoderFlags:
  """The flags of the search that decodes captions."""

  beam_size: flags.FlagHolder[int]
  alpha: flags.FlagHolder[float]
  max_len: flags.FlagHolder[int]


def define_decoder_flags() -> DecoderFlags:
  """Defines --beam_size, --alpha and --max_len, bounded as the model needs.

  The bounds make a bad value the user's one-line flags error, not the
  model's ValueError.
  """
  return DecoderFlags(
    flags.DEFINE_integer(
      'beam_size', 1, 'Beam search width; 1 is greedy search.', lower_bound=1
    ),
    flags.DEFINE_float(
      'alpha',
      0.0,
      "Beam search's length normalisation (GNMT alpha; 0 = off).",
      lower_bound=0.0,
    ),
    flags.DEFINE_integer(
      'max_len',
      0,
      "Most words per caption, <end> included; 0: the config's longest "
      'caption.',
      lower_bound=0,
    ),
  )


def refuse_arguments(argv: Sequence[str]) -> None:
  """Refuses positional arguments, for programs that take flags only.

  A boolean flag given its value after a space (`--config.flag false`)
  leaves the value behind as a positional argument; absl would read the
  flag alone as True.
  """
  if len(argv) > 1:
    raise app.UsageError(
      f'unexpected arguments: {" ".join(argv[1:])} (boolean flags take '
      'their value after "=", e.g. --config.group_by_length=false)'
    )


# The Orbax coroutines that read one array of a checkpoint, and one part.
_ORBAX_DESERIALIZE = 'async_deserialize'
_ORBAX_READ = '_read_array_index_and_device_put'
# How asyncio reports a task's or a future's exception that nobody read, and
# what every error of a TensorStore read ends with.
_UNRETRIEVED = (
  'Task exception was never retrieved',
  'Future exception was never retrieved',
)
_TENSORSTORE_ERROR = '[tensorstore_spec='


def _is_abandoned_restore(unraisable) -> bool:
  """Whether an unraisable exception is what a failed restore leaves behind.

  When one read of a damaged checkpoint fails, Orbax closes its event loop
  with the step's other reads still pending. As each pending read's
  TensorStore future completes, its callback finds the loop closed (an
  unraisable RuntimeError); as each pending read's coroutine is collected,
  Python closes it, and Orbax's `except BaseException` turns the
  GeneratorExit into an Exception (unraisable too). Either prints a long
  traceback after the program has already named the damaged step.
  """
  if (
    unraisable.exc_type is RuntimeError
    and str(unraisable.exc_value) == 'Event loop is closed'
  ):
    return True
  coroutine = getattr(unraisable.object, 'cr_code', None)
  return (
    coroutine is not None
    and coroutine.co_name == _ORBAX_READ
    and isinstance(unraisable.exc_value.__cause__, GeneratorExit)
  )


class _NoAbandonedRestoreTasks(py_logging.Filter):
  """Drops asyncio's report of a failed restore's reads that were left.

  The reads that fail after the first one end their tasks (Orbax's) and
  futures (TensorStore's) with an exception nobody retrieves, as Orbax has
  given up on them (see `_is_abandoned_restore`); asyncio logs each one,
  with TensorStore's spec.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    message = record.msg if isinstance(record.msg, str) else ''
    return not (
      message.startswith(_UNRETRIEVED)
      and (
        f'coro=<{_ORBAX_DESERIALIZE}()' in message
        or _TENSORSTORE_ERROR in message
      )
    )


def _drop_closed_loop_callbacks(default_hook):
  """An unraisable-exception hook that drops what a failed restore leaves.

  See `_is_abandoned_restore`; every other unraisable exception is printed.
  """

  def hook(unraisable):
    if not _is_abandoned_restore(unraisable):
      default_hook(unraisable)

  return hook


def missing_extra(exc: BaseException) -> str | None:
  """The one-line error for an optional dependency that is not installed."""
  if not isinstance(exc, ModuleNotFoundError) or not exc.name:
    return None
  extra = _EXTRA_OF_MODULE.get(exc.name.split('.')[0])
  if extra is None:
    return None
  return (
    f'error: this needs {exc.name.split(".")[0]}, which is not installed: '
    f"pip install 'capjax[{extra}]'"
  )


def _one_line_for_missing_extras(default_hook):
  """A `sys.excepthook` that names the extra for a failed optional import.

  A program imports its stack at module level, before `run` starts, so a
  missing extra surfaces there, not inside `main`.
  """

  def hook(exc_type, exc, traceback):
    message = missing_extra(exc)
    if message is None:
      default_hook(exc_type, exc, traceback)
    else:
      print(message, file=sys.stderr)

  return hook


# Programs import this module before their optional stacks (imports are
# sorted: `capjax.programs` precedes `capjax.serving.*`), so the hook is in
# place when one of those fails to import.
sys.excepthook = _one_line_for_missing_extras(sys.excepthook)


def _run_main(main: Main, tensorflow_gpus: bool, argv: list[str]) -> None:
  concise_console_logging()
  sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)
  py_logging.getLogger('asyncio').addFilter(_NoAbandonedRestoreTasks())
  quiet_tensorflow(hide_gpus=not tensorflow_gpus)
  try:
    main(argv)
  except errors.UserError as e:
    _exit_failed(f'error: {e}')
  except ModuleNotFoundError as e:
    message = missing_extra(e)
    if message is None:
      raise
    _exit_failed(message)


def _exit_failed(message: str) -> None:
  """Prints the one-line failure and exits with status 1.

  A process of a multi-process job exits at once: every process of a failed
  job gets here (training.parallel.agreed), and the distributed runtime's
  shutdown at exit would wait on peers that are gone, for minutes. Nothing
  is left to save: training waits for its checkpoints before it raises.
  """
  print(message, file=sys.stderr)
  jax = sys.modules.get('jax')
  if jax is not None and jax.distributed.is_initialized():
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # noqa: SLF001
  sys.exit(1)


def run(main: Main, *, tensorflow_gpus: bool = False) -> None:
  """Runs a program's `main(argv)` (see the module docstring).

  Args:
    main: the program; raises UserError for the user's mistakes.
    tensorflow_gpus: let TensorFlow use the GPUs (feature extraction only).
  """
  app.run(functools.partial(_run_main, main, tensorflow_gpus))
