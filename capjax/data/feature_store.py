r"""The feature store: image feature grids on disk, sharded and resumable.

A store is one directory per split (`<feature_dir>/<split>/`):

  metadata.json     format, extractor (name and settings), num_locations (L),
                    feature_dim (D), dtype, shard_size, num_images, complete,
                    and per shard its file, image ids (one per row) and the
                    images that could not be read (id and error).
  shard-00000.npy   float16 (n, L, D), n <= shard_size; row i is the image
  shard-00001.npy   ...                 of the shard's i-th image id

While a store is written, each shard is complete once its record
(`shard-00000.json`: its image ids and unreadable images) exists beside its
features, both written under a temporary name and renamed. Shards are
independent, so several processes write one store at once, each its own
shards, and an interrupted writer redoes only the shards without a record.
When every shard exists, one writer lists the records in metadata.json
(complete: true) and removes them. This module is numpy only;
capjax.data.extraction fills stores from images.
"""

from collections.abc import Iterable, Sequence
import os
import pathlib
import re
from typing import Any, Protocol, TypeVar

from absl import logging
import numpy as np

from capjax import config_checks
from capjax import errors
from capjax import files

METADATA_FILE = 'metadata.json'
STORE_DTYPE = np.float16

_FORMAT = 'capjax.features/1'

PathLike = str | os.PathLike[str]


# Anything with an `image_id`, such as datasets.Record (read-only, as a
# NamedTuple's fields are).
class _HasImageId(Protocol):
  @property
  def image_id(self) -> str: ...


RecordT = TypeVar('RecordT', bound=_HasImageId)


def store_dir(feature_dir: PathLike, split: str) -> pathlib.Path:
  """The store directory of one split (not '+'-joined) in feature_dir."""
  if '+' in split:
    raise errors.UserError(
      f'{split!r} joins splits; each part has its own store'
    )
  return pathlib.Path(feature_dir) / file_name(split)


def file_name(split: str) -> str:
  """A split's name made safe as a file name ('train+val' -> 'train_val')."""
  return re.sub(r'[^\w.-]+', '_', split).strip('_')


def resolve_feature_dir(config, workdir: PathLike) -> pathlib.Path:
  """config.feature_dir, or `<workdir>/features` when it is empty."""
  return pathlib.Path(config.feature_dir or pathlib.Path(workdir) / 'features')


def require_same_features(
  expected: dict[str, Any],
  got: dict[str, Any],
  *,
  expected_what: str,
  got_what: str,
) -> None:
  """Raises unless two feature descriptions (`describe()`) are equal.

  A model works only on features made as those it was trained on: the same
  extractor and settings, the same L and D. The backend that computed them
  (JAX or Keras, equal within 1e-6 of the features' scale) does not count.
  """
  comparable = lambda d: dict(
    d, extractor={k: v for k, v in d['extractor'].items() if k != 'backend'}
  )
  if comparable(expected) != comparable(got):
    show = lambda d: (
      f'L={d["num_locations"]}, D={d["feature_dim"]}, {d["extractor"]}'
    )
    raise errors.UserError(
      f'{got_what} ({show(got)}) do not match those of '
      f'{expected_what} ({show(expected)})'
    )


def _read_metadata(directory: pathlib.Path) -> dict[str, Any]:
  """The metadata of a complete store, checked."""
  path = directory / METADATA_FILE
  if not path.is_file():
    raise errors.MissingFileError(
      f'no feature store in {directory} ({METADATA_FILE} missing): extract '
      'features first with `python -m capjax.features`'
    )
  metadata = files.read_json(path)
  if metadata.get('format') != _FORMAT:
    raise errors.UserError(
      f'{path} is not a capjax feature store '
      f'(format {metadata.get("format")!r})'
    )
  if not metadata['complete']:
    raise errors.UserError(
      f'feature store {directory} is incomplete: rerun '
      'the extraction, it resumes where it stopped'
    )
  for shard in metadata['shards']:
    if not (directory / shard['file']).is_file():
      raise errors.UserError(
        f'feature store {directory} lacks '
        f'{shard["file"]}; delete the store and extract '
        'again'
      )
  return metadata


