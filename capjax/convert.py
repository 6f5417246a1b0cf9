r"""Models trained with the TensorFlow tutorial, as capjax models.

`python -m capjax.convert` turns a `tf.train.Checkpoint` of the tutorial's
model and the tutorial's tokenizer into a complete capjax workdir, which
`capjax.sample`, `capjax.evaluate` and `capjax.serve` use as it is:

  python -m capjax.convert --tf_checkpoint ./checkpoints/train \
      --tokenizer tokenizer.json --workdir ~/capjax/runs/tutorial
  python -m capjax.sample --workdir ~/capjax/runs/tutorial photo.jpg

--tf_checkpoint is the tutorial's `tf.train.CheckpointManager` directory (its
latest checkpoint is taken) or one checkpoint's prefix (`.../ckpt-5`). The
checkpoint is the tutorial's
`tf.train.Checkpoint(encoder=encoder, decoder=decoder, optimizer=optimizer)`
(the optimizer is optional), saved by TF 2.x with Keras 2 or Keras 3. The
converted checkpoint's step is the optimizer's iteration count (0 without).

--config (default capjax/configs/default.py, e.g. experiments/coco_inception.py
for evaluation on COCO) supplies what the checkpoint does not say: the data
set, caption length, training settings. The checkpoint fixes the model:
embedding_dim (E), units (U) and top_k from the weights, carry_gru_state=False
(the tutorial's decoder gave its GRU no previous state) and
extractor='inception_v3' (L = 64 positions of D features, D from the encoder).

## Weights

The tutorial's model is a `CNN_Encoder` (`fc`) and an `RNN_Decoder`
(`embedding`, `gru`, `fc1`, `fc2`, `attention` with `W1`, `W2`, `V`). Its
weights come here as a flat mapping from '/'-joined names to arrays, in Keras'
layouts:

  encoder/fc/{kernel,bias}
  decoder/embedding/embeddings                     (V, E)
  decoder/gru/kernel                               (2E, 3U), input [context; token]
  decoder/gru/recurrent_kernel                     (U, 3U)
  decoder/gru/bias                                 (2, 3U), reset_after=True
  decoder/fc1/{kernel,bias}, decoder/fc2/{kernel,bias}
  decoder/attention/{W1,W2,V}/{kernel,bias}

Keras orders GRU gate columns (z, r, h), as capjax does, and concatenates the
context before the token embedding, so the kernel's first E rows act on the
context.

A checkpoint keys each variable by one path through its object graph, the
shortest: Keras 2 writes `decoder/gru/cell/kernel/.ATTRIBUTES/VARIABLE_VALUE`,
but Keras 3 keys the GRU's and the attention's variables by their place in the
optimizer (`optimizer/_trainable_variables/3/...`), and names others
`_kernel` and `_embeddings`. The object graph, which every
`tf.train.Checkpoint` holds, has all the paths, so variables are found by
their layer names (`decoder/gru/cell/kernel`), whatever their keys; no
TensorFlow model is rebuilt.

## Vocabulary

The tokenizer is the JSON of the tutorial's Keras `Tokenizer`
(`tokenizer.to_json()`) or a plain {word: id} JSON object. The tutorial's ids
are <pad>=0, its oov_token <unk>=1, then the words by frequency, <start> and
<end> among them. capjax's decoders and `Vocab` fix <pad>, <start>, <end>,
<unk> = 0, 1, 2, 3, so the ids are renumbered: the specials first, then the
other words in the tutorial's order. Permuting the embedding's rows and fc2's
columns alike changes no computation.

The tutorial's `Tokenizer(num_words=top_k)` turns every id >= num_words into
<unk>, so its model never saw those ids, as inputs or as targets, though its
embedding has top_k + 1 rows. The converted vocabulary keeps the words with
ids below num_words and below the number of embedding rows (a plain
{word: id} map has no num_words: below the number of rows); the rows and fc2
columns of the other ids are dropped. capjax then encodes those words as
<unk>, as the tutorial's tokenizer did, and never emits them (the tutorial's
training only ever pushed their logits down). config.top_k is the number of
words kept besides the four special tokens.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import functools
import json
import os
import pathlib

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import orbax.checkpoint as ocp

from capjax import models
from capjax import reporting
from capjax import train
from capjax import vocab as vocab_lib
from capjax import workdir as workdir_lib

_DENSE_LAYERS = {
    # capjax path: tutorial name
    ('encoder', 'fc'): 'encoder/fc',
    ('attention', 'W1'): 'decoder/attention/W1',
    ('attention', 'W2'): 'decoder/attention/W2',
    ('attention', 'V'): 'decoder/attention/V',
    ('fc1',): 'decoder/fc1',
    ('fc2',): 'decoder/fc2',
}

TUTORIAL_WEIGHT_NAMES = tuple(sorted(
    [f'{name}/{part}' for name in _DENSE_LAYERS.values()
     for part in ('kernel', 'bias')]
    + ['decoder/embedding/embeddings', 'decoder/gru/kernel',
       'decoder/gru/recurrent_kernel', 'decoder/gru/bias']))


def _nest(path: tuple[str, ...], value, tree: dict) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def params_from_tutorial(weights: Mapping[str, np.ndarray]) -> dict:
  """capjax `params` from the tutorial model's weights (see module docstring).

  Raises:
    ValueError: naming every missing weight, or on a GRU that is not
      reset_after=True or whose input is not [context; token].
  """
  missing = [name for name in TUTORIAL_WEIGHT_NAMES if name not in weights]
  if missing:
    raise ValueError('not the tutorial model: missing weights '
                     + ', '.join(missing))
  w = {name: np.asarray(weights[name], np.float32)
       for name in TUTORIAL_WEIGHT_NAMES}
  params: dict = {}
  for path, name in _DENSE_LAYERS.items():
    _nest(path + ('kernel',), w[f'{name}/kernel'], params)
    # V's bias shifts every attention score alike, which softmax undoes:
    # capjax has no such parameter.
    if name != 'decoder/attention/V':
      _nest(path + ('bias',), w[f'{name}/bias'], params)
  embeddings = w['decoder/embedding/embeddings']
  _nest(('embedding', 'embedding'), embeddings, params)

  kernel = w['decoder/gru/kernel']
  bias = w['decoder/gru/bias']
  embedding_dim = embeddings.shape[1]
  if bias.shape[0] != 2:
    raise ValueError(f'decoder/gru/bias has shape {bias.shape}; expected '
                     '(2, 3U) from a GRU with reset_after=True')
  if kernel.shape[0] != 2 * embedding_dim:
    raise ValueError(f'decoder/gru/kernel has {kernel.shape[0]} input rows; '
                     f'expected context + embedding = {2 * embedding_dim}')
  _nest(('gru',), {
      'context_kernel': kernel[:embedding_dim],
      'token_kernel': kernel[embedding_dim:],
      'input_bias': bias[0],
      'recurrent_kernel': w['decoder/gru/recurrent_kernel'],
      'recurrent_bias': bias[1],
  }, params)
  return params


# --- Checkpoints --------------------------------------------------------------

# The GRU layer keeps its weights in its cell.
_GRU_CELL, _GRU = 'decoder/gru/cell/', 'decoder/gru/'
# The optimizer's step count: Keras 2's OptimizerV2 (TF <= 2.10) names it
# `iter`, later optimizers `_iterations`.
_ITERATIONS = ('optimizer/iter', 'optimizer/iterations')
# The deepest tutorial variable is decoder/attention/W1/kernel; the limit
# also keeps the walk finite on object graphs with cycles.
_MAX_DEPTH = 4
_OBJECT_GRAPH = '_CHECKPOINTABLE_OBJECT_GRAPH'


def _tutorial_name(path: Sequence[str]) -> str:
  """An object path as a tutorial name, e.g. decoder/gru/cell/_kernel ->
  decoder/gru/kernel."""
  # Keras 3 keeps Dense's kernel and Embedding's table in `_kernel` and
  # `_embeddings`, behind properties.
  name = '/'.join([*path[:-1], path[-1].lstrip('_')])
  return name.replace(_GRU_CELL, _GRU, 1)


def _variable_keys(object_graph: bytes) -> dict[str, str]:
  """Tutorial name -> checkpoint key of every variable, by every object path."""
  # TensorFlow is imported where it is used: the model code that imports
  # this module for `params_from_tutorial` must not load it.
  from tensorflow.core.protobuf import trackable_object_graph_pb2  # pylint: disable=g-import-not-at-top
  graph = trackable_object_graph_pb2.TrackableObjectGraph()
  graph.ParseFromString(object_graph)
  keys = {}
  pending = [(0, ())]  # node 0 is the root, the tf.train.Checkpoint
  while pending:
    node_id, path = pending.pop()
    node = graph.nodes[node_id]
    for attribute in node.attributes:
      if attribute.name == 'VARIABLE_VALUE' and path:
        keys[_tutorial_name(path)] = attribute.checkpoint_key
    if len(path) < _MAX_DEPTH:
      pending.extend((child.node_id, path + (child.local_name,))
                     for child in node.children)
  return keys


def _checkpoint_prefix(path: str) -> str:
  """The prefix of the checkpoint at `path`: a directory's latest, or `path`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if tf.io.gfile.isdir(path):
    prefix = tf.train.latest_checkpoint(path)
    if prefix is None:
      raise ValueError(f'{path} holds no TensorFlow checkpoint (no '
                       '"checkpoint" file naming the latest one)')
    return prefix
  if not tf.io.gfile.exists(f'{path}.index'):
    raise ValueError(
        f'no TensorFlow checkpoint at {path}: name the directory the tutorial '
        'saved its checkpoints to, or one checkpoint by its prefix (e.g. '
        'checkpoints/train/ckpt-5, without .index)')
  return path


