"""Batches of (image features, caption tokens) from a feature store.

One example is one (image, caption) pair. A batch is a dict of numpy arrays:

  features  (b, L, D)  the feature store's dtype (float16)
  tokens    (b, T)     int32: <start> w1 ... wn <end>, then <pad> = 0

where b = global batch // process_count is this process's slice of the global
batch (rows [i * b, (i + 1) * b) of it for process i), and T is the smallest of
config.bucket_lengths that fits the longest caption of the *global* batch, so
all processes agree on the shape and there are few shapes to compile.

Training batches are a pure function of (seed, step), so a job resumed at step
s gets exactly the batches an uninterrupted job would have, without touching
the earlier epochs' data:

- each epoch shuffles the images with a permutation drawn from (seed, epoch),
  groups them in that order into blocks of at least `shuffle_buffer` examples
  (and of at least 16 batches), and shuffles the examples within each block,
  so an image's captions land in different batches;
- with group_by_length (config.group_by_length), each block is instead sorted
  by caption length (ties in random order), cut into batches, and the batches
  that lie wholly inside the block are shuffled among themselves: a batch
  then holds captions of about one length and pads little, while the lengths
  still come in random order;
- an epoch is its first (num_examples // batch_size) * batch_size examples,
  batched in order (each epoch drops a different remainder);
- step s reads epoch s // steps_per_epoch, batch s % steps_per_epoch.

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

from collections.abc import Iterator, Sequence
import collections
import concurrent.futures
import dataclasses
import threading
from typing import Callable

from absl import logging
import numpy as np

from capjax import datasets
from capjax import features as features_lib
from capjax import vocab as vocab_lib

Batch = dict[str, np.ndarray]

# Batches made in parallel by tf.data, and blocks kept in memory: a block
# holds at least _MIN_BLOCK_BATCHES batches, so the few batches in flight
# never need more than the previous, current and next block.
_NUM_PARALLEL_BATCHES = 4
_MIN_BLOCK_BATCHES = 16
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
  store: features_lib.FeatureStore
  image_index: np.ndarray
  tokens: np.ndarray
  lengths: np.ndarray

  def __len__(self) -> int:
    return len(self.image_index)


def make_examples(store: features_lib.FeatureStore,
                  records: Sequence[datasets.Record], vocab: vocab_lib.Vocab,
                  max_len: int,
                  captions_per_image: int | None = None) -> Examples:
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
  kept = [r for r in records if r.image_id in store]
  if len(kept) < len(records):
    missing = next(r.image_id for r in records if r.image_id not in store)
    logging.warning('%d of %d images have no features and are left out, '
                    'e.g. %r', len(records) - len(kept), len(records), missing)
  captions = [(i, c) for i, r in enumerate(kept)
              for c in r.captions[:captions_per_image]]
  rows = store.index_of([r.image_id for r in kept])
  tokens = np.zeros((len(captions), max_len), np.int32)
  lengths = np.zeros(len(captions), np.int32)
  for n, (_, caption) in enumerate(captions):
    ids = vocab.encode(caption, max_len)
    tokens[n, :len(ids)] = ids
    lengths[n] = len(ids)
  image_index = rows[[i for i, _ in captions]] if captions else np.zeros(
      0, np.int64)
  return Examples(store, image_index, tokens, lengths)


def bucket_length(max_length: int, bucket_lengths: Sequence[int]) -> int:
  """The smallest bucket length >= max_length."""
  for length in sorted(bucket_lengths):
    if length >= max_length:
      return length
  raise ValueError(f'a caption of {max_length} tokens fits no bucket of '
                   f'{tuple(bucket_lengths)}; the largest bucket must be at '
                   'least config.max_caption_len')


def process_batch_size(global_batch_size: int, process_count: int) -> int:
  """This process's share of the global batch."""
  if global_batch_size % process_count:
    raise ValueError(f'batch_size {global_batch_size} does not divide over '
                     f'{process_count} processes')
  return global_batch_size // process_count


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in '
                     f'[0, {process_count})')


