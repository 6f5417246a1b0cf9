"""Orbax checkpoints of the train state in `<workdir>/checkpoints`.

Training saves the whole state asynchronously and resumes from the newest
step that restores completely; inference restores the parameters alone (a
partial restore: the optimizer state is neither read nor built). Every
restore is checked against what the caller expects (the tree, shapes and
dtypes the config and vocabulary imply) before any array is read, and a
step that cannot be read is reported by number and path, never with
Orbax's traceback. Damaged steps are moved aside to
`<workdir>/damaged_checkpoints/`, never deleted.

The best checkpoint (the parameters of the evaluation with the best
validation score, capjax.training.best) lives apart, in
`<workdir>/best_checkpoint`, with the score that chose it. Programs load it
by default: `resolve` says which checkpoint a workdir and an optional step
name, `restore_checkpoint` reads its parameters.
"""

import dataclasses
import math
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from capjax import errors
from capjax import workdir as workdir_lib
from capjax.training import damage
from capjax.training import orbax_logs

PathLike = str | os.PathLike[str]


class DamagedCheckpointError(errors.UserError):
  """A checkpoint step that cannot be read, or does not fit the model."""


def directory(workdir: PathLike) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / workdir_lib.CHECKPOINT_DIR


def best_directory(workdir: PathLike) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / workdir_lib.BEST_CHECKPOINT_DIR


def _read_only_options() -> ocp.CheckpointManagerOptions:
  """Options of a manager that only reads.

  Orbax would warn for each option a read-only manager does not use and is
  left at its default (save_interval_steps), so none is.
  """
  return ocp.CheckpointManagerOptions(
    create=False, read_only=True, save_interval_steps=0
  )


def manager(
  workdir: PathLike, max_to_keep: int = 3, read_only: bool = False
) -> ocp.CheckpointManager:
  """Orbax manager of the whole train state: asynchronous, or read-only."""
  orbax_logs.quiet()
  if read_only:
    options = _read_only_options()
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep)
  return ocp.CheckpointManager(
    directory(workdir),
    options=options,
    item_handlers=ocp.StandardCheckpointHandler(),
  )


def best_manager(
  workdir: PathLike, metric: str, mode: str
) -> ocp.CheckpointManager:
  """Orbax manager of the best checkpoint: parameters and their score.

  A directory apart from the newest checkpoints, because Orbax's best_fn on
  their manager would make max_to_keep keep the best-scoring steps instead
  of the newest, and resume needs the newest (steps saved between
  evaluations, or on a signal, have no score at all). Here Orbax keeps one
  step, ranked by `metric` (`mode` 'max' or 'min'), and commits the score
  (`metrics=` of `save`) with the parameters, atomically; the step it
  replaces is deleted only after that commit. A step scored by another
  metric ranks last, so the first save under a new metric replaces it.
  """
  orbax_logs.quiet()
  worst = -math.inf if mode == 'max' else math.inf
  options = ocp.CheckpointManagerOptions(
    max_to_keep=1,
    best_fn=lambda scores: scores.get(metric, worst),
    best_mode=mode,
  )
  return ocp.CheckpointManager(
    best_directory(workdir),
    options=options,
    item_handlers=ocp.StandardCheckpointHandler(),
  )


def _tree_manager(path: pathlib.Path) -> ocp.CheckpointManager:
  """A read-only manager of a directory, to restore part of a saved tree."""
  orbax_logs.quiet()
  return ocp.CheckpointManager(
    path,
    options=_read_only_options(),
    item_handlers=ocp.PyTreeCheckpointHandler(),
  )


def abstract_tree(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """The restore target of a tree (of arrays or of their metadata)."""
  return jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
  )


def _reason(error: Exception) -> str:
  return damage.reason(error)


def mismatches(expected: Any, saved: Any) -> list[str]:
  """How a saved tree of arrays differs from an expected one, leaf by leaf.

  Both are trees of anything with `shape` and `dtype` (arrays,
  ShapeDtypeStructs, Orbax metadata).
  """
  describe = lambda tree: {
    jax.tree_util.keystr(path): (tuple(x.shape), np.dtype(x.dtype))
    for path, x in jax.tree_util.tree_leaves_with_path(tree)
  }
  want, got = describe(expected), describe(saved)
  found = [f'{name} missing' for name in sorted(set(want) - set(got))]
  found += [f'{name} not expected' for name in sorted(set(got) - set(want))]
  found += [
    f'{name} is {got[name][0]} {got[name][1]}, expected '
    f'{want[name][0]} {want[name][1]}'
    for name in sorted(set(want) & set(got))
    if want[name] != got[name]
  ]
  return found


def _check_finite(tree: Any) -> None:
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if np.issubdtype(x.dtype, np.floating) and not np.all(
      np.isfinite(np.asarray(x))
    ):
      raise ValueError(f'{jax.tree_util.keystr(path)} holds non-finite values')