def read_tutorial_checkpoint(path: str) -> tuple[dict[str, np.ndarray], int]:
  """Variables of a `tf.train.Checkpoint` by tutorial name, and its step.

  Args:
    path: a checkpoint directory (its latest checkpoint is read) or prefix.

  Returns:
    Every variable found under a tutorial weight name (see module docstring;
    others are left out, `params_from_tutorial` names what is missing), and
    the optimizer's iteration count (0 when the checkpoint has no optimizer).

  Raises:
    ValueError: no readable object-based checkpoint at `path`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  prefix = _checkpoint_prefix(path)
  try:
    reader = tf.train.load_checkpoint(prefix)
    if not reader.has_tensor(_OBJECT_GRAPH):
      raise ValueError(
          f'{prefix} was written by a name-based tf.compat.v1 Saver, not by '
          "the tutorial's tf.train.Checkpoint")
    keys = _variable_keys(reader.get_tensor(_OBJECT_GRAPH))
    weights = {name: reader.get_tensor(key) for name, key in keys.items()
               if name in TUTORIAL_WEIGHT_NAMES}
    step = next((int(reader.get_tensor(keys[name])) for name in _ITERATIONS
                 if name in keys), 0)
  except tf.errors.OpError as e:
    raise ValueError(f'cannot read the checkpoint {prefix}: {e.message}'
                     ) from None
  return weights, step


# --- Vocabulary ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TutorialTokenizer:
  """The ids the tutorial's model was trained on.

  Attributes:
    word_index: word -> id.
    num_words: the Keras Tokenizer's num_words: it turned larger ids into
      `oov_token`. None keeps every id that has an embedding row.
    oov_token: the out-of-vocabulary word, capjax's <unk>.
  """
  word_index: dict[str, int]
  num_words: int | None = None
  oov_token: str = vocab_lib.UNK


def load_tokenizer(path: str | os.PathLike[str]) -> TutorialTokenizer:
  """Reads a Keras Tokenizer's JSON (`tokenizer.to_json()`) or a {word: id} map.

  Raises:
    OSError: the file cannot be read.
    ValueError: the file is neither.
  """
  try:
    data = json.loads(pathlib.Path(path).read_text(encoding='utf-8'))
    if isinstance(data, dict) and data.get('class_name') == 'Tokenizer':
      config = data.get('config', {})
      word_index = config.get('word_index')
      # to_json() stores its dictionaries as JSON strings inside the JSON.
      if isinstance(word_index, str):
        word_index = json.loads(word_index)
      tokenizer = TutorialTokenizer(word_index, config.get('num_words'),
                                    config.get('oov_token') or vocab_lib.UNK)
    else:
      tokenizer = TutorialTokenizer(data)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not a JSON file: {e}') from None
  if not (isinstance(tokenizer.word_index, dict) and all(
      isinstance(i, int) and not isinstance(i, bool) and i >= 0
      for i in tokenizer.word_index.values())):
    raise ValueError(
        f"{path} is neither a Keras Tokenizer's JSON (tokenizer.to_json()) "
        'nor a JSON object mapping words to ids >= 0')
  return tokenizer


def vocabulary(tokenizer: TutorialTokenizer,
               num_rows: int) -> tuple[vocab_lib.Vocab, np.ndarray]:
  """capjax's vocabulary of a tutorial model (see module docstring).

  Args:
    tokenizer: the ids the model was trained on.
    num_rows: the model's embedding rows (its vocab_size).

  Returns:
    The vocabulary and, for each of its ids, the tutorial's id (int64).

  Raises:
    ValueError: the tokenizer cannot be the model's: a special token is
      missing or has no row, two words share an id, or it gave ids the
      embedding has no rows for.
  """
  word_index = dict(tokenizer.word_index)
  # The tutorial adds <pad> after fitting: a tokenizer saved before lacks it.
  if word_index.setdefault(vocab_lib.PAD, 0) != 0:
    raise ValueError(f'the tokenizer gives {vocab_lib.PAD!r} the id '
                     f"{word_index[vocab_lib.PAD]}; the tutorial's is 0")
  by_id = {}
  for word, i in word_index.items():
    if i in by_id:
      raise ValueError(f'the tokenizer gives {by_id[i]!r} and {word!r} the '
                       f'same id {i}')
    by_id[i] = word
  num_words = num_rows if tokenizer.num_words is None else tokenizer.num_words
  rowless = sorted(i for i in by_id if num_rows <= i < num_words)
  if rowless:
    raise ValueError(
        f'the tokenizer (num_words={num_words}) gives words such as '
        f'{by_id[rowless[0]]!r} the id {rowless[0]}, but the checkpoint\'s '
        f'embedding has only {num_rows} rows: is it the tokenizer this '
        'model was trained with?')
  specials = (vocab_lib.PAD, vocab_lib.START, vocab_lib.END,
              tokenizer.oov_token)
  for word in specials:
    if word not in word_index:
      raise ValueError(f'the tokenizer has no {word!r}: the tutorial\'s '
                       f'holds {vocab_lib.START!r}, {vocab_lib.END!r} and its '
                       f'oov_token {vocab_lib.UNK!r}')
    if word_index[word] >= num_words:
      raise ValueError(f'the tokenizer\'s {word!r} has id {word_index[word]}, '
                       f'which the model never saw (num_words={num_words})')
  words = [word for i, word in sorted(by_id.items())
           if i < num_words and word not in specials]
  tutorial_ids = [word_index[word] for word in (*specials, *words)]
  return vocab_lib.Vocab(words), np.array(tutorial_ids, np.int64)


def select_tokens(params: dict, tutorial_ids: np.ndarray) -> dict:
  """`params` whose token axes hold the given tutorial ids, in that order.

  The token axes are the embedding's rows and fc2's columns: capjax id k
  gets the row and column of tutorial id `tutorial_ids[k]`.
  """
  embedding, fc2 = params['embedding']['embedding'], params['fc2']
  return {
      **params,
      'embedding': {'embedding': embedding[tutorial_ids]},
      'fc2': {'kernel': fc2['kernel'][:, tutorial_ids],
              'bias': fc2['bias'][tutorial_ids]},
  }


# --- The workdir --------------------------------------------------------------

# InceptionV3's 8x8 grid: the tutorial's features, (64, 2048).
_INCEPTION_LOCATIONS = 64


def tutorial_config(config: ml_collections.ConfigDict, params: dict,
                    vocab: vocab_lib.Vocab) -> ml_collections.ConfigDict:
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
  shapes = lambda tree: {jax.tree_util.keystr(path): np.shape(x) for path, x
                         in jax.tree_util.tree_leaves_with_path(tree)}
  got = shapes(params)
  wrong = [f'{name} {got.get(name)} (expected {shape})'
           for name, shape in shapes(expected).items()
           if got.get(name) != shape]
  if wrong:
    raise ValueError(f"{source}: the weights' shapes do not fit together: "
                     + '; '.join(wrong))


def convert(tf_checkpoint: str, tokenizer: str | os.PathLike[str],
            workdir: str | os.PathLike[str],
            config: ml_collections.ConfigDict) -> None:
  """Writes a capjax workdir holding the tutorial's trained model.

  Everything is read and checked before anything is written; the checkpoint
  comes last, so a workdir with a checkpoint is complete.

  Args:
    tf_checkpoint: the tutorial's checkpoint directory or prefix.
    tokenizer: its tokenizer's JSON (see `load_tokenizer`).
    workdir: the capjax workdir to write.
    config: the fields the checkpoint does not fix (see module docstring).

  Raises:
    ValueError: the workdir already holds a checkpoint, or the checkpoint or
      the tokenizer is not the tutorial's.
    OSError: the tokenizer file cannot be read.
  """
  workdir = pathlib.Path(workdir)
  checkpoints = workdir / workdir_lib.CHECKPOINT_DIR
  if checkpoints.is_dir() and any(checkpoints.iterdir()):
    raise ValueError(f'{workdir} already holds a checkpoint: convert into a '
                     'new --workdir')
  weights, step = read_tutorial_checkpoint(tf_checkpoint)
  try:
    params = params_from_tutorial(weights)
  except ValueError as e:
    raise ValueError(
        f"{tf_checkpoint}: {e} (the tutorial saves tf.train.Checkpoint("
        'encoder=CNN_Encoder, decoder=RNN_Decoder, optimizer=...))') from None
  tutorial_tokenizer = load_tokenizer(tokenizer)
  try:
    vocab, tutorial_ids = vocabulary(
        tutorial_tokenizer, num_rows=params['embedding']['embedding'].shape[0])
  except ValueError as e:
    raise ValueError(f'{tokenizer}: {e}') from None
  params = select_tokens(params, tutorial_ids)
  config = tutorial_config(config, params, vocab)
  feature_dim = int(params['encoder']['fc']['kernel'].shape[0])

  # Compiled as one program: op by op, initialisation takes seconds longer.
  state = jax.jit(functools.partial(
      train.create_train_state, models.from_config(config, vocab.size),
      train.make_optimizer(config), (_INCEPTION_LOCATIONS, feature_dim),
      config.seed))()
  _check_shapes(state.params, params, tf_checkpoint)
  # Adam's moments start at zero whatever the parameters: the fresh state's
  # optimizer state is that of the converted parameters.
  state = state.replace(step=jnp.asarray(step, jnp.int32),
                        params=jax.tree_util.tree_map(jnp.asarray, params))

  workdir.mkdir(parents=True, exist_ok=True)
  workdir_lib.save_config(workdir, config)
  vocab.save(workdir / workdir_lib.VOCAB_FILE)
  # As capjax.train describes its features; the extractor's description is
  # capjax.features.inception_v3_extractor(weights).info, written without
  # building the network.
  workdir_lib.save_json(workdir / workdir_lib.FEATURES_FILE, {
      'extractor': {'name': 'inception_v3',
                    'weights': config.extractor_weights},
      'num_locations': _INCEPTION_LOCATIONS,
      'feature_dim': feature_dim,
  })
  manager = workdir_lib.checkpoint_manager(workdir)
  manager.save(step, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  manager.close()
  logging.info('converted %s (step %d): %d tokens, E=%d, U=%d, D=%d',
               tf_checkpoint, step, vocab.size, config.embedding_dim,
               config.units, feature_dim)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  reporting.concise_console_logging()
  try:
    convert(_TF_CHECKPOINT.value, _TOKENIZER.value, _WORKDIR.value,
            _CONFIG.value)
  # OSError: a tokenizer file that is missing or unreadable.
  except (OSError, ValueError) as e:
    logging.error('%s', e)
    raise SystemExit(1) from None
  logging.info('wrote %s; caption images with\n  python -m capjax.sample '
               '--workdir %s IMAGE', _WORKDIR.value, _WORKDIR.value)


if __name__ == '__main__':
  # Flags exist only when run as a program, so that importing the library
  # never clashes with the flags of the program that imports it.
  _TF_CHECKPOINT = flags.DEFINE_string(
      'tf_checkpoint', None, "The tutorial's checkpoint directory (its latest "
      'checkpoint is converted) or one checkpoint prefix.', required=True)
  _TOKENIZER = flags.DEFINE_string(
      'tokenizer', None, "The tutorial's tokenizer: tokenizer.to_json(), or a "
      '{word: id} JSON object.', required=True)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'The capjax workdir to '
                                 'write.', required=True)
  _CONFIG = config_flags.DEFINE_config_file(
      'config', str(pathlib.Path(__file__).parent / 'configs' / 'default.py'),
      'Config of the fields the checkpoint does not fix (data set, caption '
      'length, training).', lock_config=True)
  app.run(main)
