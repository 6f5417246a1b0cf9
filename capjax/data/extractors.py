"""Feature extractors: an image -> a grid of L feature vectors of size D.

- 'inception_v3': InceptionV3 without its classifier, as in the tutorial:
  the image resized to 299x299 (bilinear), scaled to [-1, 1], and the last
  8x8x2048 activations flattened to (64, 2048). Two backends compute it:
  Keras (TensorFlow), and capjax.model.inception in JAX on Keras' weights,
  which equals Keras to about 1e-6 of the features' scale. Their stores are
  interchangeable: the backend is recorded, but not compared.
- 'patches': no weights; the image resized to (patch_grid * PATCH_SIZE) pixels
  square and cut into patch_grid**2 cells, each a flattened RGB patch scaled
  to [-1, 1] followed by a one-hot code of the cell's position, so
  D = 3 * PATCH_SIZE**2 + patch_grid**2. Made for the `shapes` data.
"""

from collections.abc import Callable, Sequence
import dataclasses
import os
import pathlib
from typing import Any

import numpy as np

from capjax import config_checks
from capjax import errors
from capjax.data import images

# Side in pixels of each 'patches' cell.
PATCH_SIZE = 16

_INCEPTION_SIZE = 299
_INCEPTION_FILE = 'inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5'
_INCEPTION_URL = (
  'https://storage.googleapis.com/tensorflow/'
  f'keras-applications/inception_v3/{_INCEPTION_FILE}'
)
_INCEPTION_MD5 = 'bcbd6486424b2319ff4ef7d526e38f63'


@dataclasses.dataclass(frozen=True)
class Extractor:
  """An image -> (L, D) feature grid function and its stored description.

  Attributes:
    info: JSON-serialisable name and settings, kept in the feature store and
      the workdir so features for new images are made the same way.
    image_size: images are resized to (image_size, image_size) first.
    num_locations: L, the number of grid cells.
    feature_dim: D, the size of each cell's feature vector.
    features_fn: images_NSS3 float32 in [0, 255] -> features_NLD float32.
    resize_fn: (image_HW3, S) -> (S, S, 3) float32: the tutorial's resize,
      by NumPy, which keeps TensorFlow out, or by TensorFlow (equal).
  """

  info: dict[str, Any]
  image_size: int
  num_locations: int
  feature_dim: int
  features_fn: Callable[[np.ndarray], np.ndarray]
  resize_fn: Callable[[np.ndarray, int], np.ndarray] = images.resize_bilinear

  def prepare(self, image_HW3: np.ndarray) -> np.ndarray:
    """A decoded image -> the extractor's input, (S, S, 3) float32."""
    return self.resize_fn(image_HW3, self.image_size)

  def __call__(self, images_HW3: Sequence[np.ndarray]) -> np.ndarray:
    """Decoded uint8 images of any sizes -> features_NLD float32."""
    return self.features_fn(np.stack([self.prepare(i) for i in images_HW3]))

  def describe(self) -> dict[str, Any]:
    """What a model trained on this extractor's features depends on."""
    return {
      'extractor': self.info,
      'num_locations': self.num_locations,
      'feature_dim': self.feature_dim,
    }


def make_extractor(config) -> Extractor:
  """The extractor named by config.extractor."""
  if config.extractor == 'inception_v3':
    return inception_v3_extractor(
      config.extractor_weights, config.extractor_backend
    )
  return patches_extractor(config.patch_grid)


def config_extractor_info(config) -> dict[str, Any]:
  """The settings of config.extractor that decide its features' meaning.

  InceptionV3's weights are left out: 'imagenet' and the path of the same
  file make the same features.
  """
  info = {'name': config.extractor}
  if config.extractor == 'patches':
    info['patch_grid'] = config.patch_grid
  return info


def patches_extractor(patch_grid: int) -> Extractor:
  """patch_grid**2 flattened pixel patches per image, scaled to [-1, 1].

  Each cell ends with a one-hot code of its position: attention pools cells
  into one context vector, so without it the decoder could not tell where an
  object is ("left of", "above"). CNN grids carry position in their
  receptive fields; raw patches do not.
  """
  if patch_grid < 1:
    raise errors.UserError(f'patch_grid must be >= 1, got {patch_grid}')
  p, cells = PATCH_SIZE, patch_grid**2

  def features_fn(images_NSS3):
    n = images_NSS3.shape[0]
    grid = images_NSS3.reshape(n, patch_grid, p, patch_grid, p, 3)
    grid = grid.transpose(0, 1, 3, 2, 4, 5)  # cells in row-major order
    pixels = grid.reshape(n, cells, p * p * 3) / 127.5 - 1.0
    positions = np.broadcast_to(
      np.eye(cells, dtype=pixels.dtype), (n, cells, cells)
    )
    return np.concatenate([pixels, positions], axis=-1)

  return Extractor(
    info={
      'name': 'patches',
      'patch_grid': patch_grid,
      'patch_size': p,
      'positions': 'one_hot',
    },
    image_size=patch_grid * p,
    num_locations=cells,
    feature_dim=p * p * 3 + cells,
    features_fn=features_fn,
  )


