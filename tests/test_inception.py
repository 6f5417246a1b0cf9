"""The Flax InceptionV3 against Keras', and the weight converter.

No ImageNet weights can be downloaded here, so Keras' InceptionV3 is built
with random weights and random batch-norm statistics, saved in the legacy
HDF5 layout of the file Keras downloads, converted and compared on real
images. Keras 3 cannot write that layout (`save_weights` insists on the new
'.weights.h5' format), so the file is written by tf_keras (Keras 2), from an
identical InceptionV3 holding the same weights; a test checks that Keras 3
loads it the way it loads the download.
"""

import dataclasses
import os
import pathlib
import re
import shutil
import sys
from typing import Any

from flax import traverse_util
import jax
import numpy as np
from PIL import Image
import pytest

from capjax import errors
from capjax.data import extractors
from capjax.data import feature_store
from capjax.data import images
from capjax.model import inception
from capjax.model import keras_inception

NUM_IMAGES = 8
# max |Flax - Keras| / max |Keras| on float32 features.
TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class KerasWeights:
  keras3: Any  # tf.keras (Keras 3) InceptionV3, include_top=False
  keras2: Any  # tf_keras (Keras 2) InceptionV3 with the same weights
  h5_path: pathlib.Path  # keras2.save_weights: the download's layout


def _randomize_batch_norms(model, tf) -> None:
  """Random betas and statistics, scaled to what each batch norm sees.

  Statistics drawn out of thin air make activations die out or swamp the
  input, so that every image gets nearly the same features and a comparison
  would check little. Instead each batch norm gets its input's mean and
  variance on noise images (all measured in one training-mode pass, in which
  every batch norm normalises by its batch), randomly perturbed.
  """
  rng = np.random.default_rng(0)
  norms = [
    layer
    for layer in model.layers
    if isinstance(layer, tf.keras.layers.BatchNormalization)
  ]
  probe = tf.keras.Model(model.input, [layer.input for layer in norms])
  noise_NHW3 = rng.uniform(-1, 1, (4, 299, 299, 3)).astype(np.float32)
  for layer, x_NHWC in zip(norms, probe(noise_NHW3, training=True)):
    x_NHWC = x_NHWC.numpy()
    mean_C, var_C = x_NHWC.mean(axis=(0, 1, 2)), x_NHWC.var(axis=(0, 1, 2))
    shape = mean_C.shape
    layer.set_weights(
      [
        rng.normal(0, 0.2, shape).astype(np.float32),
        (mean_C + 0.2 * np.sqrt(var_C) * rng.normal(size=shape)).astype(
          np.float32
        ),
        (var_C * rng.uniform(0.7, 1.4, shape)).astype(np.float32),
      ]
    )


@pytest.fixture(scope='module')
def keras_weights(tmp_path_factory) -> KerasWeights:
  tf = pytest.importorskip('tensorflow')
  tf_keras = pytest.importorskip('tf_keras')
  kwargs = dict(include_top=False, weights=None, input_shape=(299, 299, 3))
  keras3 = tf.keras.applications.InceptionV3(**kwargs)
  _randomize_batch_norms(keras3, tf)
  keras2 = tf_keras.applications.InceptionV3(**kwargs)
  for source, target in zip(
    [l for l in keras3.layers if l.weights],
    [l for l in keras2.layers if l.weights],
  ):
    target.set_weights(source.get_weights())
  h5_path = tmp_path_factory.mktemp('keras') / 'inception_notop.h5'
  keras2.save_weights(str(h5_path))
  return KerasWeights(keras3, keras2, h5_path)


def _real_images(shared_data: pathlib.Path, n: int) -> np.ndarray:
  """n real JPEGs, half COCO half Flickr8k, as capjax feeds InceptionV3."""
  import tensorflow as tf  # noqa: PLC0415

  paths = (
    sorted((shared_data / 'coco-mini' / 'val2017').glob('*.jpg'))[: n // 2]
    + sorted((shared_data / 'flickr8k-1k' / 'images').glob('*.jpg'))[
      : n - n // 2
    ]
  )
  return np.stack(
    [
      tf.image.resize(
        np.asarray(Image.open(p).convert('RGB')), (299, 299)
      ).numpy()
      for p in paths
    ]
  )


def _variables_from_keras(model: Any) -> dict[str, Any]:
  """An in-memory Keras (3 or 2) InceptionV3(include_top=False), converted."""
  layers = [layer.get_weights() for layer in model.layers]
  return keras_inception.variables_from_layers(
    layers, f'Keras model {model.name!r}'
  )


def _assert_same(variables, expected) -> None:
  assert jax.tree.structure(variables) == jax.tree.structure(expected)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, variables, expected)))


