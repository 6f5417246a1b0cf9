"""The JAX form of a workdir's feature extractor, for a graph that holds it.

capjax.data.extractors computes features in NumPy (patches) or through Keras
or JAX (InceptionV3). An exported graph needs them as JAX functions of the
resized pixels, with the arithmetic of the extractor the model was trained
on, so that the graph's features equal capjax's.
"""

from collections.abc import Callable
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from capjax import errors
from capjax.data import extractors

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GraphExtractor:
  """Resized pixels -> features, as a JAX function.

  Attributes:
    info: the extractor's description in features.json.
    image_size: S, the side the pixels are resized to.
    features_fn: pixels_BSS3 float32 in [0, 255] -> features_BLD float32.
  """

  info: dict[str, Any]
  image_size: int
  features_fn: Callable[[Array], Array]


def patches_features_fn(patch_grid: int) -> Callable[[Array], Array]:
  """extractors.patches_extractor's features_fn, step for step in JAX."""
  p, cells = extractors.PATCH_SIZE, patch_grid**2

  def features_fn(pixels_BSS3):
    b = pixels_BSS3.shape[0]
    grid = pixels_BSS3.reshape(b, patch_grid, p, patch_grid, p, 3)
    grid = grid.transpose(0, 1, 3, 2, 4, 5)  # cells in row-major order
    pixels_BLP = grid.reshape(b, cells, p * p * 3) / jnp.float32(127.5) - 1.0
    positions_BLL = jnp.broadcast_to(
      jnp.eye(cells, dtype=jnp.float32), (b, cells, cells)
    )
    return jnp.concatenate([pixels_BLP, positions_BLL], axis=-1)

  return features_fn


def _from_numpy_error(name: str) -> errors.UserError:
  return errors.UserError(
    f"the workdir's features come from an extractor capjax does not have "
    f'({name!r}, stored with --from_numpy), so its graph cannot start from '
    'pixels; export the decoder alone with --from_features'
  )


def _inception_variables(weights: str) -> Any:
  """InceptionV3's JAX variables for config.extractor_weights."""
  # Imported here: the patches extractor needs neither module.
  from capjax.model import inception  # noqa: PLC0415
  from capjax.model import keras_inception  # noqa: PLC0415

  if weights == 'none':
    return inception.random_variables()
  path = (
    extractors.inception_weights_path() if weights == 'imagenet' else weights
  )
  if not path.endswith('.h5'):
    raise errors.UserError(
      f'InceptionV3 weights {weights!r} have no JAX form: capjax converts '
      "only Keras' .h5 weights file; set config.extractor_weights to such a "
      'file, or export the decoder alone with --from_features'
    )
  try:
    return keras_inception.converted_params(path)
  except errors.UserError as e:
    raise errors.UserError(
      f'InceptionV3 weights {weights!r} have no JAX form ({e}); export the '
      'decoder alone with --from_features'
    ) from None


def graph_extractor(config, feature_info: dict[str, Any]) -> GraphExtractor:
  """The JAX extractor of a workdir (its config and features.json).

  Raises:
    UserError: the features come from an extractor capjax does not have
      (--from_numpy), or its weights have no JAX form.
  """
  info = feature_info['extractor']
  name = info.get('name')
  if name == 'patches' and 'patch_grid' in info:
    grid = info['patch_grid']
    return GraphExtractor(
      info, grid * extractors.PATCH_SIZE, patches_features_fn(grid)
    )
  if name == 'inception_v3' and 'backend' in info:
    from capjax.model import inception  # noqa: PLC0415

    variables = _inception_variables(config.extractor_weights)

    def features_fn(pixels_BSS3):
      return inception.extract_features.__wrapped__(variables, pixels_BSS3)

    return GraphExtractor(info, inception.IMAGE_SIZE, features_fn)
  raise _from_numpy_error(name)
