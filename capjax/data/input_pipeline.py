"""Batches of (image features, caption tokens) from a feature store.

One example is one (image, caption) pair. A batch is a dict of numpy arrays:

  features  (b, L, D)  the feature store's dtype (float16)
  tokens    (b, T)     int32: <start> w1 ... wn <end>, then <pad> = 0

where b = global batch // process_count is this process's slice of the global
batch, and T is the smallest of config.bucket_lengths that fits the longest
caption of the *global* batch (see capjax.data.schedule).

Training batches follow capjax.data.schedule, a pure function of (seed,
step), so a resumed job gets exactly the batches of an uninterrupted one.

An image's features are read at most once per epoch: the features of a block
are read together (in a background thread, one block ahead) and kept while its
batches are made. With config.cache_features, all features are read into
memory once instead.

Evaluation batches cover the examples in a fixed order (the records' order,
captions in order). The final batch is padded to the full batch size: padding
rows have all-zero features and tokens and `mask` 0; evaluation batches carry
`mask` (b,) float32 and `image_index` (b,) int32 (the example's row in the
feature store, -1 for padding).

TensorFlow (tf.data) runs the batch functions in parallel and prefetches;
the calling program must hide its GPUs from TensorFlow where JAX uses them.
"""

import collections
from collections.abc import Callable, Iterator, Sequence
import concurrent.futures
import dataclasses
import threading

from absl import logging
import numpy as np
import numpy.typing as npt

from capjax.data import datasets
from capjax.data import feature_store
from capjax.data import schedule
from capjax.data import vocab as vocab_lib

Batch = dict[str, np.ndarray]

# Batches made in parallel by tf.data, and blocks kept in memory: a block
# holds at least schedule.MIN_BLOCK_BATCHES batches, so the few batches in
# flight never need more than the previous, current and next block.
_NUM_PARALLEL_BATCHES = 4
_BLOCKS_KEPT = 3
_PREFETCH_BATCHES = 2


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
  """Every (image, caption) pair of a split, tokenized.

  Attributes:
    store: the split's features.
    image_index: (N,) int64 row of each example's image in `store`.
    tokens: (N, max_len) int32 caption ids, <pad>-padded.
    lengths: (N,) int32 caption lengths with <start> and <end>.
  """

  store: feature_store.FeatureStore
  image_index: np.ndarray
  tokens: np.ndarray
  lengths: np.ndarray

  def __len__(self) -> int:
    return len(self.image_index)


def make_examples(
  store: feature_store.FeatureStore,
  records: Sequence[datasets.Record],
  vocab: vocab_lib.Vocab,
  max_len: int,
  captions_per_image: int | None = None,
) -> Examples:
  """Tokenizes the captions of the records whose images have features.

  Args:
    store: the split's features.
    records: the split's records.
    vocab: the vocabulary.
    max_len: the most tokens per caption (config.max_caption_len).
    captions_per_image: keep only the first this many captions of each image
      (None: all).

  Returns:
    Examples in record order, captions in order. Records without features
    (images that could not be read) are left out, with a warning.
  """
  kept = store.with_features(records)
  captions = [
    (i, c) for i, r in enumerate(kept) for c in r.captions[:captions_per_image]
  ]
  rows = store.index_of([r.image_id for r in kept])
  tokens = np.zeros((len(captions), max_len), np.int32)
  lengths = np.zeros(len(captions), np.int32)
  for n, (_, caption) in enumerate(captions):
    ids = vocab.encode(caption, max_len)
    tokens[n, : len(ids)] = ids
    lengths[n] = len(ids)
  image_index = (
    rows[[i for i, _ in captions]] if captions else np.zeros(0, np.int64)
  )
  return Examples(store, image_index, tokens, lengths)


