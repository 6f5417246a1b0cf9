"""InceptionV3 without its classifier, layer for layer as Keras builds it.

The network is `keras.applications.InceptionV3(include_top=False)` up to
`mixed10`, for inference: every convolution is Keras' `conv2d_bn` (Conv2D
without bias, BatchNormalization without scale, epsilon 1e-3, ReLU) and the
batch norms always use the statistics stored in the variables. Weights come
from `capjax.model.keras_inception`, which converts Keras' ImageNet file.

Variables are {'params', 'batch_stats'}; each conv2d_bn is a module holding
'conv' (kernel HWIO) and 'bn' (bias; batch_stats mean, var). Blocks are named
after Keras' concatenations ('mixed0'...'mixed10'); the stem's convolutions
and the blocks' branches are named as in torchvision's Inception3
('conv_1a_3x3', 'branch5x5_1', ...), since Keras names them only by a
counter.

This module needs only JAX, Flax and NumPy, so features can be made where
TensorFlow is not installed.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

IMAGE_SIZE = 299
NUM_LOCATIONS = 64  # the 8x8 grid of a 299x299 image
FEATURE_DIM = 2048


class ConvBN(nn.Module):
  """Keras' `conv2d_bn`: Conv2D (no bias), BatchNorm (no scale), ReLU.

  Attributes:
    features: output channels.
    kernel_size: (rows, cols).
    strides: (rows, cols).
    padding: 'SAME' or 'VALID', as Keras' 'same' / 'valid'.
    dtype: compute dtype; parameters stay float32.
  """

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: str = 'SAME'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_NHWC: Array) -> Array:
    # The batch norm's bias replaces the conv's, as in Keras.
    x_NHWC = nn.Conv(
      self.features,
      self.kernel_size,
      self.strides,
      self.padding,
      use_bias=False,
      dtype=self.dtype,
      name='conv',
    )(x_NHWC)
    # A ReLU follows, so a scale would only rescale the next conv's input:
    # Keras leaves it out (scale=False).
    x_NHWC = nn.BatchNorm(
      use_running_average=True,
      use_scale=False,
      epsilon=1e-3,
      dtype=self.dtype,
      name='bn',
    )(x_NHWC)
    return nn.relu(x_NHWC)


def _avg_pool_3x3(x_NHWC: Array) -> Array:
  # TensorFlow's 'SAME' average pool divides by the number of real pixels
  # under the window, so border cells are not pulled towards zero.
  return nn.avg_pool(
    x_NHWC, (3, 3), strides=(1, 1), padding='SAME', count_include_pad=False
  )


def _max_pool_3x3_s2(x_NHWC: Array) -> Array:
  return nn.max_pool(x_NHWC, (3, 3), strides=(2, 2), padding='VALID')


class InceptionA(nn.Module):
  """35x35 block, Keras' mixed0-mixed2: 1x1, 5x5, double 3x3, pool branches.

  Attributes:
    pool_features: channels of the pool branch (32 in mixed0, then 64).
    dtype: compute dtype.
  """

  pool_features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_NHWC: Array) -> Array:
    conv = functools.partial(ConvBN, dtype=self.dtype)
    branch1x1 = conv(64, (1, 1), name='branch1x1')(x_NHWC)
    branch5x5 = conv(48, (1, 1), name='branch5x5_1')(x_NHWC)
    branch5x5 = conv(64, (5, 5), name='branch5x5_2')(branch5x5)
    branch3x3dbl = conv(64, (1, 1), name='branch3x3dbl_1')(x_NHWC)
    branch3x3dbl = conv(96, (3, 3), name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = conv(96, (3, 3), name='branch3x3dbl_3')(branch3x3dbl)
    branch_pool = conv(self.pool_features, (1, 1), name='branch_pool')(
      _avg_pool_3x3(x_NHWC)
    )
    return jnp.concatenate(
      [branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1
    )


class InceptionB(nn.Module):
  """35x35 -> 17x17 reduction, Keras' mixed3.

  Attributes:
    dtype: compute dtype.
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_NHWC: Array) -> Array:
    conv = functools.partial(ConvBN, dtype=self.dtype)
    branch3x3 = conv(384, (3, 3), (2, 2), 'VALID', name='branch3x3')(x_NHWC)
    branch3x3dbl = conv(64, (1, 1), name='branch3x3dbl_1')(x_NHWC)
    branch3x3dbl = conv(96, (3, 3), name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = conv(96, (3, 3), (2, 2), 'VALID', name='branch3x3dbl_3')(
      branch3x3dbl
    )
    return jnp.concatenate(
      [branch3x3, branch3x3dbl, _max_pool_3x3_s2(x_NHWC)], axis=-1
    )


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convolutions, Keras' mixed4-mixed7.

  Attributes:
    channels_7x7: width inside the 7x7 branches (128, 160, 160, 192).
    dtype: compute dtype.
  """

  channels_7x7: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_NHWC: Array) -> Array:
    conv = functools.partial(ConvBN, dtype=self.dtype)
    c = self.channels_7x7
    branch1x1 = conv(192, (1, 1), name='branch1x1')(x_NHWC)
    branch7x7 = conv(c, (1, 1), name='branch7x7_1')(x_NHWC)
    branch7x7 = conv(c, (1, 7), name='branch7x7_2')(branch7x7)
    branch7x7 = conv(192, (7, 1), name='branch7x7_3')(branch7x7)
    branch7x7dbl = conv(c, (1, 1), name='branch7x7dbl_1')(x_NHWC)
    branch7x7dbl = conv(c, (7, 1), name='branch7x7dbl_2')(branch7x7dbl)
    branch7x7dbl = conv(c, (1, 7), name='branch7x7dbl_3')(branch7x7dbl)
    branch7x7dbl = conv(c, (7, 1), name='branch7x7dbl_4')(branch7x7dbl)
    branch7x7dbl = conv(192, (1, 7), name='branch7x7dbl_5')(branch7x7dbl)
    branch_pool = conv(192, (1, 1), name='branch_pool')(_avg_pool_3x3(x_NHWC))
    return jnp.concatenate(
      [branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1
    )


class InceptionD(nn.Module):
  """17x17 -> 8x8 reduction, Keras' mixed8.

  Attributes:
    dtype: compute dtype.
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_NHWC: Array) -> Array:
    conv = functools.partial(ConvBN, dtype=self.dtype)
    branch3x3 = conv(192, (1, 1), name='branch3x3_1')(x_NHWC)
    branch3x3 = conv(320, (3, 3), (2, 2), 'VALID', name='branch3x3_2')(
      branch3x3
    )
    branch7x7x3 = conv(192, (1, 1), name='branch7x7x3_1')(x_NHWC)
    branch7x7x3 = conv(192, (1, 7), name='branch7x7x3_2')(branch7x7x3)
    branch7x7x3 = conv(192, (7, 1), name='branch7x7x3_3')(branch7x7x3)
    branch7x7x3 = conv(192, (3, 3), (2, 2), 'VALID', name='branch7x7x3_4')(
      branch7x7x3
    )
    return jnp.concatenate(
      [branch3x3, branch7x7x3, _max_pool_3x3_s2(x_NHWC)], axis=-1
    )


