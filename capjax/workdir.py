"""The self-describing working directory.

A workdir holds everything later commands need, so `sample`, `evaluate` and
`serve` take nothing but `--workdir`:

  config.json        the training config
  vocab.json         the vocabulary
  features.json      the feature extractor's name and settings, L and D
  checkpoints/       Orbax checkpoints of the train state
  best_checkpoint/   the parameters of the best evaluation, with its score
  examples/          a few held-out images to try, where the data set has them
  metrics.jsonl, loss.png, tensorboard/   progress (capjax.training.reporting)
"""

import os
import pathlib
import shutil

import ml_collections

from capjax import config_checks
from capjax import errors
from capjax import files

CONFIG_FILE = 'config.json'
VOCAB_FILE = 'vocab.json'
FEATURES_FILE = 'features.json'
CHECKPOINT_DIR = 'checkpoints'
BEST_CHECKPOINT_DIR = 'best_checkpoint'
EXAMPLES_DIR = 'examples'

# Fields that fix the shapes of the parameters or the meaning of token ids:
# a checkpoint cannot be resumed under a config that changes any of them.
MODEL_FIELDS = (
  'dataset',
  'extractor',
  'patch_grid',
  'top_k',
  'embedding_dim',
  'units',
  'carry_gru_state',
)

PathLike = str | os.PathLike[str]


def train_command(workdir: PathLike) -> str:
  """The command that makes what a workdir lacks."""
  return f'`python -m capjax.train --workdir {workdir}`'


def save_config(workdir: PathLike, config: ml_collections.ConfigDict) -> None:
  files.write_text_atomic(
    pathlib.Path(workdir) / CONFIG_FILE, config.to_json(indent=2)
  )


def load_config(workdir: PathLike) -> ml_collections.ConfigDict:
  """The workdir's training config.

  Raises:
    MissingFileError: not a workdir.
    UserError: unreadable, or a field that cannot work (unknown, of the
      wrong type, not one of its choices, out of range).
  """
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise errors.MissingFileError(
      f'{workdir} is not a capjax workdir: no {CONFIG_FILE}'
    )
  values = files.read_json(path)
  if not isinstance(values, dict):
    raise errors.UserError(f'{path} is not a capjax config: not a JSON object')
  config = config_checks.from_values(values, str(path))
  config_checks.check_config(config, str(path), paths=False)
  return config


def require_file(workdir: PathLike, name: str) -> pathlib.Path:
  """The path of a file training writes into the workdir, which must exist.

  Raises:
    MissingFileError: the file is absent, with the command that makes it.
  """
  path = pathlib.Path(workdir) / name
  if not path.exists():
    raise errors.MissingFileError(
      f'{workdir} lacks {name}: train first with {train_command(workdir)}'
    )
  return path


def check_compatible(
  saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict
) -> None:
  """Raises if `config` cannot continue training a model saved with `saved`."""
  changed = [
    f'{name}: {saved.get(name)!r} -> {config.get(name)!r}'
    for name in MODEL_FIELDS
    if saved.get(name) != config.get(name)
  ]
  if changed:
    raise errors.UserError(
      'this workdir holds a model trained under another config ('
      + '; '.join(changed)
      + '); use a new --workdir or the saved config'
    )


def save_json(path: PathLike, value) -> None:
  files.write_json_atomic(path, value, indent=2)


def save_examples(workdir: PathLike, images: list[str]) -> None:
  """Copies images into examples/ (none: no examples/)."""
  if not images:
    return
  examples = pathlib.Path(workdir) / EXAMPLES_DIR
  examples.mkdir(exist_ok=True)
  for image in images:
    shutil.copy(image, examples / pathlib.Path(image).name)
