"""Keras InceptionV3 (no top) weights -> `capjax.model.inception` variables.

Two sources hold the same weights in the same order:

- the `.h5` file Keras downloads
  (`inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5`), in Keras 2's
  legacy HDF5 weights layout: the root attribute `layer_names` lists every
  layer of the model in `model.layers` order (input, convs, batch norms,
  activations, pools, concatenations); each name is a group whose attribute
  `weight_names` lists its arrays, stored at `<layer>/<weight name>`
  ('conv2d_1/kernel:0'; for the batch norms beta, moving_mean,
  moving_variance). Keras itself loads it by position, not by name.
- an in-memory Keras model (Keras 3 or tf_keras), whose `model.layers` come
  in that same order (`variables_from_layers` of their weights).

Only the order is used, never the names: Keras numbers layers per process
('conv2d_57' is another layer once some other model was built first), and
the download's names come from whichever Keras wrote it. A Functional model
lists its layers by decreasing depth from the output, ties in creation
order. Each batch norm is one step nearer the output than its conv, so the
94 convs (one kernel each) and the 94 batch norms (three arrays each) come in
one shared order: block by block, and within a block as `_BLOCKS` spells
out.

`converted_params` converts a file once and keeps the result beside it as
`<name>.flax.npz`, so later runs need neither h5py nor TensorFlow.
"""

import os
import pathlib
import tempfile
from typing import Any

from absl import logging
from flax import traverse_util
import jax
import numpy as np

from capjax.model import inception

PathLike = str | os.PathLike[str]

# The stem's conv2d_bn layers, in Keras' order.
_STEM = (
  'conv_1a_3x3',
  'conv_2a_3x3',
  'conv_2b_3x3',
  'conv_3b_1x1',
  'conv_4a_3x3',
)
# Per kind of block, its names in `capjax.model.inception` and the order in
# which Keras lists that block's conv2d_bn layers: deepest branch step first.
_BLOCKS = (
  (
    ('mixed0', 'mixed1', 'mixed2'),
    (
      'branch3x3dbl_1',
      'branch5x5_1',
      'branch3x3dbl_2',
      'branch1x1',
      'branch5x5_2',
      'branch3x3dbl_3',
      'branch_pool',
    ),
  ),
  (
    ('mixed3',),
    ('branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3', 'branch3x3dbl_3'),
  ),
  (
    ('mixed4', 'mixed5', 'mixed6', 'mixed7'),
    (
      'branch7x7dbl_1',
      'branch7x7dbl_2',
      'branch7x7_1',
      'branch7x7dbl_3',
      'branch7x7_2',
      'branch7x7dbl_4',
      'branch1x1',
      'branch7x7_3',
      'branch7x7dbl_5',
      'branch_pool',
    ),
  ),
  (
    ('mixed8',),
    (
      'branch7x7x3_1',
      'branch7x7x3_2',
      'branch3x3_1',
      'branch7x7x3_3',
      'branch3x3_2',
      'branch7x7x3_4',
    ),
  ),
  (
    ('mixed9', 'mixed10'),
    (
      'branch3x3dbl_1',
      'branch3x3_1',
      'branch3x3dbl_2',
      'branch3x3_2a',
      'branch3x3_2b',
      'branch3x3dbl_3a',
      'branch3x3dbl_3b',
      'branch1x1',
      'branch_pool',
    ),
  ),
)
# Paths of the conv2d_bn modules in the order Keras stores their weights.
KERAS_ORDER = tuple(
  [(name,) for name in _STEM]
  + [
    (block, branch)
    for blocks, branches in _BLOCKS
    for block in blocks
    for branch in branches
  ]
)


def cache_path(h5_path: PathLike) -> pathlib.Path:
  """Where `converted_params` keeps the conversion of `h5_path`."""
  return pathlib.Path(h5_path).with_suffix('.flax.npz')