class InceptionE(nn.Module):
  """8x8 block with split 1x3 / 3x1 outputs, Keras' mixed9 and mixed10.

  Attributes:
    dtype: compute dtype.
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_NHWC: Array) -> Array:
    conv = functools.partial(ConvBN, dtype=self.dtype)
    branch1x1 = conv(320, (1, 1), name='branch1x1')(x_NHWC)
    branch3x3 = conv(384, (1, 1), name='branch3x3_1')(x_NHWC)
    branch3x3 = jnp.concatenate(
      [
        conv(384, (1, 3), name='branch3x3_2a')(branch3x3),
        conv(384, (3, 1), name='branch3x3_2b')(branch3x3),
      ],
      axis=-1,
    )
    branch3x3dbl = conv(448, (1, 1), name='branch3x3dbl_1')(x_NHWC)
    branch3x3dbl = conv(384, (3, 3), name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = jnp.concatenate(
      [
        conv(384, (1, 3), name='branch3x3dbl_3a')(branch3x3dbl),
        conv(384, (3, 1), name='branch3x3dbl_3b')(branch3x3dbl),
      ],
      axis=-1,
    )
    branch_pool = conv(192, (1, 1), name='branch_pool')(_avg_pool_3x3(x_NHWC))
    return jnp.concatenate(
      [branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1
    )


class InceptionV3(nn.Module):
  """The trunk up to Keras' mixed10: (N, H, W, 3) in [-1, 1] -> (N, h, w, 2048).

  A 299x299 input gives an 8x8 grid. Inputs must already be scaled as Keras'
  `preprocess_input` does (see `preprocess`).

  Attributes:
    dtype: compute dtype (float32 or bfloat16); parameters stay float32.
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_NHWC: Array) -> Array:
    conv = functools.partial(ConvBN, dtype=self.dtype)
    x_NHWC = conv(32, (3, 3), (2, 2), 'VALID', name='conv_1a_3x3')(x_NHWC)
    x_NHWC = conv(32, (3, 3), padding='VALID', name='conv_2a_3x3')(x_NHWC)
    x_NHWC = conv(64, (3, 3), name='conv_2b_3x3')(x_NHWC)
    x_NHWC = _max_pool_3x3_s2(x_NHWC)
    x_NHWC = conv(80, (1, 1), padding='VALID', name='conv_3b_1x1')(x_NHWC)
    x_NHWC = conv(192, (3, 3), padding='VALID', name='conv_4a_3x3')(x_NHWC)
    x_NHWC = _max_pool_3x3_s2(x_NHWC)
    for i, pool_features in enumerate((32, 64, 64)):
      x_NHWC = InceptionA(pool_features, self.dtype, name=f'mixed{i}')(x_NHWC)
    x_NHWC = InceptionB(self.dtype, name='mixed3')(x_NHWC)
    for i, channels_7x7 in enumerate((128, 160, 160, 192)):
      x_NHWC = InceptionC(channels_7x7, self.dtype, name=f'mixed{4 + i}')(
        x_NHWC
      )
    x_NHWC = InceptionD(self.dtype, name='mixed8')(x_NHWC)
    x_NHWC = InceptionE(self.dtype, name='mixed9')(x_NHWC)
    return InceptionE(self.dtype, name='mixed10')(x_NHWC)


