"""Orbax checkpoints of the train state in `<workdir>/checkpoints`.

Training saves the whole state asynchronously and resumes from it; inference
restores the parameters. A restore is given its target's shapes, dtypes and
placement (`abstract_tree`), so a checkpoint saved on a cluster restores on
a laptop.
"""

import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from capjax import errors
from capjax import workdir as workdir_lib


def manager(workdir: str | os.PathLike[str], max_to_keep: int = 3,
            read_only: bool = False) -> ocp.CheckpointManager:
  """Orbax manager of `<workdir>/checkpoints`: asynchronous, or read-only."""
  if read_only:
    options = ocp.CheckpointManagerOptions(create=False)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep)
  directory = pathlib.Path(workdir).absolute() / workdir_lib.CHECKPOINT_DIR
  return ocp.CheckpointManager(
      directory, options=options,
      item_handlers=ocp.StandardCheckpointHandler())


def abstract_tree(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """The restore target of a tree (of arrays or of their metadata)."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      tree)


def restore(checkpoints: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """The state saved at `step`, shaped and placed as the abstract `target`."""
  return checkpoints.restore(step, args=ocp.args.StandardRestore(target))


def latest_step(workdir: str | os.PathLike[str]) -> int:
  """The newest checkpoint's step.

  Raises:
    MissingFileError: the workdir holds no checkpoint.
  """
  checkpoints = manager(workdir, read_only=True)
  try:
    step = checkpoints.latest_step()
  finally:
    checkpoints.close()
  if step is None:
    raise errors.MissingFileError(
        f'no checkpoint in {pathlib.Path(workdir) / workdir_lib.CHECKPOINT_DIR}'
        f': train first with {workdir_lib.train_command(workdir)}')
  return step


def load_params(workdir: str | os.PathLike[str], step: int | None = None):
  """The model parameters of a checkpoint (the latest by default).

  They come back on this process's first device, whatever devices the
  checkpoint was saved from.

  Raises:
    MissingFileError: the workdir holds no checkpoint.
  """
  step = latest_step(workdir) if step is None else step
  checkpoints = manager(workdir, read_only=True)
  try:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    state = restore(checkpoints, step,
                    abstract_tree(checkpoints.item_metadata(step), device))
  finally:
    checkpoints.close()
  return state['params']