def _legacy_copy(keras_weights, tmp_path) -> pathlib.Path:
  path = tmp_path / 'edited.h5'
  shutil.copy(keras_weights.h5_path, path)
  return path


def test_features_match_keras_on_real_images(keras_weights, shared_data):
  import tensorflow as tf  # noqa: PLC0415

  images_NHW3 = _real_images(shared_data, NUM_IMAGES)
  keras_NhwD = keras_weights.keras3(
    tf.keras.applications.inception_v3.preprocess_input(
      tf.constant(images_NHW3)
    ),
    training=False,
  ).numpy()
  keras_NLD = keras_NhwD.reshape(NUM_IMAGES, -1, inception.FEATURE_DIM)
  variables = keras_inception.variables_from_h5(str(keras_weights.h5_path))

  features_NLD = np.asarray(inception.extract_features(variables, images_NHW3))

  assert features_NLD.shape == (
    NUM_IMAGES,
    inception.NUM_LOCATIONS,
    inception.FEATURE_DIM,
  )
  scale = np.abs(keras_NLD).max()
  # The weights make images differ by far more than the tolerance, so a
  # wrongly ordered or wrongly padded layer could not pass.
  assert np.abs(keras_NLD[1:] - keras_NLD[:-1]).max() > 0.1 * scale
  assert np.abs(features_NLD - keras_NLD).max() / scale < TOLERANCE


def test_both_extractor_backends_make_the_same_features(
  keras_weights, shared_data, tmp_path
):
  paths = sorted((shared_data / 'coco-mini' / 'val2017').glob('*.jpg'))[:3]
  weights = str(tmp_path / 'weights.h5')
  shutil.copy(keras_weights.h5_path, weights)
  made = {
    backend: extractors.inception_v3_extractor(weights, backend)
    for backend in ('jax', 'keras')
  }
  grids = {
    backend: extractor([images.load_image(p) for p in paths])
    for backend, extractor in made.items()
  }
  scale = np.abs(grids['keras']).max()
  assert np.abs(grids['jax'] - grids['keras']).max() / scale < TOLERANCE
  # Their stores are interchangeable: the backend is recorded, not compared.
  descriptions = [extractor.describe() for extractor in made.values()]
  assert [d['extractor']['backend'] for d in descriptions] == ['jax', 'keras']
  feature_store.require_same_features(
    *descriptions, expected_what='jax', got_what='keras'
  )


def test_in_memory_models_convert_like_the_h5_file(keras_weights):
  import tensorflow as tf  # noqa: PLC0415

  from_h5 = keras_inception.variables_from_h5(str(keras_weights.h5_path))
  # Keras 3 loading the file as it loads the download (by position): a third
  # model, whose layers are numbered differently again.
  loaded = tf.keras.applications.InceptionV3(
    include_top=False,
    weights=str(keras_weights.h5_path),
    input_shape=(299, 299, 3),
  )
  for model in (keras_weights.keras3, keras_weights.keras2, loaded):
    _assert_same(_variables_from_keras(model), from_h5)


def test_byte_string_names_as_in_the_download(keras_weights, tmp_path):
  h5py = pytest.importorskip('h5py')
  path = _legacy_copy(keras_weights, tmp_path)
  # The Keras 2.0 that wrote the download stored names as fixed-length
  # byte strings; tf_keras writes variable-length str.
  with h5py.File(path, 'r+') as f:
    names = list(f.attrs['layer_names'])
    f.attrs['layer_names'] = np.array([n.encode() for n in names], 'S')
    for name in names:
      weights = list(f[name].attrs['weight_names'])
      if weights:
        f[name].attrs['weight_names'] = np.array(
          [w.encode() for w in weights], 'S'
        )
    assert f.attrs['layer_names'].dtype.kind == 'S'

  _assert_same(
    keras_inception.variables_from_h5(str(path)),
    keras_inception.variables_from_h5(str(keras_weights.h5_path)),
  )