def variables_from_h5(h5_path: PathLike) -> dict[str, Any]:
  """Reads Keras' legacy HDF5 InceptionV3 (no top) weights file.

  Returns:
    {'params', 'batch_stats'} float32 numpy arrays for
    `capjax.model.inception`.

  Raises:
    ValueError: the file is missing, is not a legacy Keras weights file, or
      does not hold InceptionV3 without top; the message names the file.
  """
  if not pathlib.Path(h5_path).is_file():
    raise ValueError(f'{h5_path}: no such InceptionV3 weights file')
  # Only conversion needs h5py; loading the cache does not.
  import h5py  # noqa: PLC0415

  try:
    f = h5py.File(h5_path, 'r')
  except OSError as e:
    raise ValueError(f'{h5_path}: not an HDF5 file ({e})') from None
  with f:
    if 'layer_names' not in f.attrs:
      raise ValueError(
        f"{h5_path}: no 'layer_names' attribute, so not a Keras 2 legacy "
        'HDF5 weights file like the one Keras downloads (Keras 3 '
        "'.weights.h5' files are laid out differently)"
      )
    # Names are str (tf_keras) or fixed-length bytes (older Keras, which
    # wrote the download); h5py looks up either.
    layers = [
      [np.asarray(f[name][weight]) for weight in f[name].attrs['weight_names']]
      for name in f.attrs['layer_names']
    ]
  return variables_from_layers(layers, str(h5_path))


def converted_params(h5_path: PathLike) -> dict[str, Any]:
  """`variables_from_h5`, cached beside the file as `<name>.flax.npz`.

  The cache is used when it is newer than the .h5 file, without importing
  h5py. It is written to a temporary file and renamed, so an interrupted or
  concurrent run never reads half a cache. Where the directory is not
  writable the conversion is returned uncached.

  Raises:
    ValueError: as `variables_from_h5`.
  """
  h5_path, cache = pathlib.Path(h5_path), cache_path(h5_path)
  if (
    h5_path.is_file()
    and cache.is_file()
    and cache.stat().st_mtime > h5_path.stat().st_mtime
  ):
    with np.load(cache) as arrays:
      return traverse_util.unflatten_dict(dict(arrays), sep='/')
  variables = variables_from_h5(h5_path)
  try:
    _save_npz_atomic(cache, traverse_util.flatten_dict(variables, sep='/'))
  except OSError as e:
    logging.warning('could not cache the converted weights in %s: %s', cache, e)
  return variables


def _save_npz_atomic(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  # A unique temporary name, so that two processes converting at once do
  # not write into each other's file.
  with tempfile.NamedTemporaryFile(
    dir=path.parent, suffix='.tmp', delete=False
  ) as f:
    tmp = pathlib.Path(f.name)
    try:
      np.savez(f, **arrays)  # type: ignore[arg-type]
    except BaseException:
      tmp.unlink()
      raise
  tmp.replace(path)


def variables_from_layers(
  layers: list[list[np.ndarray]], source: str
) -> dict[str, Any]:
  """Per Keras layer its weight arrays, in Keras' order -> Flax variables."""
  layers = [weights for weights in layers if weights]
  convs = [weights for weights in layers if len(weights) == 1]
  norms = [weights for weights in layers if len(weights) == 3]
  n = len(KERAS_ORDER)
  if len(convs) != n or len(norms) != n or len(layers) != 2 * n:
    raise ValueError(
      f'{source}: not InceptionV3 without top: expected {n} convolutions '
      f'(1 array each) and {n} batch norms without scale (3 arrays each), '
      f'found {len(convs)} and {len(norms)} among {len(layers)} layers with '
      'weights'
    )
  expected = traverse_util.flatten_dict(
    jax.eval_shape(inception.init_variables, jax.random.key(0))
  )
  flat = {}
  # The k-th batch norm belongs to the k-th conv: Keras keeps their order.
  for k, (path, (kernel,), (beta, mean, var)) in enumerate(
    zip(KERAS_ORDER, convs, norms)
  ):
    arrays = {
      ('params', *path, 'conv', 'kernel'): kernel,
      ('params', *path, 'bn', 'bias'): beta,
      ('batch_stats', *path, 'bn', 'mean'): mean,
      ('batch_stats', *path, 'bn', 'var'): var,
    }
    for key, array in arrays.items():
      if array.shape != expected[key].shape:
        raise ValueError(
          f'{source}: not InceptionV3 without top: conv2d_bn {k} in Keras '
          f'order ({"/".join(key)}) has shape {array.shape}, expected '
          f'{expected[key].shape}'
        )
      flat[key] = np.asarray(array, np.float32)
  return traverse_util.unflatten_dict(flat)