def _restore_params(
  checkpoints: ocp.CheckpointManager, step: int, expected: Any | None
) -> Any:
  """The checked parameters of one step, on this process's first device."""
  saved = dict(checkpoints.item_metadata(step).tree)['params']
  if expected is not None and (found := mismatches(expected, saved)):
    raise DamagedCheckpointError(
      f'checkpoint step {step} does not fit the model that config.json and '
      f'vocab.json describe: {"; ".join(found[:5])}'
    )
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {'params': abstract_tree(saved, device)}
  restored = checkpoints.restore(
    step,
    args=ocp.args.PyTreeRestore(
      item=target,
      partial_restore=True,
      restore_args=jax.tree_util.tree_map(
        lambda _: ocp.ArrayRestoreArgs(sharding=device), target
      ),
    ),
  )
  _check_finite(restored['params'])
  return restored['params']


# How each metric that can choose the best checkpoint is named in messages.
_METRIC_NAMES = {
  'cider': 'validation CIDEr',
  'bleu4': 'validation BLEU-4',
  'loss': 'validation loss',
}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """One checkpoint of a workdir, as `resolve` chose it.

  Attributes:
    workdir: the workdir.
    step: the training step it was saved at.
    kind: 'best' (in best_checkpoint/), 'newest' or 'given' (a step asked
      for, in checkpoints/).
    metric: for the best one, the validation metric that chose it.
    score: for the best one, its score under that metric.
  """

  workdir: pathlib.Path
  step: int
  kind: str
  metric: str | None = None
  score: float | None = None

  @property
  def directory(self) -> pathlib.Path:
    """The Orbax directory that holds the step."""
    return (best_directory if self.kind == 'best' else directory)(self.workdir)

  @property
  def name(self) -> str:
    """In messages: 'checkpoint step 8', 'the best checkpoint (step 6)'."""
    if self.kind == 'best':
      return f'the best checkpoint (step {self.step})'
    return f'checkpoint step {self.step}'

  def describe(self) -> str:
    """'the best checkpoint (step 6, validation CIDEr 0.412)', 'the newest
    checkpoint (step 8)' or 'the checkpoint of step 4'."""
    if self.kind == 'best':
      assert self.metric is not None  # Set for every best checkpoint.
      return (
        f'the best checkpoint (step {self.step}, '
        f'{_METRIC_NAMES.get(self.metric, self.metric)} '
        f'{self.score:.4g})'
      )
    if self.kind == 'newest':
      return f'the newest checkpoint (step {self.step})'
    return f'the checkpoint of step {self.step}'


def _steps(path: pathlib.Path) -> list[int]:
  """The committed steps of an Orbax directory, oldest first."""
  checkpoints = _tree_manager(path)
  try:
    return sorted(checkpoints.all_steps())
  finally:
    checkpoints.close()


def read_best(workdir: PathLike) -> Checkpoint | None:
  """The best checkpoint's step, metric and score; None when there is none.

  Reads the score only, not the parameters.

  Raises:
    DamagedCheckpointError: the score cannot be read.
  """
  path = best_directory(workdir)
  if not path.is_dir():
    return None
  try:
    best = _tree_manager(path)  # reads every step's score
    try:
      steps = best.all_steps()
      if not steps:
        return None
      # Only a better score is ever saved, and the step it replaces is
      # deleted after the save commits: the newest step is the best one.
      step = max(steps)
      ((metric, score),) = dict(best.metrics(step)).items()
    finally:
      best.close()
  # Orbax raises many types on damaged files.
  except Exception as e:  # noqa: BLE001
    raise DamagedCheckpointError(
      f'the best checkpoint in {path} cannot be read ({_reason(e)})'
    ) from None
  return Checkpoint(pathlib.Path(workdir), step, 'best', metric, float(score))


def _missing(
  workdir: PathLike,
  step: int | None,
  steps: list[int],
  best: Checkpoint | None = None,
) -> errors.MissingFileError:
  """No checkpoint at all, or none of `step`."""
  if step is None or not (steps or best):
    return errors.MissingFileError(
      f'no checkpoint in {directory(workdir)}: train first with '
      f'{workdir_lib.train_command(workdir)}'
    )
  held = [f'steps {", ".join(map(str, steps))}'] if steps else []
  held += [f'the best, step {best.step}'] if best else []
  return errors.MissingFileError(
    f'no checkpoint of step {step} in {directory(workdir)}; it holds '
    f'{" and ".join(held)}'
  )