def test_converted_params_caches_beside_the_file(
  keras_weights, tmp_path, monkeypatch
):
  h5_path = tmp_path / 'weights.h5'
  shutil.copy(keras_weights.h5_path, h5_path)
  converted = keras_inception.converted_params(str(h5_path))
  cache = tmp_path / 'weights.flax.npz'
  assert keras_inception.cache_path(h5_path) == cache
  assert sorted(os.listdir(tmp_path)) == ['weights.flax.npz', 'weights.h5']

  # From now on `import h5py` fails: only the cache can be read.
  monkeypatch.setitem(sys.modules, 'h5py', None)
  _assert_same(keras_inception.converted_params(str(h5_path)), converted)

  # A weights file newer than its cache is converted again.
  newer = os.path.getmtime(cache) + 10
  os.utime(h5_path, (newer, newer))
  with pytest.raises(ImportError):
    keras_inception.converted_params(str(h5_path))


def test_missing_file(tmp_path):
  path = tmp_path / 'missing.h5'
  with pytest.raises(
    ValueError, match=f'{re.escape(str(path))}: no such InceptionV3'
  ):
    keras_inception.converted_params(str(path))


def test_file_that_is_not_hdf5(tmp_path):
  path = tmp_path / 'notes.h5'
  path.write_text('not weights')
  with pytest.raises(
    ValueError, match=f'{re.escape(str(path))}: not an HDF5 file'
  ):
    keras_inception.converted_params(str(path))


def test_a_bad_weights_file_is_the_users_error(tmp_path):
  # The model raises ValueError; the extractor, given the user's file, says
  # it in a UserError, which programs print as one line.
  path = tmp_path / 'notes.h5'
  path.write_text('not weights')
  with pytest.raises(
    errors.UserError, match=f'{re.escape(str(path))}: not an HDF5 file'
  ):
    extractors.inception_v3_extractor(str(path), backend='jax')


def test_keras3_weights_file_is_not_the_legacy_layout(tmp_path):
  keras = pytest.importorskip('keras')
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  path = tmp_path / 'model.weights.h5'
  model.save_weights(str(path))
  with pytest.raises(
    ValueError, match=f"{re.escape(str(path))}: no 'layer_names'"
  ):
    keras_inception.variables_from_h5(str(path))


def test_file_with_a_layer_missing(keras_weights, tmp_path):
  h5py = pytest.importorskip('h5py')
  path = _legacy_copy(keras_weights, tmp_path)
  with h5py.File(path, 'r+') as f:
    names = f.attrs['layer_names']
    # Drop the first conv (names[0] is the input layer, which has no weights).
    f.attrs['layer_names'] = np.delete(names, 1)
  with pytest.raises(
    ValueError,
    match=f'{re.escape(str(path))}: not InceptionV3 without '
    'top: .* found 93 and 94 among 187 layers',
  ):
    keras_inception.variables_from_h5(str(path))


def test_file_with_a_wrong_shape(keras_weights, tmp_path):
  h5py = pytest.importorskip('h5py')
  path = _legacy_copy(keras_weights, tmp_path)
  with h5py.File(path, 'r+') as f:
    group = f[f.attrs['layer_names'][1]]  # the first conv, after the input
    name = group.attrs['weight_names'][0]
    del group[name]
    group[name] = np.zeros((3, 3, 3, 16), np.float32)
  with pytest.raises(
    ValueError,
    match=r'conv2d_bn 0 in Keras order '
    r'\(params/conv_1a_3x3/conv/kernel\) has shape '
    r'\(3, 3, 3, 16\), expected \(3, 3, 3, 32\)',
  ):
    keras_inception.variables_from_h5(str(path))


def test_other_keras_model():
  keras = pytest.importorskip('keras')
  model = keras.Sequential(
    [keras.Input((2,)), keras.layers.Dense(1)], name='tiny'
  )
  with pytest.raises(ValueError, match="Keras model 'tiny': not InceptionV3"):
    _variables_from_keras(model)


def test_keras_order_lists_every_conv_once():
  shapes = jax.eval_shape(inception.init_variables, jax.random.key(0))
  paths = [
    key[:-2]
    for key in traverse_util.flatten_dict(shapes['params'])
    if key[-1] == 'kernel'
  ]
  assert sorted(keras_inception.KERAS_ORDER) == sorted(paths)