class FeatureStore:
  """Read access to the features of one or more store directories.

  Shards are memory-mapped, so opening is cheap and `read` touches only the
  requested rows.
  """

  def __init__(
    self,
    metadata: Sequence[dict[str, Any]],
    directories: Sequence[pathlib.Path],
  ):
    """Use `FeatureStore.open` or `FeatureStore.open_split`."""
    first = metadata[0]
    for m, d in zip(metadata[1:], directories[1:]):
      for key in ('extractor', 'num_locations', 'feature_dim', 'dtype'):
        if m[key] != first[key]:
          raise errors.UserError(
            f'cannot join feature stores {directories[0]} and {d}: their '
            f'{key} differ ({first[key]} vs {m[key]})'
          )
    self.extractor: dict[str, Any] = first['extractor']
    self.num_locations: int = first['num_locations']
    self.feature_dim: int = first['feature_dim']
    self.dtype = np.dtype(first['dtype'])
    self._paths: list[pathlib.Path] = []
    ids: list[str] = []
    failed: list[tuple[str, str]] = []
    sizes = []
    for m, d in zip(metadata, directories):
      for shard in m['shards']:
        self._paths.append(d / shard['file'])
        sizes.append(len(shard['image_ids']))
        ids.extend(shard['image_ids'])
        failed.extend((f['image_id'], f['error']) for f in shard['failed'])
    self.image_ids: tuple[str, ...] = tuple(ids)
    self.failed: tuple[tuple[str, str], ...] = tuple(failed)
    self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    self._index = {image_id: i for i, image_id in enumerate(ids)}
    if len(self._index) != len(ids):
      raise errors.UserError(
        f'feature stores {", ".join(map(str, directories))} hold an image twice'
      )
    self._shards: dict[int, np.ndarray] = {}

  @classmethod
  def open(cls, directory: PathLike) -> 'FeatureStore':
    """Opens a complete store directory.

    Raises:
      UserError: no store there, or an unfinished one.
    """
    directory = pathlib.Path(directory)
    return cls([_read_metadata(directory)], [directory])

  @classmethod
  def open_split(cls, feature_dir: PathLike, split: str) -> 'FeatureStore':
    """The stores of a split's parts ('train+restval') as one store."""
    directories = [
      store_dir(feature_dir, p) for p in config_checks.split_names(split)
    ]
    return cls([_read_metadata(d) for d in directories], directories)

  def describe(self) -> dict[str, Any]:
    """What a model trained on these features depends on (features.json)."""
    return {
      'extractor': self.extractor,
      'num_locations': self.num_locations,
      'feature_dim': self.feature_dim,
    }

  def __len__(self) -> int:
    return len(self.image_ids)

  def __contains__(self, image_id: str) -> bool:
    return image_id in self._index

  def index_of(self, image_ids: Iterable[str]) -> np.ndarray:
    """Rows of the given image ids, int64 (n,).

    Raises:
      UserError: an id is not in the store.
    """
    try:
      return np.array([self._index[i] for i in image_ids], np.int64)
    except KeyError as e:
      raise errors.UserError(
        f'image {e.args[0]!r} is not in the feature store'
      ) from None

  def with_features(
    self, records: Sequence[RecordT], split: str = ''
  ) -> list[RecordT]:
    """The records whose images have features, warning about the others.

    Images that could not be read have no features and are left out.
    """
    kept = [r for r in records if r.image_id in self]
    if len(kept) < len(records):
      missing = next(r.image_id for r in records if r.image_id not in self)
      logging.warning(
        '%d of %d images%s have no features (unreadable) and '
        'are left out, e.g. %r',
        len(records) - len(kept),
        len(records),
        f' of {split!r}' if split else '',
        missing,
      )
    return kept

  def _shard(self, k: int) -> np.ndarray:
    if k not in self._shards:
      self._shards[k] = np.load(self._paths[k], mmap_mode='r')
    return self._shards[k]

  def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """features_NLD (store dtype) of the rows `indices`, in their order."""
    indices = np.asarray(indices, np.int64)
    out = np.empty(
      (len(indices), self.num_locations, self.feature_dim), self.dtype
    )
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
    out = np.empty(
      (len(self), self.num_locations, self.feature_dim), self.dtype
    )
    for k in range(len(self._paths)):
      out[self._offsets[k] : self._offsets[k + 1]] = self._shard(k)
    return out


def _shard_file(k: int) -> str:
  return f'shard-{k:05d}.npy'


def _record_path(directory: pathlib.Path, k: int) -> pathlib.Path:
  """Where shard k's record waits for `StoreWriter.finish`."""
  return directory / f'shard-{k:05d}.json'


