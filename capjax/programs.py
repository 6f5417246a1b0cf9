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
import dataclasses
import functools
import importlib.abc
import importlib.util
import logging as py_logging
import os
import pathlib
import sys
import types

from absl import app
from absl import flags
from absl import logging

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
  """Calls `then(module)` once the top-level module `name` is imported."""

  def __init__(self, name: str, then: Callable[[types.ModuleType], None]):
    self._name, self._then = name, then

  def find_spec(self, fullname, path, target=None):
    del path, target  # the module is found by the other finders
    if fullname != self._name:
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(fullname)
    if spec is None or spec.loader is None:
      return spec
    exec_module = spec.loader.exec_module

    def exec_then(module):
      exec_module(module)
      self._then(module)

    spec.loader.exec_module = exec_then
    return spec


def _hide_gpus(tf: types.ModuleType) -> None:
  tf.config.set_visible_devices([], 'GPU')


def hide_gpus_from_tensorflow() -> None:
  """Keeps TensorFlow (tf.data, Keras, image resizing) off the GPUs JAX uses.

  TensorFlow is not imported for it: the GPUs are hidden when something
  first imports TensorFlow, so programs that never use it (sample, evaluate
  and serve on JAX features) start without its seconds and memory, and run
  where it is not installed.
  """
  if sys.modules.get('tensorflow') is not None:
    _hide_gpus(sys.modules['tensorflow'])
  else:
    sys.meta_path.insert(0, _AfterImport('tensorflow', _hide_gpus))


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


def _drop_closed_loop_callbacks(default_hook):
  """An unraisable-exception hook that drops late callbacks to a closed loop.

  When a checkpoint fails to restore, Orbax closes its event loop while
  TensorStore's other reads of the step are still in flight; as each ends,
  its completion callback finds the loop closed and Python prints that
  unraisable RuntimeError with a traceback, after the program has already
  named the damaged step. Every other unraisable exception is printed.
  """

  def hook(unraisable):
    if (
      unraisable.exc_type is RuntimeError
      and str(unraisable.exc_value) == 'Event loop is closed'
    ):
      return
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
  if not tensorflow_gpus:
    hide_gpus_from_tensorflow()
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