def preprocess(images_NHW3: Array) -> Array:
  """Keras' `inception_v3.preprocess_input`: [0, 255] -> [-1, 1]."""
  return images_NHW3 / 127.5 - 1.0


def init_variables(rng: Array) -> dict[str, Any]:
  """Random float32 variables ({'params', 'batch_stats'}) of the network."""
  images_NHW3 = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
  return dict(InceptionV3().init(rng, images_NHW3))


def random_variables(seed: int = 0) -> dict[str, Any]:
  """Random variables in about a second, for tests and benchmarks.

  `init_variables` runs the network and draws every kernel by threefry:
  20-40 s on a CPU. Here NumPy draws He-normal kernels, which keep the
  activations' scale through the 94 ReLU convolutions, and the batch norms
  are the identity (bias and mean 0, variance 1).
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = math.prod(leaf.shape[:-1])
      return rng.standard_normal(leaf.shape, np.float32) * np.float32(
        math.sqrt(2 / fan_in)
      )
    return (np.ones if name == 'var' else np.zeros)(leaf.shape, np.float32)

  shapes = jax.eval_shape(init_variables, jax.random.PRNGKey(0))
  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.partial(jax.jit, static_argnames='dtype')
def extract_features(
  variables: dict[str, Any], images_NHW3: Array, dtype: Dtype = jnp.float32
) -> Array:
  """Images -> InceptionV3 feature grids, as capjax's 'inception_v3' extractor.

  Args:
    variables: {'params', 'batch_stats'}, e.g. from
      `capjax.model.keras_inception.converted_params`.
    images_NHW3: float32 RGB in [0, 255], already resized (299x299 for the
      8x8 grid Keras gives).
    dtype: compute dtype; bfloat16 halves activation memory and is faster
      where the hardware has bfloat16 units.

  Returns:
    features_NLD: float32 (N, h * w, 2048), the grid cells in row-major order
    (64 cells for 299x299 images).
  """
  # Scale in float32 so that bfloat16 rounds the network's input once.
  x_NHW3 = preprocess(images_NHW3.astype(jnp.float32)).astype(dtype)
  grid_NhwD: Array = InceptionV3(dtype=dtype).apply(  # type: ignore[assignment]
    variables, x_NHW3
  )
  n, h, w, d = grid_NhwD.shape
  return grid_NhwD.reshape(n, h * w, d).astype(jnp.float32)
