r"""Image feature extraction into a sharded, resumable feature store.

Extractors map an image to a grid of L feature vectors of size D:

- 'inception_v3': Keras InceptionV3 without its classifier, as in the
  tutorial: the image resized to 299x299 (bilinear), scaled to [-1, 1], and the
  last 8x8x2048 activations flattened to (64, 2048).
- 'patches': no weights; the image resized to (patch_grid * PATCH_SIZE) pixels
  square and cut into patch_grid**2 cells, each a flattened RGB patch scaled
  to [-1, 1] followed by a one-hot code of the cell's position, so
  D = 3 * PATCH_SIZE**2 + patch_grid**2. Made for the `shapes` data.

A store is one directory per split (`<feature_dir>/<split>/`):

  metadata.json     format, extractor (name and settings), num_locations (L),
                    feature_dim (D), dtype, shard_size, num_images, complete,
                    and per shard its file, image ids (one per row) and the
                    images that could not be read (id and error).
  shard-00000.npy   float16 (n, L, D), n <= shard_size; row i is the image
  shard-00001.npy   ...                 of the shard's i-th image id

Shard files are written to a temporary name and renamed, then listed in
metadata.json (also replaced atomically), so an interrupted extraction resumes
at the first unlisted shard; a rerun checks each listed shard against the data
and skips it. Each distinct image is decoded and run once. Unreadable images
are skipped and listed at the end (delete the store to retry them).

Extraction runs TensorFlow wherever it finds a GPU; only the training and
serving processes hide GPUs from TensorFlow, so that JAX owns them.

Command line (flags: --config, --split, --feature_dir):

  python -m capjax.features --config=capjax/configs/default.py \
      --config.dataset=coco_json --config.data_dir=/data/coco \
      --config.extractor=inception_v3 --split=train+val --feature_dir=/data/f

Features from any other extractor, as a (N, L, D) or (N, H, W, D) .npy array
with one image id per line in a text file:

  python -m capjax.features --from_numpy=feats.npy --ids=ids.txt \
      --split=train --feature_dir=/data/f
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
import concurrent.futures
import dataclasses
import io
import itertools
import json
import os
import re
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np
from PIL import Image

from capjax import datasets
from capjax import files

EXTRACTORS = ('inception_v3', 'patches')
# Side in pixels of each 'patches' cell.
PATCH_SIZE = 16
METADATA_FILE = 'metadata.json'
STORE_DTYPE = np.float16

_FORMAT = 'capjax.features/1'
_INCEPTION_SIZE = 299
_INCEPTION_FILE = 'inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5'
_INCEPTION_URL = ('https://storage.googleapis.com/tensorflow/'
                  f'keras-applications/inception_v3/{_INCEPTION_FILE}')
_INCEPTION_MD5 = 'bcbd6486424b2319ff4ef7d526e38f63'
_LOG_EVERY_SECONDS = 10.0
_MAX_FAILURES_LISTED = 50


# --- Images -------------------------------------------------------------------


def load_image(source: str | bytes) -> np.ndarray:
  """Decodes an image file or its encoded bytes to RGB uint8 (H, W, 3).

  Grayscale, palette and CMYK images are converted to RGB; transparent ones
  are composited onto white (how viewers show them).

  Raises:
    OSError, ValueError: unreadable, truncated or non-image data
      (PIL.UnidentifiedImageError is an OSError).
  """
  with Image.open(io.BytesIO(source) if isinstance(source, bytes)
                  else source) as image:
    image.load()  # decode now, so that a truncated file fails here
    if 'A' in image.getbands() or 'transparency' in image.info:
      image = image.convert('RGBA')
      image = Image.alpha_composite(
          Image.new('RGBA', image.size, (255, 255, 255, 255)), image)
    return np.asarray(image.convert('RGB'))


def resize(image_HW3: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize to (size, size, 3) float32 in [0, 255], as the tutorial.

  Uses `tf.image.resize` (no antialiasing), which the tutorial applied before
  InceptionV3, so features match the reference pipeline.
  """
  # TensorFlow is imported where it is used: reading a store and the
  # --from_numpy path do not need its seconds of start-up.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.image.resize(image_HW3, (size, size)).numpy()


