"""Orbax checkpoints of the train state in `<workdir>/checkpoints`.

Training saves the whole state asynchronously and resumes from the newest
step that restores completely; inference restores the parameters alone (a
partial restore: the optimizer state is neither read nor built). Every
restore is checked against what the caller expects (the tree, shapes and
dtypes the config and vocabulary imply) before any array is read, and a
step that cannot be read is reported by number and path, never with
Orbax's traceback. Damaged steps are moved aside to
`<workdir>/damaged_checkpoints/`, never deleted.
"""

import os
import pathlib
import shutil
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from capjax import errors
from capjax import workdir as workdir_lib

PathLike = str | os.PathLike[str]
DAMAGED_DIR = 'damaged_checkpoints'
# How much of a restore error a message quotes.
_REASON_CHARS = 300


class DamagedCheckpointError(errors.UserError):
  """A checkpoint step that cannot be read, or does not fit the model."""


def directory(workdir: PathLike) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / workdir_lib.CHECKPOINT_DIR


def manager(workdir: PathLike, max_to_keep: int = 3,
            read_only: bool = False) -> ocp.CheckpointManager:
  """Orbax manager of the whole train state: asynchronous, or read-only."""
  if read_only:
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep)
  return ocp.CheckpointManager(
      directory(workdir), options=options,
      item_handlers=ocp.StandardCheckpointHandler())


def _tree_manager(workdir: PathLike) -> ocp.CheckpointManager:
  """A read-only manager that can restore part of a saved tree."""
  return ocp.CheckpointManager(
      directory(workdir),
      options=ocp.CheckpointManagerOptions(create=False, read_only=True),
      item_handlers=ocp.PyTreeCheckpointHandler())


def abstract_tree(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """The restore target of a tree (of arrays or of their metadata)."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      tree)


def _quiet_closed_event_loop() -> None:
  """Drops the 'Event loop is closed' errors a failed restore leaves behind.

  When one read of a damaged checkpoint fails, Orbax closes its event loop
  while TensorStore still completes the other reads; their callbacks then
  fail, unraisably, when the interpreter exits, each printing a traceback
  after the one-line error that matters.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'capjax_quiet', False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == 'Event loop is closed'):
      previous(unraisable)

  hook.capjax_quiet = True
  sys.unraisablehook = hook


def _reason(error: Exception) -> str:
  """The first line of an error, short enough for a one-line message."""
  _quiet_closed_event_loop()
  text = str(error).strip().splitlines()
  first = text[0] if text else ''
  return f'{type(error).__name__}: {first[:_REASON_CHARS]}'


def mismatches(expected: Any, saved: Any) -> list[str]:
  """How a saved tree of arrays differs from an expected one, leaf by leaf.

  Both are trees of anything with `shape` and `dtype` (arrays,
  ShapeDtypeStructs, Orbax metadata).
  """
  describe = lambda tree: {
      jax.tree_util.keystr(path): (tuple(x.shape), np.dtype(x.dtype))
      for path, x in jax.tree_util.tree_leaves_with_path(tree)}
  want, got = describe(expected), describe(saved)
  found = [f'{name} missing' for name in sorted(set(want) - set(got))]
  found += [f'{name} not expected' for name in sorted(set(got) - set(want))]
  found += [f'{name} is {got[name][0]} {got[name][1]}, expected '
            f'{want[name][0]} {want[name][1]}'
            for name in sorted(set(want) & set(got)) if want[name] != got[name]]
  return found


def _check_finite(tree: Any) -> None:
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if (np.issubdtype(x.dtype, np.floating)
        and not np.all(np.isfinite(np.asarray(x)))):
      raise ValueError(f'{jax.tree_util.keystr(path)} holds non-finite values')


def _restore_params(checkpoints: ocp.CheckpointManager, step: int,
                    expected: Any | None) -> Any:
  """The checked parameters of one step, on this process's first device."""
  saved = dict(checkpoints.item_metadata(step).tree)['params']
  if expected is not None and (found := mismatches(expected, saved)):
    raise DamagedCheckpointError(
        f'checkpoint step {step} does not fit the model that config.json and '
        f'vocab.json describe: {"; ".join(found[:5])}')
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {'params': abstract_tree(saved, device)}
  restored = checkpoints.restore(step, args=ocp.args.PyTreeRestore(
      item=target, partial_restore=True,
      restore_args=jax.tree_util.tree_map(
          lambda _: ocp.ArrayRestoreArgs(sharding=device), target)))
  _check_finite(restored['params'])
  return restored['params']