def inception_weights_path() -> str:
  """The Keras InceptionV3 (no top) ImageNet weights file, downloading it once.

  Raises:
    UserError: the file is neither cached nor downloadable; the message says
      which file to put where.
  """
  cache_dir = pathlib.Path(
    os.environ.get('KERAS_HOME', '~/.keras')
  ).expanduser()
  path = cache_dir / 'models' / _INCEPTION_FILE
  if path.is_file():
    return str(path)
  # Keras (and so TensorFlow) only to download: the JAX backend reads the
  # cached file without it.
  import keras  # noqa: PLC0415

  try:
    return keras.utils.get_file(
      _INCEPTION_FILE,
      _INCEPTION_URL,
      cache_subdir='models',
      cache_dir=str(cache_dir),
      file_hash=_INCEPTION_MD5,
    )
  # Keras reports download failures as a bare Exception.
  except Exception as e:  # noqa: BLE001
    raise errors.UserError(
      f'the InceptionV3 ImageNet weights are not in {path} and could not '
      f'be downloaded ({e}). Download {_INCEPTION_URL} and put it at '
      f'{path}, or set config.extractor_weights to the path of that file.'
    ) from None


def _weights_file(weights: str) -> str | None:
  """The InceptionV3 weights file that `weights` names; None for 'none'."""
  if weights == 'imagenet':
    return inception_weights_path()
  if weights == 'none':
    return None
  # Checked again here: a trained workdir's config is not checked for files.
  config_checks.check_extractor_weights(weights)
  return weights


def resolve_backend(backend: str) -> str:
  """'jax' or 'keras'; 'auto' is JAX on an accelerator, Keras on a CPU.

  On a 2-core CPU, Keras (oneDNN) ran InceptionV3 about twice as fast as
  XLA; TensorFlow never sees the accelerators JAX uses.
  """
  if backend == 'auto':
    import jax  # noqa: PLC0415

    return 'keras' if jax.default_backend() == 'cpu' else 'jax'
  return backend


def inception_v3_extractor(
  weights: str = 'imagenet', backend: str = 'auto'
) -> Extractor:
  """InceptionV3 features, 8x8x2048 -> (64, 2048).

  Args:
    weights: 'imagenet' (cached in ~/.keras/models or downloaded), 'none'
      (random weights, for tests and benchmarks) or the path of an .h5 file.
    backend: 'jax', 'keras' or 'auto' (see `resolve_backend`).
  """
  backend = resolve_backend(backend)
  weights_file = _weights_file(weights)
  make = _jax_inception if backend == 'jax' else _keras_inception
  features_fn, num_locations, feature_dim = make(weights_file)
  # Keras resizes with TensorFlow's own op, as the tutorial; the JAX backend
  # never imports TensorFlow, so that sample, evaluate and serve run where
  # only JAX is installed, and start without TensorFlow's seconds.
  resize_fn = images.resize_bilinear if backend == 'jax' else images.resize
  return Extractor(
    info={'name': 'inception_v3', 'weights': weights, 'backend': backend},
    image_size=_INCEPTION_SIZE,
    num_locations=num_locations,
    feature_dim=feature_dim,
    features_fn=features_fn,
    resize_fn=resize_fn,
  )


def _jax_inception(weights_file: str | None):
  """(features_fn, L, D) of capjax.model.inception."""
  # Imported here: the Keras backend needs neither JAX nor Flax.
  from capjax.model import inception  # noqa: PLC0415
  from capjax.model import keras_inception  # noqa: PLC0415

  if weights_file is None:
    variables = inception.random_variables()
  else:
    try:
      variables = keras_inception.converted_params(weights_file)
    except ValueError as e:  # the message names the file and what is wrong
      raise errors.UserError(str(e)) from None

  def features_fn(images_NSS3):
    return np.asarray(inception.extract_features(variables, images_NSS3))

  return features_fn, inception.NUM_LOCATIONS, inception.FEATURE_DIM


def _keras_inception(weights_file: str | None):
  """(features_fn, L, D) of Keras' InceptionV3."""
  import tensorflow as tf  # noqa: PLC0415

  model = tf.keras.applications.InceptionV3(
    include_top=False,
    weights=weights_file,
    input_shape=(_INCEPTION_SIZE, _INCEPTION_SIZE, 3),
  )
  _, height, width, dim = model.output_shape

  @tf.function(
    input_signature=[
      tf.TensorSpec([None, _INCEPTION_SIZE, _INCEPTION_SIZE, 3], tf.float32)
    ]
  )
  def grid_fn(images_NSS3):
    x = tf.keras.applications.inception_v3.preprocess_input(images_NSS3)
    return model(x, training=False)

  def features_fn(images_NSS3):
    grid = grid_fn(tf.constant(images_NSS3, tf.float32)).numpy()
    return grid.reshape(grid.shape[0], height * width, dim)

  return features_fn, height * width, dim