# --- Extractors ---------------------------------------------------------------


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
  """
  info: dict[str, Any]
  image_size: int
  num_locations: int
  feature_dim: int
  features_fn: Callable[[np.ndarray], np.ndarray]

  def prepare(self, image_HW3: np.ndarray) -> np.ndarray:
    """A decoded image -> the extractor's input, (S, S, 3) float32."""
    return resize(image_HW3, self.image_size)

  def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """Decoded uint8 images of any sizes -> features_NLD float32."""
    return self.features_fn(np.stack([self.prepare(i) for i in images]))


def make_extractor(config) -> Extractor:
  """The extractor named by config.extractor."""
  if config.extractor == 'inception_v3':
    return inception_v3_extractor(config.extractor_weights)
  if config.extractor == 'patches':
    return patches_extractor(config.patch_grid)
  raise ValueError(f'unknown extractor {config.extractor!r}; set '
                   f'config.extractor to one of {EXTRACTORS}')


def patches_extractor(patch_grid: int) -> Extractor:
  """patch_grid**2 flattened pixel patches per image, scaled to [-1, 1].

  Each cell ends with a one-hot code of its position: attention pools cells
  into one context vector, so without it the decoder could not tell where an
  object is ("left of", "above"). CNN grids carry position in their
  receptive fields; raw patches do not.
  """
  if patch_grid < 1:
    raise ValueError(f'patch_grid must be >= 1, got {patch_grid}')
  p, cells = PATCH_SIZE, patch_grid**2

  def features_fn(images_NSS3):
    n = images_NSS3.shape[0]
    grid = images_NSS3.reshape(n, patch_grid, p, patch_grid, p, 3)
    grid = grid.transpose(0, 1, 3, 2, 4, 5)  # cells in row-major order
    pixels = grid.reshape(n, cells, p * p * 3) / 127.5 - 1.0
    positions = np.broadcast_to(np.eye(cells, dtype=pixels.dtype),
                                (n, cells, cells))
    return np.concatenate([pixels, positions], axis=-1)

  return Extractor(
      info={'name': 'patches', 'patch_grid': patch_grid, 'patch_size': p,
            'positions': 'one_hot'},
      image_size=patch_grid * p, num_locations=cells,
      feature_dim=p * p * 3 + cells, features_fn=features_fn)


def inception_weights_path() -> str:
  """The Keras InceptionV3 (no top) ImageNet weights file, downloading it once.

  Raises:
    ValueError: the file is neither cached nor downloadable; the message says
      which file to put where.
  """
  import keras  # pylint: disable=g-import-not-at-top
  cache_dir = os.path.expanduser(
      os.environ.get('KERAS_HOME', os.path.join('~', '.keras')))
  path = os.path.join(cache_dir, 'models', _INCEPTION_FILE)
  if os.path.isfile(path):
    return path
  try:
    return keras.utils.get_file(_INCEPTION_FILE, _INCEPTION_URL,
                                cache_subdir='models', cache_dir=cache_dir,
                                file_hash=_INCEPTION_MD5)
  # Keras reports download failures as a bare Exception.
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'the InceptionV3 ImageNet weights are not in {path} and could not '
        f'be downloaded ({e}). Download {_INCEPTION_URL} and put it at '
        f'{path}, or set config.extractor_weights to the path of that file.'
    ) from None