class StoreWriter:
  """Writes a store's shards in any order, from one or several processes.

  Every process of a job opens the same directory and writes its own shards
  (`write_shard`); one of them calls `finish` once all are written.
  """

  def __init__(
    self,
    directory: PathLike,
    extractor_info: dict[str, Any],
    num_locations: int,
    feature_dim: int,
    shard_size: int,
  ):
    if shard_size < 1:
      raise errors.UserError(f'shard_size must be >= 1, got {shard_size}')
    self.directory = pathlib.Path(directory)
    header = {
      'format': _FORMAT,
      'extractor': extractor_info,
      'num_locations': num_locations,
      'feature_dim': feature_dim,
      'dtype': np.dtype(STORE_DTYPE).name,
      'shard_size': shard_size,
    }
    path = self.directory / METADATA_FILE
    if path.is_file():
      self.metadata = files.read_json(path)
      old = {k: self.metadata.get(k) for k in header}
      if old != header:
        raise errors.UserError(
          f'{self.directory} holds features made with other settings '
          f'({old}, now {header}); use another feature_dir or delete '
          f'{self.directory}'
        )
    else:
      # The header goes first, so that a rerun with other settings is
      # refused before it mixes its shards with these. Processes opening a
      # new store at once write the same bytes.
      self.directory.mkdir(parents=True, exist_ok=True)
      self.metadata = dict(header, complete=False, num_images=0, shards=[])
      self._save()

  @property
  def shards(self) -> list[dict[str, Any]]:
    """The records listed in metadata.json: all of them after `finish`."""
    return self.metadata['shards']

  def _record(self, k: int) -> dict[str, Any] | None:
    """Shard k's record if the shard is complete, else None."""
    if k < len(self.shards):  # listed by `finish`, or by an older writer
      return self.shards[k]
    path = _record_path(self.directory, k)
    return files.read_json(path) if path.is_file() else None

  def is_done(self, k: int, image_ids: Sequence[str]) -> bool:
    """Whether shard k is already written, for exactly these images."""
    shard = self._record(k)
    if shard is None:
      return False
    written = shard['image_ids'] + [f['image_id'] for f in shard['failed']]
    if sorted(written) != sorted(image_ids):
      raise errors.UserError(
        f'{self.directory} was extracted from other images (shard {k} '
        'differs from the data now); delete it or use another feature_dir'
      )
    return True

  def write_shard(
    self,
    k: int,
    image_ids: Sequence[str],
    features_NLD: np.ndarray,
    failed: Sequence[tuple[str, str]],
  ) -> None:
    """Writes shard k's features, then its record, which completes it."""
    file = _shard_file(k)
    tmp = self.directory / f'{file}.tmp'
    with open(tmp, 'wb') as f:
      np.save(f, np.asarray(features_NLD, STORE_DTYPE))
    tmp.replace(self.directory / file)
    files.write_json_atomic(
      _record_path(self.directory, k),
      {
        'file': file,
        'image_ids': list(image_ids),
        'failed': [{'image_id': i, 'error': e} for i, e in failed],
      },
    )

  def finish(self, num_chunks: int) -> None:
    """Lists shards 0..num_chunks-1 in metadata.json and marks it complete.

    Raises:
      UserError: the store holds more shards than the data makes now.
      ValueError: a shard is not written yet.
    """
    written = len(self.shards)
    while _record_path(self.directory, written).is_file():
      written += 1
    if written > num_chunks:
      raise errors.UserError(
        f'{self.directory} holds {written} shards but the data '
        f'now makes {num_chunks}; delete it or use another feature_dir'
      )
    if written < num_chunks:
      raise ValueError(f'shard {written} of {self.directory} is not written')
    self.metadata['shards'] = [self._record(k) for k in range(num_chunks)]
    self.metadata['num_images'] = sum(len(s['image_ids']) for s in self.shards)
    self.metadata['complete'] = True
    self._save()
    for k in range(num_chunks):
      _record_path(self.directory, k).unlink(missing_ok=True)

  def _save(self) -> None:
    files.write_json_atomic(self.directory / METADATA_FILE, self.metadata)


def write_feature_store(
  out_dir: PathLike,
  features_NLD: np.ndarray,
  image_ids: Sequence[str],
  extractor_info: dict[str, Any],
  shard_size: int = 1024,
) -> FeatureStore:
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
    raise errors.UserError(
      f'features must be (N, L, D), got shape {features_NLD.shape}'
    )
  image_ids = [str(i) for i in image_ids]
  if len(image_ids) != len(features_NLD):
    raise errors.UserError(
      f'{len(image_ids)} image ids for {len(features_NLD)} feature grids'
    )
  if len(set(image_ids)) != len(image_ids):
    raise errors.UserError('image ids must be distinct')
  if 'name' not in extractor_info:
    raise errors.UserError("extractor_info needs a 'name'")
  _, num_locations, feature_dim = features_NLD.shape
  writer = StoreWriter(
    out_dir, dict(extractor_info), num_locations, feature_dim, shard_size
  )
  num_chunks = 0
  for k, start in enumerate(range(0, len(image_ids), shard_size)):
    ids = image_ids[start : start + shard_size]
    if not writer.is_done(k, ids):
      writer.write_shard(k, ids, features_NLD[start : start + shard_size], [])
    num_chunks += 1
  writer.finish(num_chunks)
  return FeatureStore.open(out_dir)
