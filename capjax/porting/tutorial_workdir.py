"""A capjax workdir holding a model trained with the TensorFlow tutorial.

  porting.tutorial_workdir.convert(tf_checkpoint, tokenizer, workdir, config)

The checkpoint fixes the model: embedding_dim (E), units (U) and top_k from
the weights, carry_gru_state=False (the tutorial's decoder gave its GRU no
previous state) and extractor='inception_v3' (L = 64 positions of D features,
D from the encoder). `config` supplies what the checkpoint does not say: the
data set, caption length, training settings. The converted checkpoint's step
is the optimizer's iteration count (0 without).
"""

import functools
import os
import pathlib

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from capjax import errors
from capjax import workdir as workdir_lib
from capjax.data import vocab as vocab_lib
from capjax.model import captioner
from capjax.porting import tf_checkpoint as tf_checkpoint_lib
from capjax.porting import tutorial_vocab
from capjax.porting import tutorial_weights
from capjax.training import checkpoints
from capjax.training import state as state_lib

# InceptionV3's 8x8 grid: the tutorial's features, (64, 2048).
_INCEPTION_LOCATIONS = 64


def tutorial_config(
  config: ml_collections.ConfigDict, params: dict, vocab: vocab_lib.Vocab
) -> ml_collections.ConfigDict:
  """`config` with the model fields of the tutorial's (converted) model."""
  config = config.copy_and_resolve_references()
  config.extractor = 'inception_v3'
  config.embedding_dim = int(params['embedding']['embedding'].shape[1])
  config.units = int(params['fc1']['kernel'].shape[1])
  config.top_k = vocab.size - len(vocab_lib.SPECIAL_TOKENS)
  config.carry_gru_state = False
  return config


def _check_shapes(expected: dict, params: dict, source: str) -> None:
  """Raises unless `params` has the shapes of `expected` (capjax's own)."""
  shapes = lambda tree: {
    jax.tree_util.keystr(path): np.shape(x)
    for path, x in jax.tree_util.tree_leaves_with_path(tree)
  }
  got = shapes(params)
  wrong = [
    f'{name} {got.get(name)} (expected {shape})'
    for name, shape in shapes(expected).items()
    if got.get(name) != shape
  ]
  if wrong:
    raise errors.UserError(
      f"{source}: the weights' shapes do not fit together: " + '; '.join(wrong)
    )


def convert(
  tf_checkpoint: str,
  tokenizer: str | os.PathLike[str],
  workdir: str | os.PathLike[str],
  config: ml_collections.ConfigDict,
) -> None:
  """Writes a capjax workdir holding the tutorial's trained model.

  Everything is read and checked before anything is written; the checkpoint
  comes last, so a workdir with a checkpoint is complete.

  Args:
    tf_checkpoint: the tutorial's checkpoint directory or prefix.
    tokenizer: its tokenizer's JSON (see `tutorial_vocab.load_tokenizer`).
    workdir: the capjax workdir to write.
    config: the fields the checkpoint does not fix (see module docstring).

  Raises:
    errors.UserError: the workdir already holds a checkpoint, or the checkpoint
      the tokenizer is not the tutorial's.
    OSError: the tokenizer file cannot be read.
  """
  workdir = pathlib.Path(workdir)
  checkpoint_dir = workdir / workdir_lib.CHECKPOINT_DIR
  if checkpoint_dir.is_dir() and any(checkpoint_dir.iterdir()):
    raise errors.UserError(
      f'{workdir} already holds a checkpoint: convert into a new --workdir'
    )
  weights, step = tf_checkpoint_lib.read_tutorial_checkpoint(tf_checkpoint)
  try:
    params = tutorial_weights.params_from_tutorial(weights)
  except errors.UserError as e:
    raise errors.UserError(
      f'{tf_checkpoint}: {e} (the tutorial saves tf.train.Checkpoint('
      'encoder=CNN_Encoder, decoder=RNN_Decoder, optimizer=...))'
    ) from None
  tutorial_tokenizer = tutorial_vocab.load_tokenizer(tokenizer)
  try:
    vocab, tutorial_ids = tutorial_vocab.vocabulary(
      tutorial_tokenizer, num_rows=params['embedding']['embedding'].shape[0]
    )
  except errors.UserError as e:
    raise errors.UserError(f'{tokenizer}: {e}') from None
  params = tutorial_weights.select_tokens(params, tutorial_ids)
  config = tutorial_config(config, params, vocab)
  feature_dim = int(params['encoder']['fc']['kernel'].shape[0])

  # Compiled as one program: op by op, initialisation takes seconds longer.
  state = jax.jit(
    functools.partial(
      state_lib.create_train_state,
      captioner.from_config(config, vocab.size),
      state_lib.make_optimizer(config),
      (_INCEPTION_LOCATIONS, feature_dim),
      config.seed,
    )
  )()
  _check_shapes(state.params, params, tf_checkpoint)
  # Adam's moments start at zero whatever the parameters: the fresh state's
  # optimizer state is that of the converted parameters.
  state = state.replace(
    step=jnp.asarray(step, jnp.int32),
    params=jax.tree_util.tree_map(jnp.asarray, params),
  )

  workdir.mkdir(parents=True, exist_ok=True)
  workdir_lib.save_config(workdir, config)
  vocab.save(workdir / workdir_lib.VOCAB_FILE)
  # As capjax.train describes its features; the extractor's description is
  # capjax.data.extractors.inception_v3_extractor(weights).info less its
  # backend (which does not change the features), written without
  # building the network.
  workdir_lib.save_json(
    workdir / workdir_lib.FEATURES_FILE,
    {
      'extractor': {
        'name': 'inception_v3',
        'weights': config.extractor_weights,
      },
      'num_locations': _INCEPTION_LOCATIONS,
      'feature_dim': feature_dim,
    },
  )
  manager = checkpoints.manager(workdir)
  manager.save(step, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  manager.close()
  logging.info(
    'converted %s (step %d): %d tokens, E=%d, U=%d, D=%d',
    tf_checkpoint,
    step,
    vocab.size,
    config.embedding_dim,
    config.units,
    feature_dim,
  )
