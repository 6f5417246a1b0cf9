"""Reading the tutorial's variables from a TensorFlow object-based checkpoint.

A checkpoint keys each variable by one path through its object graph, the
shortest: Keras 2 writes `decoder/gru/cell/kernel/.ATTRIBUTES/VARIABLE_VALUE`,
but Keras 3 keys the GRU's and the attention's variables by their place in the
optimizer (`optimizer/_trainable_variables/3/...`), and names others
`_kernel` and `_embeddings`. The object graph, which every
`tf.train.Checkpoint` holds, has all the paths, so variables are found by
their layer names (`decoder/gru/cell/kernel`), whatever their keys; no
TensorFlow model is rebuilt.
"""

from collections.abc import Sequence

import numpy as np

from capjax import errors
from capjax.porting import tutorial_weights

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
  from tensorflow.core.protobuf import trackable_object_graph_pb2  # noqa: PLC0415

  graph = trackable_object_graph_pb2.TrackableObjectGraph()
  graph.ParseFromString(object_graph)
  keys: dict[str, str] = {}
  pending: list[tuple[int, tuple[str, ...]]] = [
    (0, ())
  ]  # node 0 is the root, the tf.train.Checkpoint
  while pending:
    node_id, path = pending.pop()
    node = graph.nodes[node_id]
    for attribute in node.attributes:
      if attribute.name == 'VARIABLE_VALUE' and path:
        keys[_tutorial_name(path)] = attribute.checkpoint_key
    if len(path) < _MAX_DEPTH:
      pending.extend(
        (child.node_id, path + (child.local_name,)) for child in node.children
      )
  return keys


def _checkpoint_prefix(path: str) -> str:
  """The prefix of the checkpoint at `path`: a directory's latest, or `path`."""
  import tensorflow as tf  # noqa: PLC0415

  if tf.io.gfile.isdir(path):
    prefix = tf.train.latest_checkpoint(path)
    if prefix is None:
      raise errors.UserError(
        f'{path} holds no TensorFlow checkpoint (no '
        '"checkpoint" file naming the latest one)'
      )
    return prefix
  if not tf.io.gfile.exists(f'{path}.index'):
    raise errors.UserError(
      f'no TensorFlow checkpoint at {path}: name the directory the tutorial '
      'saved its checkpoints to, or one checkpoint by its prefix (e.g. '
      'checkpoints/train/ckpt-5, without .index)'
    )
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
    errors.UserError: no readable object-based checkpoint at `path`.
  """
  import tensorflow as tf  # noqa: PLC0415

  prefix = _checkpoint_prefix(path)
  try:
    reader = tf.train.load_checkpoint(prefix)
    if not reader.has_tensor(_OBJECT_GRAPH):
      raise errors.UserError(
        f'{prefix} was written by a name-based tf.compat.v1 Saver, not by '
        "the tutorial's tf.train.Checkpoint"
      )
    keys = _variable_keys(reader.get_tensor(_OBJECT_GRAPH))
    weights = {
      name: reader.get_tensor(key)
      for name, key in keys.items()
      if name in tutorial_weights.TUTORIAL_WEIGHT_NAMES
    }
    step = next(
      (
        int(reader.get_tensor(keys[name]))
        for name in _ITERATIONS
        if name in keys
      ),
      0,
    )
  except tf.errors.OpError as e:
    raise errors.UserError(
      f'cannot read the checkpoint {prefix}: {e.message}'
    ) from None
  return weights, step