def inception_v3_extractor(weights: str = 'imagenet') -> Extractor:
  """Keras InceptionV3 features, 8x8x2048 -> (64, 2048).

  Args:
    weights: 'imagenet' (cached in ~/.keras/models or downloaded), 'none'
      (random weights, for tests and benchmarks) or the path of an .h5 file.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if weights == 'imagenet':
    weights_file = inception_weights_path()
  elif weights == 'none':
    weights_file = None
  elif os.path.isfile(weights):
    weights_file = weights
  else:
    raise ValueError(f"extractor_weights must be 'imagenet', 'none' or an "
                     f'existing weights file, got {weights!r}')
  model = tf.keras.applications.InceptionV3(
      include_top=False, weights=weights_file,
      input_shape=(_INCEPTION_SIZE, _INCEPTION_SIZE, 3))
  _, height, width, dim = model.output_shape

  @tf.function(input_signature=[
      tf.TensorSpec([None, _INCEPTION_SIZE, _INCEPTION_SIZE, 3], tf.float32)])
  def grid_fn(images):
    x = tf.keras.applications.inception_v3.preprocess_input(images)
    return model(x, training=False)

  def features_fn(images_NSS3):
    grid = grid_fn(tf.constant(images_NSS3, tf.float32)).numpy()
    return grid.reshape(grid.shape[0], height * width, dim)

  return Extractor(info={'name': 'inception_v3', 'weights': weights},
                   image_size=_INCEPTION_SIZE, num_locations=height * width,
                   feature_dim=dim, features_fn=features_fn)


# --- The store ----------------------------------------------------------------


def store_dir(feature_dir: str, split: str) -> str:
  """The store directory of one split (not '+'-joined) in feature_dir."""
  if '+' in split:
    raise ValueError(f'{split!r} joins splits; each part has its own store')
  return os.path.join(feature_dir, re.sub(r'[^\w.-]+', '_', split).strip('_'))


def resolve_feature_dir(config, workdir: str) -> str:
  """config.feature_dir, or `<workdir>/features` when it is empty."""
  return config.feature_dir or os.path.join(workdir, 'features')


def _read_metadata(directory: str) -> dict[str, Any]:
  """The metadata of a complete store, checked."""
  path = os.path.join(directory, METADATA_FILE)
  if not os.path.isfile(path):
    raise ValueError(f'no feature store in {directory} ({METADATA_FILE} '
                     'missing): extract features first with '
                     '`python -m capjax.features`')
  with open(path, encoding='utf-8') as f:
    metadata = json.load(f)
  if metadata.get('format') != _FORMAT:
    raise ValueError(f'{path} is not a capjax feature store '
                     f'(format {metadata.get("format")!r})')
  if not metadata['complete']:
    raise ValueError(f'feature store {directory} is incomplete: rerun the '
                     'extraction, it resumes where it stopped')
  for shard in metadata['shards']:
    if not os.path.isfile(os.path.join(directory, shard['file'])):
      raise ValueError(f'feature store {directory} lacks {shard["file"]}; '
                       'delete the store and extract again')
  return metadata


class FeatureStore:
  """Read access to the features of one or more store directories.

  Shards are memory-mapped, so opening is cheap and `read` touches only the
  requested rows.
  """

  def __init__(self, metadata: Sequence[dict[str, Any]],
               directories: Sequence[str]):
    """Use `FeatureStore.open` or `FeatureStore.open_split`."""
    first = metadata[0]
    for m, d in zip(metadata[1:], directories[1:]):
      for key in ('extractor', 'num_locations', 'feature_dim', 'dtype'):
        if m[key] != first[key]:
          raise ValueError(f'cannot join feature stores {directories[0]} and '
                           f'{d}: their {key} differ ({first[key]} vs '
                           f'{m[key]})')
    self.extractor: dict[str, Any] = first['extractor']
    self.num_locations: int = first['num_locations']
    self.feature_dim: int = first['feature_dim']
    self.dtype = np.dtype(first['dtype'])
    self._paths, ids, failed = [], [], []
    sizes = []
    for m, d in zip(metadata, directories):
      for shard in m['shards']:
        self._paths.append(os.path.join(d, shard['file']))
        sizes.append(len(shard['image_ids']))
        ids.extend(shard['image_ids'])
        failed.extend((f['image_id'], f['error']) for f in shard['failed'])
    self.image_ids: tuple[str, ...] = tuple(ids)
    self.failed: tuple[tuple[str, str], ...] = tuple(failed)
    self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    self._index = {image_id: i for i, image_id in enumerate(ids)}
    if len(self._index) != len(ids):
      raise ValueError(f'feature stores {", ".join(directories)} hold an image '
                       'twice')
    self._shards: dict[int, np.ndarray] = {}

  @classmethod
  def open(cls, directory: str) -> 'FeatureStore':
    """Opens a complete store directory.

    Raises:
      ValueError: no store there, or an unfinished one.
    """
    return cls([_read_metadata(directory)], [directory])

  @classmethod
  def open_split(cls, feature_dir: str, split: str) -> 'FeatureStore':
    """The stores of a split's parts ('train+restval') as one store."""
    directories = [store_dir(feature_dir, p)
                   for p in datasets.split_parts(split)]
    return cls([_read_metadata(d) for d in directories], directories)

  def __len__(self) -> int:
    return len(self.image_ids)

  def __contains__(self, image_id: str) -> bool:
    return image_id in self._index

  def index_of(self, image_ids: Iterable[str]) -> np.ndarray:
    """Rows of the given image ids, int64 (n,).

    Raises:
      ValueError: an id is not in the store.
    """
    try:
      return np.array([self._index[i] for i in image_ids], np.int64)
    except KeyError as e:
      raise ValueError(f'image {e.args[0]!r} is not in the feature '
                       'store') from None

  def _shard(self, k: int) -> np.ndarray:
    if k not in self._shards:
      self._shards[k] = np.load(self._paths[k], mmap_mode='r')
    return self._shards[k]

  def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """features_NLD (store dtype) of the rows `indices`, in their order."""
    indices = np.asarray(indices, np.int64)
    out = np.empty((len(indices), self.num_locations, self.feature_dim),
                   self.dtype)
    if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
      raise ValueError(f'feature rows must be in [0, {len(self)})')
    order = np.argsort(indices, kind='stable')  # sequential reads per shard
    sorted_rows = indices[order]
    shards = np.searchsorted(self._offsets, sorted_rows, side='right') - 1
    for k in np.unique(shards):
      sel = shards == k
      out[order[sel]] = self._shard(k)[sorted_rows[sel] - self._offsets[k]]
    return out

  def read_all(self) -> np.ndarray:
    """All features, (N, L, D) in the store's dtype."""
    out = np.empty((len(self), self.num_locations, self.feature_dim),
                   self.dtype)
    for k in range(len(self._paths)):
      out[self._offsets[k]:self._offsets[k + 1]] = self._shard(k)
    return out