class TrainBatches:
  """The training batches of one process: the schedule's examples, features."""

  def __init__(
    self,
    examples: Examples,
    batch_schedule: schedule.BatchSchedule,
    *,
    cache_features: bool,
  ):
    """See the module docstring.

    Args:
      examples: the training examples.
      batch_schedule: the examples of each step, made from `examples`.
      cache_features: read all features into memory once.
    """
    self._examples = examples
    self.schedule = batch_schedule
    self._cache_features = cache_features
    self._lock = threading.Lock()
    self._blocks: collections.OrderedDict[
      tuple[int, int], concurrent.futures.Future
    ] = collections.OrderedDict()
    self._reader = concurrent.futures.ThreadPoolExecutor(1)
    self._all_features: np.ndarray | None = None

  @property
  def examples(self) -> Examples:
    return self._examples

  def _read_block(
    self, epoch: int, block: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """(sorted store rows, their features) this process needs in a block."""
    example_ids = self.schedule.block_examples(epoch, block)
    rows = np.unique(self._examples.image_index[example_ids])
    return rows, self._examples.store.read(rows)

  def _block(self, epoch: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """A block's features, read once and the next block read ahead."""
    following = (
      (epoch, block + 1)
      if block + 1 < self.schedule.num_blocks(epoch)
      else (epoch + 1, 0)
    )
    with self._lock:
      for key in ((epoch, block), following):
        if key not in self._blocks:
          self._blocks[key] = self._reader.submit(self._read_block, *key)
        # The blocks in use are the newest, so eviction spares them.
        self._blocks.move_to_end(key)
      future = self._blocks[(epoch, block)]
      while len(self._blocks) > _BLOCKS_KEPT:
        self._blocks.popitem(last=False)
    return future.result()

  def _features(
    self, epoch: int, positions: np.ndarray, example_ids: np.ndarray
  ) -> np.ndarray:
    rows = self._examples.image_index[example_ids]
    store = self._examples.store
    if self._cache_features:
      with self._lock:
        if self._all_features is None:
          logging.info(
            'Reading all %d feature grids (%.1f GB) into memory '
            '(config.cache_features)',
            len(store),
            len(store)
            * store.num_locations
            * store.feature_dim
            * store.dtype.itemsize
            / 1e9,
          )
          self._all_features = store.read_all()
      return self._all_features[rows]
    blocks = self.schedule.blocks_of(epoch, positions)
    if blocks[0] == blocks[-1]:  # the usual case: one copy, no assembly
      block_rows, block_features = self._block(epoch, int(blocks[0]))
      return block_features[np.searchsorted(block_rows, rows)]
    out = np.empty(
      (len(rows), store.num_locations, store.feature_dim), store.dtype
    )
    for block in np.unique(blocks):
      block_rows, block_features = self._block(epoch, int(block))
      sel = blocks == block
      out[sel] = block_features[np.searchsorted(block_rows, rows[sel])]
    return out

  def batch(self, step: int) -> Batch:
    """This process's slice of the global batch of `step`."""
    positions, example_ids, length = self.schedule.rows(step)
    epoch = step // self.schedule.steps_per_epoch
    return {
      'features': self._features(epoch, positions, example_ids),
      'tokens': self._examples.tokens[example_ids, :length],
    }

  def iterator(self, start_step: int = 0) -> Iterator[Batch]:
    """Endless batches from `start_step` on."""
    return tf_iterator(
      self.batch,
      start_step,
      None,
      ('features', 'tokens'),
      (self._examples.store.dtype, np.int32),
    )


class EvalBatches:
  """The evaluation batches of one process, in a fixed order."""

  def __init__(
    self,
    examples: Examples,
    *,
    batch_size: int,
    bucket_lengths: Sequence[int],
    process_index: int = 0,
    process_count: int = 1,
    num_examples: int = 0,
  ):
    """See the module docstring; num_examples > 0 keeps only the first ones."""
    schedule.check_process(process_index, process_count)
    self._local = schedule.local_batch_size(batch_size, process_count)
    self._examples = examples
    self._batch_size = batch_size
    self._buckets = tuple(bucket_lengths)
    self._process_index = process_index
    self.num_examples = (
      min(num_examples, len(examples)) if num_examples > 0 else len(examples)
    )
    self.num_batches = -(-self.num_examples // batch_size)
    self.local_batch_size = self._local

  @property
  def examples(self) -> Examples:
    return self._examples

  def rows(self, index: int) -> tuple[np.ndarray, int]:
    """(this process's example ids of batch `index`, its T).

    The ids are those of the real rows; the batch has local batch size rows,
    the rest padding.
    """
    if not 0 <= index < self.num_batches:
      raise ValueError(f'batch index {index} not in [0, {self.num_batches})')
    start = index * self._batch_size
    stop = min(start + self._batch_size, self.num_examples)
    length = schedule.bucket_length(
      int(self._examples.lengths[start:stop].max()), self._buckets
    )
    local_start = start + self._process_index * self._local
    return np.arange(local_start, min(local_start + self._local, stop)), length

  def batch(self, index: int) -> Batch:
    """This process's slice of global evaluation batch `index`."""
    ids, length = self.rows(index)
    store = self._examples.store
    real = len(ids)
    features = np.zeros(
      (self._local, store.num_locations, store.feature_dim), store.dtype
    )
    tokens = np.zeros((self._local, length), np.int32)
    image_index = np.full(self._local, -1, np.int32)
    if real:
      rows = self._examples.image_index[ids]
      unique, inverse = np.unique(rows, return_inverse=True)
      features[:real] = store.read(unique)[inverse]
      tokens[:real] = self._examples.tokens[ids, :length]
      image_index[:real] = rows
    mask = (np.arange(self._local) < real).astype(np.float32)
    return {
      'features': features,
      'tokens': tokens,
      'mask': mask,
      'image_index': image_index,
    }

  def iterator(self) -> Iterator[Batch]:
    """All evaluation batches, once."""
    return tf_iterator(
      self.batch,
      0,
      self.num_batches,
      ('features', 'tokens', 'mask', 'image_index'),
      (self._examples.store.dtype, np.int32, np.float32, np.int32),
    )


def tf_iterator(
  batch_fn: Callable[[int], Batch],
  start: int,
  stop: int | None,
  keys: Sequence[str],
  dtypes: Sequence[npt.DTypeLike],
) -> Iterator[Batch]:
  """batch_fn(start), batch_fn(start + 1), ... made by tf.data in parallel."""
  import tensorflow as tf  # noqa: PLC0415

  def numpy_fn(step):
    batch = batch_fn(int(step))
    return tuple(batch[k] for k in keys)

  def tf_fn(step):
    return tuple(
      tf.numpy_function(
        numpy_fn, [step], [tf.as_dtype(d) for d in dtypes], stateful=False
      )
    )

  ds = tf.data.Dataset.range(start, stop if stop is not None else 2**62)
  ds = ds.map(
    tf_fn, num_parallel_calls=_NUM_PARALLEL_BATCHES, deterministic=True
  ).prefetch(_PREFETCH_BATCHES)
  for values in ds.as_numpy_iterator():
    yield dict(zip(keys, values))


def train_batches(
  config,
  store: feature_store.FeatureStore,
  records: Sequence[datasets.Record],
  vocab: vocab_lib.Vocab,
  *,
  process_index: int = 0,
  process_count: int = 1,
) -> TrainBatches:
  """The training batches of this process (see the module docstring).

  Args:
    config: batch_size (global), seed, max_caption_len, bucket_lengths,
      shuffle_buffer, cache_features, group_by_length.
    store: the training split's features.
    records: the training split's records.
    vocab: the vocabulary.
    process_index: this process (jax.process_index()).
    process_count: all processes (jax.process_count()).
  """
  examples = make_examples(store, records, vocab, config.max_caption_len)
  batch_schedule = schedule.BatchSchedule(
    examples.lengths,
    examples.image_index,
    batch_size=config.batch_size,
    seed=config.seed,
    bucket_lengths=config.bucket_lengths,
    shuffle_buffer=config.shuffle_buffer,
    group_by_length=config.group_by_length,
    process_index=process_index,
    process_count=process_count,
  )
  return TrainBatches(
    examples, batch_schedule, cache_features=config.cache_features
  )


def eval_iterator(
  config,
  store: feature_store.FeatureStore,
  records: Sequence[datasets.Record],
  vocab: vocab_lib.Vocab,
  *,
  process_index: int = 0,
  process_count: int = 1,
  num_examples: int = 0,
  captions_per_image: int | None = None,
) -> Iterator[Batch]:
  """One pass over the evaluation examples (see the module docstring).

  Args:
    config: batch_size (global), max_caption_len, bucket_lengths.
    store: the evaluation split's features.
    records: the evaluation split's records.
    vocab: the vocabulary.
    process_index: this process.
    process_count: all processes.
    num_examples: use only the first this many examples (0: all).
    captions_per_image: 1 gives one example per image, e.g. for generating
      captions; None uses every caption.
  """
  examples = make_examples(
    store, records, vocab, config.max_caption_len, captions_per_image
  )
  return EvalBatches(
    examples,
    batch_size=config.batch_size,
    bucket_lengths=config.bucket_lengths,
    process_index=process_index,
    process_count=process_count,
    num_examples=num_examples,
  ).iterator()