class TrainBatches:
  """The training batches of one process, as a function of the step."""

  def __init__(self, examples: Examples, *, batch_size: int, seed: int,
               bucket_lengths: Sequence[int], shuffle_buffer: int,
               cache_features: bool, group_by_length: bool = False,
               process_index: int = 0, process_count: int = 1):
    """See the module docstring.

    Args:
      examples: the training examples.
      batch_size: the global batch size.
      seed: seeds the example order.
      bucket_lengths: allowed caption lengths T.
      shuffle_buffer: examples per shuffling block, at least.
      cache_features: read all features into memory once.
      group_by_length: batch captions of similar length together.
      process_index: this process.
      process_count: processes sharing each global batch.
    """
    _check_process(process_index, process_count)
    self._local = process_batch_size(batch_size, process_count)
    if len(examples) < batch_size:
      raise ValueError(f'{len(examples)} training examples do not make one '
                       f'batch of {batch_size}')
    self._examples = examples
    self._batch_size = batch_size
    self._seed = seed
    self._buckets = tuple(bucket_lengths)
    self._block_examples = max(shuffle_buffer, _MIN_BLOCK_BATCHES * batch_size)
    self._cache_features = cache_features
    self._group_by_length = group_by_length
    self._process_index = process_index
    self.steps_per_epoch = len(examples) // batch_size
    # Examples grouped by image: those of image `unique_images[j]` are
    # `by_image[starts[j]:starts[j] + counts[j]]`.
    self._by_image = np.argsort(examples.image_index, kind='stable')
    self._unique_images, self._starts, self._counts = np.unique(
        examples.image_index[self._by_image], return_index=True,
        return_counts=True)
    self._lock = threading.Lock()
    self._orders: collections.OrderedDict[
        int, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
    self._blocks: collections.OrderedDict[
        tuple[int, int], concurrent.futures.Future] = collections.OrderedDict()
    self._reader = concurrent.futures.ThreadPoolExecutor(1)
    self._all_features: np.ndarray | None = None

  def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(order (N,) example ids, block_starts (num_blocks + 1,) positions)."""
    with self._lock:
      if epoch in self._orders:
        self._orders.move_to_end(epoch)
        return self._orders[epoch]
    rng = np.random.default_rng([self._seed, epoch])
    perm = rng.permutation(len(self._unique_images))
    counts = self._counts[perm]
    # Each image's first position if the permuted images' examples were laid
    # out image after image; its block is where that position falls.
    first = np.cumsum(counts) - counts
    offsets = np.arange(counts.sum()) - np.repeat(first, counts)
    grouped = self._by_image[np.repeat(self._starts[perm], counts) + offsets]
    block = np.repeat(first // self._block_examples, counts)
    if self._group_by_length:
      lengths = self._examples.lengths[grouped]
      order = grouped[np.lexsort((rng.random(len(grouped)), lengths, block))]
      order = self._shuffle_batches_within_blocks(order, block, rng)
    else:
      order = grouped[np.lexsort((rng.random(len(grouped)), block))]
    block_starts = np.searchsorted(block, np.arange(block[-1] + 2))
    with self._lock:
      self._orders[epoch] = (order, block_starts)
      while len(self._orders) > 2:
        self._orders.popitem(last=False)
    return order, block_starts

  def _shuffle_batches_within_blocks(self, order: np.ndarray,
                                     block: np.ndarray,
                                     rng: np.random.Generator) -> np.ndarray:
    """Reorders the batches that lie wholly inside a block among themselves.

    Args:
      order: example ids, grouped by block (and sorted within each).
      block: (N,) the block of each position of `order`, non-decreasing.
      rng: the epoch's generator.
    """
    num_batches = len(order) // self._batch_size
    first = np.arange(num_batches) * self._batch_size
    first_block, last_block = block[first], block[first + self._batch_size - 1]
    inside = np.flatnonzero(first_block == last_block)
    # Sorting the inside batches by (block, random key) permutes each block's
    # batches among the positions that block's inside batches occupy.
    shuffled = inside[np.lexsort((rng.random(len(inside)),
                                  first_block[inside]))]
    batch_order = np.arange(num_batches)
    batch_order[inside] = shuffled
    used = num_batches * self._batch_size
    batches = order[:used].reshape(num_batches, self._batch_size)
    return np.concatenate([batches[batch_order].reshape(-1), order[used:]])

  def caption_length(self, step: int) -> int:
    """T of the global batch of `step`: the bucket of its longest caption."""
    epoch, i = divmod(step, self.steps_per_epoch)
    order, _ = self.epoch_order(epoch)
    batch = order[i * self._batch_size:(i + 1) * self._batch_size]
    return bucket_length(int(self._examples.lengths[batch].max()),
                         self._buckets)

  def _rows(self, step: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(this process's positions in the epoch, its example ids, T)."""
    epoch, i = divmod(step, self.steps_per_epoch)
    order, _ = self.epoch_order(epoch)
    start = i * self._batch_size + self._process_index * self._local
    positions = np.arange(start, start + self._local)
    return positions, order[positions], self.caption_length(step)

  def _read_block(self, epoch: int, block: int) -> tuple[np.ndarray,
                                                         np.ndarray]:
    """(sorted store rows, their features) this process needs in a block."""
    order, block_starts = self.epoch_order(epoch)
    used = self.steps_per_epoch * self._batch_size
    positions = np.arange(block_starts[block], min(block_starts[block + 1],
                                                     used))
    mine = positions[(positions % self._batch_size) // self._local
                     == self._process_index]
    rows = np.unique(self._examples.image_index[order[mine]])
    return rows, self._examples.store.read(rows)

  def _block(self, epoch: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """A block's features, read once and the next block read ahead."""
    num_blocks = len(self.epoch_order(epoch)[1]) - 1
    following = (epoch, block + 1) if block + 1 < num_blocks else (epoch + 1, 0)
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

  def _features(self, epoch: int, positions: np.ndarray,
                example_ids: np.ndarray) -> np.ndarray:
    rows = self._examples.image_index[example_ids]
    if self._cache_features:
      with self._lock:
        if self._all_features is None:
          store = self._examples.store
          logging.info('Reading all %d feature grids (%.1f GB) into memory '
                       '(config.cache_features)', len(store),
                       len(store) * store.num_locations * store.feature_dim
                       * store.dtype.itemsize / 1e9)
          self._all_features = store.read_all()
      return self._all_features[rows]
    _, block_starts = self.epoch_order(epoch)
    blocks = np.searchsorted(block_starts, positions, side='right') - 1
    if blocks[0] == blocks[-1]:  # the usual case: one copy, no assembly
      block_rows, block_features = self._block(epoch, int(blocks[0]))
      return block_features[np.searchsorted(block_rows, rows)]
    out = np.empty((len(rows), self._examples.store.num_locations,
                    self._examples.store.feature_dim),
                   self._examples.store.dtype)
    for block in np.unique(blocks):
      block_rows, block_features = self._block(epoch, int(block))
      sel = blocks == block
      out[sel] = block_features[np.searchsorted(block_rows, rows[sel])]
    return out

  def batch(self, step: int) -> Batch:
    """This process's slice of the global batch of `step`."""
    if step < 0:
      raise ValueError(f'step must be >= 0, got {step}')
    positions, example_ids, length = self._rows(step)
    epoch = step // self.steps_per_epoch
    return {'features': self._features(epoch, positions, example_ids),
            'tokens': self._examples.tokens[example_ids, :length]}

  def iterator(self, start_step: int = 0) -> Iterator[Batch]:
    """Endless batches from `start_step` on."""
    return _tf_iterator(self.batch, start_step, None, ('features', 'tokens'),
                        (self._examples.store.dtype, np.int32))


class EvalBatches:
  """The evaluation batches of one process, in a fixed order."""

  def __init__(self, examples: Examples, *, batch_size: int,
               bucket_lengths: Sequence[int], process_index: int = 0,
               process_count: int = 1, num_examples: int = 0):
    """See the module docstring; num_examples > 0 keeps only the first ones."""
    _check_process(process_index, process_count)
    self._local = process_batch_size(batch_size, process_count)
    self._examples = examples
    self._batch_size = batch_size
    self._buckets = tuple(bucket_lengths)
    self._process_index = process_index
    self.num_examples = (min(num_examples, len(examples)) if num_examples > 0
                         else len(examples))
    self.num_batches = -(-self.num_examples // batch_size)

  def batch(self, index: int) -> Batch:
    """This process's slice of global evaluation batch `index`."""
    if not 0 <= index < self.num_batches:
      raise ValueError(f'batch index {index} not in [0, {self.num_batches})')
    start = index * self._batch_size
    stop = min(start + self._batch_size, self.num_examples)
    length = bucket_length(int(self._examples.lengths[start:stop].max()),
                           self._buckets)
    local_start = start + self._process_index * self._local
    ids = np.arange(local_start, min(local_start + self._local, stop))
    store = self._examples.store
    real = len(ids)
    features = np.zeros((self._local, store.num_locations, store.feature_dim),
                        store.dtype)
    tokens = np.zeros((self._local, length), np.int32)
    image_index = np.full(self._local, -1, np.int32)
    if real:
      rows = self._examples.image_index[ids]
      unique, inverse = np.unique(rows, return_inverse=True)
      features[:real] = store.read(unique)[inverse]
      tokens[:real] = self._examples.tokens[ids, :length]
      image_index[:real] = rows
    mask = (np.arange(self._local) < real).astype(np.float32)
    return {'features': features, 'tokens': tokens, 'mask': mask,
            'image_index': image_index}

  def iterator(self) -> Iterator[Batch]:
    """All evaluation batches, once."""
    return _tf_iterator(
        self.batch, 0, self.num_batches,
        ('features', 'tokens', 'mask', 'image_index'),
        (self._examples.store.dtype, np.int32, np.float32, np.int32))


def _tf_iterator(batch_fn: Callable[[int], Batch], start: int,
                 stop: int | None, keys: Sequence[str],
                 dtypes: Sequence[np.dtype]) -> Iterator[Batch]:
  """batch_fn(start), batch_fn(start + 1), ... made by tf.data in parallel."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def numpy_fn(step):
    batch = batch_fn(int(step))
    return tuple(batch[k] for k in keys)

  def tf_fn(step):
    return tuple(tf.numpy_function(numpy_fn, [step],
                                   [tf.as_dtype(d) for d in dtypes],
                                   stateful=False))

  ds = tf.data.Dataset.range(start, stop if stop is not None else 2**62)
  ds = ds.map(tf_fn, num_parallel_calls=_NUM_PARALLEL_BATCHES,
              deterministic=True).prefetch(_PREFETCH_BATCHES)
  for values in ds.as_numpy_iterator():
    yield dict(zip(keys, values))


def train_iterator(config, store: features_lib.FeatureStore,
                   records: Sequence[datasets.Record],
                   vocab: vocab_lib.Vocab, *, start_step: int = 0,
                   process_index: int = 0,
                   process_count: int = 1) -> Iterator[Batch]:
  """Endless training batches from `start_step` on (see the module docstring).

  Args:
    config: batch_size (global), seed, max_caption_len, bucket_lengths,
      shuffle_buffer, cache_features, group_by_length.
    store: the training split's features.
    records: the training split's records.
    vocab: the vocabulary.
    start_step: the first step to make a batch for.
    process_index: this process (jax.process_index()).
    process_count: all processes (jax.process_count()).
  """
  examples = make_examples(store, records, vocab, config.max_caption_len)
  return TrainBatches(
      examples, batch_size=config.batch_size, seed=config.seed,
      bucket_lengths=config.bucket_lengths,
      shuffle_buffer=config.shuffle_buffer,
      cache_features=config.cache_features,
      group_by_length=config.group_by_length, process_index=process_index,
      process_count=process_count).iterator(start_step)


def eval_iterator(config, store: features_lib.FeatureStore,
                  records: Sequence[datasets.Record], vocab: vocab_lib.Vocab,
                  *, process_index: int = 0, process_count: int = 1,
                  num_examples: int = 0,
                  captions_per_image: int | None = None) -> Iterator[Batch]:
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
  examples = make_examples(store, records, vocab, config.max_caption_len,
                           captions_per_image)
  return EvalBatches(
      examples, batch_size=config.batch_size,
      bucket_lengths=config.bucket_lengths, process_index=process_index,
      process_count=process_count, num_examples=num_examples).iterator()
