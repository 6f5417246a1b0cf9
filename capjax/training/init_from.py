"""Starting a run from another workdir's model (`config.init_from`).

Self-critical training fine-tunes a cross-entropy model: a new workdir, a
new optimizer, the parameters of the other workdir's best checkpoint (else
its newest, or the step config.init_from_step names). The two runs must
agree on everything the parameters depend on, so that is checked before
anything is compiled: the model's fields, the vocabulary (taken from the
source) and the features (the source's `features.json` against the training
store).
"""

import pathlib
from typing import Any

from absl import logging
import ml_collections

from capjax import errors
from capjax import files
from capjax import workdir as workdir_lib
from capjax.data import feature_store
from capjax.data import vocab as vocab_lib
from capjax.training import checkpoints

# Config fields the parameters' shapes and meaning depend on.
MODEL_FIELDS = ('embedding_dim', 'units', 'carry_gru_state', 'top_k')


def source(config: ml_collections.ConfigDict) -> pathlib.Path | None:
  """The init_from workdir, checked to hold a model like config's; None: unset.

  Raises:
    UserError: not a workdir, or its model differs in a MODEL_FIELDS field.
  """
  if not config.init_from:
    return None
  path = pathlib.Path(config.init_from).expanduser()
  theirs = workdir_lib.load_config(path)
  differ = [
    f'{name} {theirs[name]!r} there, {config[name]!r} here'
    for name in MODEL_FIELDS
    if theirs[name] != config[name]
  ]
  if differ:
    raise errors.UserError(
      f'config.init_from {path} holds another model: {"; ".join(differ)}'
    )
  return path


def vocab(path: pathlib.Path) -> vocab_lib.Vocab:
  """The source's vocabulary, which the new run keeps."""
  return vocab_lib.Vocab.load(
    workdir_lib.require_file(path, workdir_lib.VOCAB_FILE)
  )


def check_features(path: pathlib.Path, info: dict[str, Any]) -> None:
  """Raises a UserError unless the source was trained on features as `info`."""
  feature_store.require_same_features(
    files.read_json(workdir_lib.require_file(path, workdir_lib.FEATURES_FILE)),
    info,
    expected_what=f'the model of config.init_from {path}',
    got_what='the training features',
  )


def params(path: pathlib.Path, expected: Any, step: int = 0) -> Any:
  """The source's parameters, checked against `expected`.

  Those of checkpoint `step` (config.init_from_step), or with step 0 of its
  best checkpoint, else its newest.
  """
  checkpoint = checkpoints.resolve(path, step or None)
  logging.info(
    'starting from %s of %s (config.init_from), with a new optimizer',
    checkpoint.describe(),
    path,
  )
  return checkpoints.restore_checkpoint(checkpoint, expected=expected)