def resolve(workdir: PathLike, step: int | None = None) -> Checkpoint:
  """The checkpoint a program loads: `step` if given, else the best or newest.

  A given step is looked for in checkpoints/, then in best_checkpoint/. This
  is the one rule for choosing; `restore_checkpoint` then reads it:

    checkpoint = checkpoints.resolve(workdir)
    params = checkpoints.restore_checkpoint(checkpoint, expected_params)

  Raises:
    MissingFileError: no checkpoint at all, or none of that step.
    DamagedCheckpointError: the best checkpoint's score cannot be read (when
      no step is given); the message names the newest step.
  """
  workdir = pathlib.Path(workdir)
  steps = _steps(directory(workdir))
  if step is not None and step in steps:
    return Checkpoint(workdir, step, 'given')
  try:
    best = read_best(workdir)
  except DamagedCheckpointError as e:
    if step is None:
      advice = (
        f'the newest checkpoint is step {steps[-1]}: pass --step {steps[-1]}'
        if steps
        else 'there is no other checkpoint'
      )
      raise DamagedCheckpointError(f'{e}; {advice}') from None
    best = None
  if step is None:
    if best is not None:
      return best
    if steps:
      return Checkpoint(workdir, steps[-1], 'newest')
    raise _missing(workdir, None, steps)
  if best is not None and best.step == step:
    return best
  raise _missing(workdir, step, steps, best)


def _read(
  checkpoint: Checkpoint, expected: Any | None
) -> tuple[Any, str | None]:
  """(parameters, None), or (None, why they cannot be read).

  Raises:
    DamagedCheckpointError: they do not fit `expected`.
  """
  checkpoints = _tree_manager(checkpoint.directory)
  try:
    return _restore_params(checkpoints, checkpoint.step, expected), None
  except DamagedCheckpointError:
    raise
  except Exception as e:  # noqa: BLE001
    # Orbax and TensorStore raise many types on damaged files.
    return None, _reason(e)
  finally:
    checkpoints.close()


def restore_checkpoint(
  checkpoint: Checkpoint, expected: Any | None = None
) -> Any:
  """The parameters of a resolved checkpoint, on this process's first device.

  Args:
    checkpoint: what `resolve` returned.
    expected: the parameters' abstract tree (shapes and dtypes), checked
      before anything is read; None skips the check.

  Raises:
    DamagedCheckpointError: it cannot be read or does not fit; the message
      names the newest other step in checkpoints/ that can be read, if any.
  """
  params, failure = _read(checkpoint, expected)
  if failure is None:
    return params
  newest = _tree_manager(directory(checkpoint.workdir))
  try:
    good = _newest_readable(
      newest,
      [
        s
        for s in newest.all_steps()
        if checkpoint.kind == 'best' or s != checkpoint.step
      ],
      expected,
    )
  finally:
    newest.close()
  advice = (
    f'step {good} can be read: pass --step {good}'
    if good is not None
    else 'no other step can be read either'
  )
  raise DamagedCheckpointError(
    f'{checkpoint.name} in {checkpoint.directory / str(checkpoint.step)} '
    f'cannot be read ({failure}); {advice}'
  )


def check_best(workdir: PathLike, expected: Any | None) -> Checkpoint | None:
  """The best checkpoint once its parameters are read and checked; None if none.

  Raises:
    DamagedCheckpointError: its score or parameters cannot be read, or they
      do not fit `expected`.
  """
  best = read_best(workdir)
  if best is not None and (failure := _read(best, expected)[1]):
    raise DamagedCheckpointError(
      f'{best.name} in {best.directory} cannot be read ({failure})'
    )
  return best


def restore_params(
  workdir: PathLike, step: int | None = None, expected: Any | None = None
) -> tuple[int, Any]:
  """(step, parameters) of checkpoints/: `step`, or the newest by default.

  The best checkpoint is not considered: `resolve` and `restore_checkpoint`
  are what programs use. Only the parameters are read. They come back on
  this process's first device, whatever devices the checkpoint was saved
  from.

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
  steps = _steps(directory(workdir))
  if not steps or (step is not None and step not in steps):
    raise _missing(workdir, step if steps else None, steps)
  checkpoint = Checkpoint(
    pathlib.Path(workdir),
    steps[-1] if step is None else step,
    'newest' if step is None else 'given',
  )
  return checkpoint.step, restore_checkpoint(checkpoint, expected)


def _newest_readable(
  checkpoints: ocp.CheckpointManager, steps: list[int], expected: Any | None
) -> int | None:
  for step in sorted(steps, reverse=True):
    try:
      _restore_params(checkpoints, step, expected)
      return step
    except Exception:  # noqa: BLE001
      continue
  return None


def restore_newest(
  workdir: PathLike, target: Any
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
  skipped: list[tuple[int, str]] = []
  try:
    for step in sorted(checkpoints.all_steps(), reverse=True):
      try:
        state = checkpoints.restore(step, args=ocp.args.StandardRestore(target))
        _check_finite(state)
        return step, state, skipped
      # Orbax and TensorStore raise many types on damaged files.
      except Exception as e:  # noqa: BLE001
        skipped.append((step, _reason(e)))
  finally:
    checkpoints.close()
  if not skipped:
    return None
  raise DamagedCheckpointError(
    f'no checkpoint in {directory(workdir)} restores: '
    + '; '.join(f'step {s}: {r}' for s, r in skipped)
  )