class _StoreWriter:
  """Writes a store shard by shard, resuming after the shards already listed."""

  def __init__(self, directory: str, extractor_info: dict[str, Any],
               num_locations: int, feature_dim: int, shard_size: int):
    if shard_size < 1:
      raise ValueError(f'shard_size must be >= 1, got {shard_size}')
    self.directory = directory
    header = {'format': _FORMAT, 'extractor': extractor_info,
              'num_locations': num_locations, 'feature_dim': feature_dim,
              'dtype': np.dtype(STORE_DTYPE).name, 'shard_size': shard_size}
    path = os.path.join(directory, METADATA_FILE)
    if os.path.isfile(path):
      with open(path, encoding='utf-8') as f:
        self.metadata = json.load(f)
      old = {k: self.metadata.get(k) for k in header}
      if old != header:
        raise ValueError(
            f'{directory} holds features made with other settings ({old}, now '
            f'{header}); use another feature_dir or delete {directory}')
    else:
      os.makedirs(directory, exist_ok=True)
      self.metadata = dict(header, complete=False, num_images=0, shards=[])

  @property
  def shards(self) -> list[dict[str, Any]]:
    return self.metadata['shards']

  def is_done(self, k: int, image_ids: Sequence[str]) -> bool:
    """Whether shard k is already written, for exactly these images."""
    if k >= len(self.shards):
      return False
    shard = self.shards[k]
    written = shard['image_ids'] + [f['image_id'] for f in shard['failed']]
    if sorted(written) != sorted(image_ids):
      raise ValueError(
          f'{self.directory} was extracted from other images (shard {k} '
          'differs from the data now); delete it or use another feature_dir')
    return True

  def write_shard(self, k: int, image_ids: Sequence[str],
                  features_NLD: np.ndarray,
                  failed: Sequence[tuple[str, str]]) -> None:
    if k != len(self.shards):
      raise ValueError(f'shard {k} written out of order')
    file = f'shard-{k:05d}.npy'
    tmp = os.path.join(self.directory, f'{file}.tmp')
    with open(tmp, 'wb') as f:
      np.save(f, np.asarray(features_NLD, STORE_DTYPE))
    os.replace(tmp, os.path.join(self.directory, file))
    self.shards.append({
        'file': file, 'image_ids': list(image_ids),
        'failed': [{'image_id': i, 'error': e} for i, e in failed]})
    self.metadata['complete'] = False
    self._save()

  def finish(self, num_chunks: int) -> None:
    if num_chunks != len(self.shards):
      raise ValueError(
          f'{self.directory} holds {len(self.shards)} shards but the data '
          f'now makes {num_chunks}; delete it or use another feature_dir')
    self.metadata['num_images'] = sum(len(s['image_ids']) for s in self.shards)
    self.metadata['complete'] = True
    self._save()

  def _save(self) -> None:
    files.write_json_atomic(os.path.join(self.directory, METADATA_FILE),
                            self.metadata)


