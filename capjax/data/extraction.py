"""The extraction job: a split's images through an extractor into a store.

Each distinct image is decoded and run once, in batches, with the images of
the next batch decoded on a thread pool meanwhile. A rerun checks each
shard already written against the data and skips it, so an interrupted
extraction resumes. Unreadable images are skipped and listed at the end
(delete the store to retry them).

Several processes (`Processes`) share a job shard by shard: process i of n
extracts shards i, i + n, i + 2n, ... into the same store, and process 0
completes the store once every process is done. The store is the one a
single process writes, byte for byte.
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
import concurrent.futures
import dataclasses
import itertools
import os
import time
from typing import Any

from absl import logging
import numpy as np

from capjax import config_checks
from capjax import errors
from capjax.data import datasets
from capjax.data import extractors
from capjax.data import feature_store
from capjax.data import images

_LOG_EVERY_SECONDS = 10.0
_MAX_FAILURES_LISTED = 50


@dataclasses.dataclass(frozen=True)
class Processes:
  """The processes sharing one extraction, as this process sees them.

  Attributes:
    index: this process, in [0, count).
    count: how many processes share the job.
    agree: `agree(activity, fn)` runs fn here and returns its result once
      every process has run its own; if fn raised on any process, it raises
      on all (`capjax.training.parallel.agreed`). Every process calls it at
      the same points.
  """

  index: int = 0
  count: int = 1
  agree: Callable[[str, Callable[[], Any]], Any] = lambda activity, fn: fn()

  def owns(self, k: int) -> bool:
    """Whether shard k is this process's to extract."""
    return k % self.count == self.index