def restore_params(workdir: PathLike, step: int | None = None,
                   expected: Any | None = None) -> tuple[int, Any]:
  """(step, parameters) of a checkpoint: `step`, or the newest by default.

  Only the parameters are read. They come back on this process's first
  device, whatever devices the checkpoint was saved from.

  Args:
    workdir: the workdir.
    step: the step to load; None for the newest.
    expected: the parameters' abstract tree (shapes and dtypes), checked
      before anything is read; None skips the check.

  Raises:
    MissingFileError: no checkpoint, or no such step.
    DamagedCheckpointError: the step cannot be read or does not fit; the
      message names the newest step that can be read, if any.
  """
  checkpoints = _tree_manager(workdir)
  try:
    steps = sorted(checkpoints.all_steps(), reverse=True)
    if not steps:
      raise errors.MissingFileError(
          f'no checkpoint in {directory(workdir)}: train first with '
          f'{workdir_lib.train_command(workdir)}')
    step = steps[0] if step is None else step
    if step not in steps:
      raise errors.MissingFileError(
          f'no checkpoint of step {step} in {directory(workdir)}; it holds '
          f'steps {", ".join(map(str, sorted(steps)))}')
    try:
      return step, _restore_params(checkpoints, step, expected)
    except DamagedCheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # Orbax and TensorStore raise many types on damaged files; each is
      # reported, and the other steps are tried, as a checkpoint's damage.
      failure = _reason(e)
    good = _newest_readable(checkpoints, [s for s in steps if s != step],
                            expected)
    advice = (f'step {good} can be read: pass --step {good}'
              if good is not None else 'no other step can be read either')
    raise DamagedCheckpointError(
        f'checkpoint step {step} in {directory(workdir) / str(step)} cannot '
        f'be read ({failure}); {advice}')
  finally:
    checkpoints.close()


def _newest_readable(checkpoints: ocp.CheckpointManager, steps: list[int],
                     expected: Any | None) -> int | None:
  for step in sorted(steps, reverse=True):
    try:
      _restore_params(checkpoints, step, expected)
      return step
    except Exception:  # pylint: disable=broad-except
      continue
  return None


def load_params(workdir: PathLike, step: int | None = None) -> Any:
  """The parameters of a checkpoint (the newest by default); see restore_params."""
  return restore_params(workdir, step)[1]


def move_aside(workdir: PathLike, step: int) -> pathlib.Path:
  """Moves a damaged step out of the checkpoints, keeping its files."""
  target = pathlib.Path(workdir).absolute() / DAMAGED_DIR / str(step)
  target.parent.mkdir(parents=True, exist_ok=True)
  if target.exists():
    shutil.rmtree(target)
  shutil.move(directory(workdir) / str(step), target)
  return target


def restore_newest(workdir: PathLike, target: Any
                   ) -> tuple[int, Any, list[tuple[int, str]]] | None:
  """The newest step that restores completely as `target`, with its state.

  Args:
    workdir: the workdir.
    target: the abstract state (shapes, dtypes, shardings) to restore.

  Returns:
    (step, state, skipped): skipped lists the newer steps that could not be
    restored, each with the reason. None when the workdir holds no
    checkpoint.

  Raises:
    DamagedCheckpointError: checkpoints exist, but none restores.
  """
  checkpoints = manager(workdir, read_only=True)
  skipped = []
  try:
    for step in sorted(checkpoints.all_steps(), reverse=True):
      try:
        state = checkpoints.restore(step,
                                    args=ocp.args.StandardRestore(target))
        _check_finite(state)
        return step, state, skipped
      # Orbax and TensorStore raise many types on damaged files.
      except Exception as e:  # pylint: disable=broad-except
        skipped.append((step, _reason(e)))
  finally:
    checkpoints.close()
  if not skipped:
    return None
  raise DamagedCheckpointError(
      f'no checkpoint in {directory(workdir)} restores: '
      + '; '.join(f'step {s}: {r}' for s, r in skipped))