def _chunks(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
  iterator = iter(iterable)
  while chunk := list(itertools.islice(iterator, size)):
    yield chunk


def write_feature_store(out_dir: str, features_NLD: np.ndarray,
                        image_ids: Sequence[str],
                        extractor_info: dict[str, Any],
                        shard_size: int = 1024) -> FeatureStore:
  """Writes precomputed features as a store, e.g. grids of another extractor.

  Args:
    out_dir: the store directory (usually `store_dir(feature_dir, split)`).
    features_NLD: (N, L, D) features, any float dtype; stored as float16.
    image_ids: N distinct image ids, as the caption source names them.
    extractor_info: JSON-serialisable description, at least {'name': ...}.
    shard_size: images per shard file.

  Returns:
    The written store, opened.
  """
  if features_NLD.ndim != 3:
    raise ValueError(f'features must be (N, L, D), got shape '
                     f'{features_NLD.shape}')
  image_ids = [str(i) for i in image_ids]
  if len(image_ids) != len(features_NLD):
    raise ValueError(f'{len(image_ids)} image ids for {len(features_NLD)} '
                     'feature grids')
  if len(set(image_ids)) != len(image_ids):
    raise ValueError('image ids must be distinct')
  if 'name' not in extractor_info:
    raise ValueError("extractor_info needs a 'name'")
  _, num_locations, feature_dim = features_NLD.shape
  writer = _StoreWriter(out_dir, dict(extractor_info), num_locations,
                        feature_dim, shard_size)
  num_chunks = 0
  for k, start in enumerate(range(0, len(image_ids), shard_size)):
    ids = image_ids[start:start + shard_size]
    if not writer.is_done(k, ids):
      writer.write_shard(k, ids, features_NLD[start:start + shard_size], [])
    num_chunks += 1
  writer.finish(num_chunks)
  return FeatureStore.open(out_dir)


class _Progress:
  """Logs images done and images/s now and then, and once at the end."""

  def __init__(self, name: str):
    self._name = name
    self._start = self._last = time.monotonic()
    self.done = self.skipped = self.failed = 0

  def update(self, done: int = 0, skipped: int = 0, failed: int = 0,
             final: bool = False) -> None:
    self.done += done
    self.skipped += skipped
    self.failed += failed
    now = time.monotonic()
    if final or now - self._last >= _LOG_EVERY_SECONDS:
      self._last = now
      rate = self.done / max(now - self._start, 1e-9)
      logging.info('%s: %d images extracted (%.1f images/s), %d unreadable, '
                   '%d already done%s', self._name, self.done, rate,
                   self.failed, self.skipped, ', finished' if final else '')


def _prepare(extractor: Extractor, source: str | bytes) -> np.ndarray:
  return extractor.prepare(load_image(source))


def _extract_chunk(
    extractor: Extractor, chunk: Sequence[tuple[str, str | bytes]],
    batch_size: int, pool: concurrent.futures.Executor, progress: _Progress
) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
  """(ids, features_NLD, failures) of the readable images of a chunk.

  Images are decoded on `pool` one batch ahead of the extractor.
  """
  batches = list(_chunks(chunk, batch_size))

  def submit(batch):
    return [pool.submit(_prepare, extractor, source) for _, source in batch]

  ids, features, failed = [], [], []
  ahead = submit(batches[0]) if batches else []
  for b, batch in enumerate(batches):
    futures = ahead
    ahead = submit(batches[b + 1]) if b + 1 < len(batches) else []
    images = []
    for (image_id, _), future in zip(batch, futures):
      try:
        images.append(future.result())
        ids.append(image_id)
      # Whatever an image's bytes make the decoder raise, one bad image must
      # not stop a long extraction: it is reported and skipped.
      except Exception as e:  # pylint: disable=broad-except
        failed.append((image_id, f'{type(e).__name__}: {e}'))
    if images:
      features.append(extractor.features_fn(np.stack(images)))
    progress.update(done=len(images), failed=len(batch) - len(images))
  empty = np.zeros((0, extractor.num_locations, extractor.feature_dim))
  return ids, np.concatenate(features) if features else empty, failed


def extract_split(config, split: str, feature_dir: str,
                  extractor: Extractor | None = None) -> FeatureStore:
  """Extracts a split's features into `feature_dir`, resuming if interrupted.

  Each part of a '+'-joined split gets its own store (`store_dir`). Shards
  already written are checked against the data and skipped; unreadable
  images are logged at the end, listed in metadata.json and left out.

  Args:
    config: the capjax config (dataset, data_dir, extractor, extractor_weights,
      patch_grid, extract_batch_size, shard_size).
    split: split name(s).
    feature_dir: root directory of the stores.
    extractor: defaults to `make_extractor(config)`.

  Returns:
    The split's features, opened.
  """
  extractor = extractor or make_extractor(config)
  for part in datasets.split_parts(split):
    writer = _StoreWriter(store_dir(feature_dir, part), extractor.info,
                          extractor.num_locations, extractor.feature_dim,
                          config.shard_size)
    progress = _Progress(f'features of {part!r}')
    num_chunks = 0
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
      for k, chunk in enumerate(_chunks(datasets.iter_images(config, part),
                                        config.shard_size)):
        num_chunks += 1
        if writer.is_done(k, [image_id for image_id, _ in chunk]):
          progress.update(skipped=len(chunk))
          continue
        ids, features_NLD, failed = _extract_chunk(
            extractor, chunk, config.extract_batch_size, pool, progress)
        writer.write_shard(k, ids, features_NLD, failed)
    writer.finish(num_chunks)
    progress.update(final=True)
    failures = [(f['image_id'], f['error'])
                for s in writer.shards for f in s['failed']]
    if failures:
      listed = '\n'.join(f'  {i}: {e}' for i, e in
                         failures[:_MAX_FAILURES_LISTED])
      more = len(failures) - _MAX_FAILURES_LISTED
      logging.warning(
          '%d images of %r could not be read and were skipped:\n%s%s',
          len(failures), part, listed,
          f'\n  ... and {more} more (see {writer.directory}/{METADATA_FILE})'
          if more > 0 else '')
  return FeatureStore.open_split(feature_dir, split)


def describe(store: FeatureStore) -> dict[str, Any]:
  """What a model trained on a store's features depends on (features.json)."""
  return {'extractor': store.extractor, 'num_locations': store.num_locations,
          'feature_dim': store.feature_dim}


def check_made_by_config(store: FeatureStore, config) -> None:
  """Raises if a capjax extractor other than the config's made the store.

  Stores of features from elsewhere (`write_feature_store`) pass: no config
  extractor can remake them anyway.
  """
  made = store.extractor
  if made.get('name') not in EXTRACTORS:
    return
  wanted = {'name': config.extractor}
  if config.extractor == 'patches':
    wanted['patch_grid'] = config.patch_grid
  if any(made.get(key) != value for key, value in wanted.items()):
    raise ValueError(
        f'the features in the store were made by {made}, but the config asks '
        f'for {wanted}: use another --config.feature_dir, or the settings '
        'the store was made with')


def open_or_extract(config, split: str, feature_dir: str) -> FeatureStore:
  """A split's feature store; `shapes`, cheap to featurise, extracts its own.

  Raises:
    ValueError: the store is missing or incomplete (for other datasets),
      with the command that extracts it.
  """
  try:
    return FeatureStore.open_split(feature_dir, split)
  except ValueError as e:
    if config.dataset != 'shapes':
      raise ValueError(
          f'{e}\nExtract the features first, with the same config:\n  '
          f'python -m capjax.features --config <config> --split {split} '
          f'--feature_dir {feature_dir}') from None
  logging.info('extracting %s features of the shapes %r split',
               config.extractor, split)
  return extract_split(config, split, feature_dir)


# --- Command line -------------------------------------------------------------

def _store_numpy(features_path: str, ids_path: str, split: str,
                 feature_dir: str, shard_size: int,
                 extractor_name: str) -> FeatureStore:
  if not ids_path or not split or '+' in split:
    raise ValueError('--from_numpy needs --ids and a single --split')
  features = np.load(features_path, mmap_mode='r')
  if features.ndim == 4:  # (N, H, W, D) grid
    features = features.reshape(features.shape[0], -1, features.shape[-1])
  with open(ids_path, encoding='utf-8') as f:
    ids = [line.strip() for line in f if line.strip()]
  return write_feature_store(store_dir(feature_dir, split), features, ids,
                             {'name': extractor_name}, shard_size)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  feature_dir = _FEATURE_DIR.value or config.feature_dir
  try:
    if not feature_dir:
      raise ValueError('set --feature_dir (or config.feature_dir)')
    if _FROM_NUMPY.value:
      store = _store_numpy(_FROM_NUMPY.value, _IDS.value, _SPLIT.value,
                           feature_dir, config.shard_size,
                           _EXTRACTOR_NAME.value)
      logging.info('Stored %d feature grids (L=%d, D=%d)', len(store),
                   store.num_locations, store.feature_dim)
      return
    splits = (_SPLIT.value or
              f'{config.train_split}+{config.eval_split}').split('+')
    store = extract_split(config, '+'.join(dict.fromkeys(splits)), feature_dir)
    logging.info('%d images with features (L=%d, D=%d) in %s', len(store),
                 store.num_locations, store.feature_dim, feature_dir)
  except ValueError as e:
    # A user's mistake (missing files, weights, bad settings): say what to do,
    # without a traceback.
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  # Flags exist only when run as a program, so that importing the library
  # never clashes with the flags of the program that imports it.
  _CONFIG = config_flags.DEFINE_config_file(
      'config',
      os.path.join(os.path.dirname(__file__), 'configs', 'default.py'),
      'Configuration file.', lock_config=True)
  _SPLIT = flags.DEFINE_string(
      'split', '', 'Split(s) to extract, joined with "+"; default: the '
      "config's train_split and eval_split.")
  _FEATURE_DIR = flags.DEFINE_string(
      'feature_dir', '', 'Root directory of the feature stores; default: '
      'config.feature_dir.')
  _FROM_NUMPY = flags.DEFINE_string(
      'from_numpy', '', 'Store precomputed features instead of extracting: a '
      '.npy file of shape (N, L, D) or (N, H, W, D). Needs --ids and --split.')
  _IDS = flags.DEFINE_string(
      'ids', '', 'With --from_numpy: text file of the N image ids, one a line.')
  _EXTRACTOR_NAME = flags.DEFINE_string(
      'extractor_name', 'custom', 'With --from_numpy: the name stored as the '
      "features' extractor.")
  app.run(main)
