"""The self-describing working directory.

A workdir holds everything later commands need, so `sample`, `evaluate` and
`serve` take nothing but `--workdir`:

  config.json        the training config
  vocab.json         the vocabulary
  features.json      the feature extractor's name and settings, L and D
  checkpoints/       Orbax checkpoints of the train state
  metrics.jsonl, loss.png, tensorboard/   progress (see capjax.reporting)
"""

import json
import os
import pathlib

import jax
import ml_collections
import orbax.checkpoint as ocp

from capjax import files

CONFIG_FILE = 'config.json'
VOCAB_FILE = 'vocab.json'
FEATURES_FILE = 'features.json'
CHECKPOINT_DIR = 'checkpoints'

# Fields that fix the shapes of the parameters or the meaning of token ids:
# a checkpoint cannot be resumed under a config that changes any of them.
MODEL_FIELDS = ('dataset', 'extractor', 'patch_grid', 'top_k', 'embedding_dim',
                'units', 'carry_gru_state')


def save_config(workdir: str | os.PathLike[str],
                config: ml_collections.ConfigDict) -> None:
  files.write_text_atomic(pathlib.Path(workdir) / CONFIG_FILE,
                          config.to_json(indent=2))


def load_config(workdir: str | os.PathLike[str]) -> ml_collections.ConfigDict:
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f'{workdir} is not a capjax workdir: no {CONFIG_FILE}')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def check_compatible(saved: ml_collections.ConfigDict,
                     config: ml_collections.ConfigDict) -> None:
  """Raises if `config` cannot continue training a model saved with `saved`."""
  changed = [f'{name}: {saved.get(name)!r} -> {config.get(name)!r}'
             for name in MODEL_FIELDS if saved.get(name) != config.get(name)]
  if changed:
    raise ValueError(
        'this workdir holds a model trained under another config ('
        + '; '.join(changed) + '); use a new --workdir or the saved config')


def save_json(path: str | os.PathLike[str], value) -> None:
  files.write_json_atomic(path, value, indent=2)


def load_json(path: str | os.PathLike[str]):
  return json.loads(pathlib.Path(path).read_text())


def checkpoint_manager(workdir: str | os.PathLike[str], max_to_keep: int = 3,
                       read_only: bool = False) -> ocp.CheckpointManager:
  """Orbax manager of `<workdir>/checkpoints`: asynchronous, or read-only."""
  if read_only:
    options = ocp.CheckpointManagerOptions(create=False)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep)
  directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
  return ocp.CheckpointManager(
      directory, options=options,
      item_handlers=ocp.StandardCheckpointHandler())




def load_params(workdir: str | os.PathLike[str], step: int | None = None):
  """The model parameters of a checkpoint (the latest by default).

  They come back on this process's first device, whatever devices the
  checkpoint was saved from (a cluster's checkpoint loads on a laptop).

  Raises:
    FileNotFoundError: the workdir holds no checkpoint.
  """
  manager = checkpoint_manager(workdir, read_only=True)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(
          f'no checkpoint in {pathlib.Path(workdir) / CHECKPOINT_DIR}: train '
          f'first with `python -m capjax.train --workdir {workdir}`')
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        manager.item_metadata(step))
    state = manager.restore(step, args=ocp.args.StandardRestore(target))
  finally:
    manager.close()
  return state['params']