def _chunks(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
  iterator = iter(iterable)
  while chunk := list(itertools.islice(iterator, size)):
    yield chunk


class _Progress:
  """Logs images done and images/s now and then, and once at the end."""

  def __init__(self, name: str):
    self._name = name
    self._start = self._last = time.monotonic()
    self.done = self.skipped = self.failed = 0

  def update(
    self, done: int = 0, skipped: int = 0, failed: int = 0, final: bool = False
  ) -> None:
    self.done += done
    self.skipped += skipped
    self.failed += failed
    now = time.monotonic()
    if final or now - self._last >= _LOG_EVERY_SECONDS:
      self._last = now
      rate = self.done / max(now - self._start, 1e-9)
      logging.info(
        '%s: %d images extracted (%.1f images/s), %d unreadable, '
        '%d already done%s',
        self._name,
        self.done,
        rate,
        self.failed,
        self.skipped,
        ', finished' if final else '',
      )


def _prepare(
  extractor: extractors.Extractor, source: str | bytes
) -> np.ndarray:
  return extractor.prepare(images.load_image(source))


def _extract_chunk(
  extractor: extractors.Extractor,
  chunk: Sequence[tuple[str, str | bytes]],
  batch_size: int,
  pool: concurrent.futures.Executor,
  progress: _Progress,
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
    prepared = []
    for (image_id, _), future in zip(batch, futures):
      try:
        prepared.append(future.result())
        ids.append(image_id)
      # Whatever an image's bytes make the decoder raise, one bad image must
      # not stop a long extraction: it is reported and skipped.
      except Exception as e:  # noqa: BLE001
        failed.append((image_id, f'{type(e).__name__}: {e}'))
    if prepared:
      features.append(extractor.features_fn(np.stack(prepared)))
    progress.update(done=len(prepared), failed=len(batch) - len(prepared))
  empty = np.zeros((0, extractor.num_locations, extractor.feature_dim))
  return ids, np.concatenate(features) if features else empty, failed


def _log_failures(writer: feature_store.StoreWriter, part: str) -> None:
  failures = [
    (f['image_id'], f['error']) for s in writer.shards for f in s['failed']
  ]
  if not failures:
    return
  listed = '\n'.join(f'  {i}: {e}' for i, e in failures[:_MAX_FAILURES_LISTED])
  more = len(failures) - _MAX_FAILURES_LISTED
  logging.warning(
    '%d images of %r could not be read and were skipped:\n%s%s',
    len(failures),
    part,
    listed,
    f'\n  ... and {more} more (see {writer.directory}/'
    f'{feature_store.METADATA_FILE})'
    if more > 0
    else '',
  )


def _extract_own_shards(
  config,
  part: str,
  extractor: extractors.Extractor,
  writer: feature_store.StoreWriter,
  processes: Processes,
) -> int:
  """Writes the part's shards that are this process's; the shard count."""
  name = f'features of {part!r}'
  if processes.count > 1:
    name += f' on process {processes.index} of {processes.count}'
  progress = _Progress(name)
  num_chunks = 0
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    for k, chunk in enumerate(
      _chunks(datasets.iter_images(config, part), config.shard_size)
    ):
      num_chunks += 1
      if not processes.owns(k):
        continue
      if writer.is_done(k, [image_id for image_id, _ in chunk]):
        progress.update(skipped=len(chunk))
        continue
      ids, features_NLD, failed = _extract_chunk(
        extractor, chunk, config.extract_batch_size, pool, progress
      )
      writer.write_shard(k, ids, features_NLD, failed)
  progress.update(final=True)
  return num_chunks


def extract_split(
  config,
  split: str,
  feature_dir: feature_store.PathLike,
  extractor: extractors.Extractor | None = None,
  processes: Processes = Processes(),
) -> feature_store.FeatureStore:
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
    processes: the processes sharing the job; by default this one alone.
      Every process calls `extract_split` with the same arguments.

  Returns:
    The split's features, opened.
  """
  extractor = extractor or extractors.make_extractor(config)
  for part in config_checks.split_names(split, config.dataset):
    _extract_part(
      config,
      part,
      feature_store.store_dir(feature_dir, part),
      extractor,
      processes,
    )
  return feature_store.FeatureStore.open_split(feature_dir, split)


def _extract_part(
  config,
  part: str,
  directory: feature_store.PathLike,
  extractor: extractors.Extractor,
  processes: Processes,
) -> None:
  """One part's store, written by every process, completed by process 0."""
  writer = processes.agree(
    f'opening the feature store of {part!r}',
    lambda: feature_store.StoreWriter(
      directory,
      extractor.info,
      extractor.num_locations,
      extractor.feature_dim,
      config.shard_size,
    ),
  )
  num_chunks = processes.agree(
    f'extracting the features of {part!r}',
    lambda: _extract_own_shards(config, part, extractor, writer, processes),
  )
  # `agree` returned: every shard exists, so one process lists them.
  is_first = processes.index == 0
  processes.agree(
    f'completing the feature store of {part!r}',
    lambda: writer.finish(num_chunks) if is_first else None,
  )
  if is_first:
    _log_failures(writer, part)


def open_or_extract(
  config, split: str, feature_dir: feature_store.PathLike
) -> feature_store.FeatureStore:
  """A split's feature store; `shapes`, cheap to featurise, extracts its own.

  Raises:
    UserError: the store is missing or incomplete (for other datasets),
      with the command that extracts it.
  """
  try:
    return feature_store.FeatureStore.open_split(feature_dir, split)
  except errors.UserError as e:
    if config.dataset != 'shapes':
      raise errors.UserError(
        f'{e}; extract them with the same config: `python -m '
        f'capjax.features --config <config> --split {split} '
        f'--feature_dir {feature_dir}`'
      ) from None
  logging.info(
    'extracting %s features of the shapes %r split', config.extractor, split
  )
  return extract_split(config, split, feature_dir)


def check_made_by_config(store: feature_store.FeatureStore, config) -> None:
  """Raises if a capjax extractor other than the config's made the store.

  Stores of features from elsewhere (`write_feature_store`) pass: no config
  extractor can remake them anyway.
  """
  made = store.extractor
  if made.get('name') not in config_checks.CHOICES['extractor']:
    return
  wanted = extractors.config_extractor_info(config)
  if any(made.get(key) != value for key, value in wanted.items()):
    raise errors.UserError(
      f'the features in the store were made by {made}, but the config asks '
      f'for {wanted}: use another --config.feature_dir, or the settings '
      'the store was made with'
    )
