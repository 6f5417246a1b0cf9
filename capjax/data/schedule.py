"""The examples of each training step's batch: a pure function of (seed, step).

A job resumed at step s gets exactly the batches an uninterrupted job would
have had, without touching the earlier epochs' data:

- each epoch shuffles the images with a permutation drawn from (seed, epoch),
  groups them in that order into blocks of at least `shuffle_buffer` examples
  (and of at least 16 batches), and shuffles the examples within each block,
  so an image's captions land in different batches;
- with group_by_length, each block is instead sorted by caption length (ties
  in random order), cut into batches, and the batches that lie wholly inside
  the block are shuffled among themselves: a batch then holds captions of
  about one length and pads little, while the lengths still come in random
  order;
- an epoch is its first (num_examples // batch_size) * batch_size examples,
  batched in order (each epoch drops a different remainder);
- step s reads epoch s // steps_per_epoch, batch s % steps_per_epoch;
- process i of n takes rows [i * b, (i + 1) * b) of each global batch, with
  b = batch_size // n;
- T is the smallest of bucket_lengths that fits the longest caption of the
  global batch, so all processes agree on the shape.

Only example lengths and images are needed, never features:
capjax.data.input_pipeline reads the features the schedule asks for.
"""

import collections
from collections.abc import Sequence
import threading

import numpy as np

from capjax import errors

# A block holds at least this many batches, so that the few batches in
# flight never need more than the previous, current and next block.
MIN_BLOCK_BATCHES = 16


def bucket_length(max_length: int, bucket_lengths: Sequence[int]) -> int:
  """The smallest bucket length >= max_length."""
  for length in sorted(bucket_lengths):
    if length >= max_length:
      return length
  raise errors.UserError(
    f'a caption of {max_length} tokens fits no bucket of '
    f'{tuple(bucket_lengths)}; the largest bucket must be at least '
    'config.max_caption_len'
  )


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """This process's share of the global batch."""
  if global_batch_size % process_count:
    raise errors.UserError(
      f'batch_size {global_batch_size} does not divide '
      f'over {process_count} processes'
    )
  return global_batch_size // process_count


def check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(
      f'process_index {process_index} is not in [0, {process_count})'
    )


class BatchSchedule:
  """The example ids and caption length of each step's batch, per process."""

  def __init__(
    self,
    lengths: np.ndarray,
    image_index: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    bucket_lengths: Sequence[int],
    shuffle_buffer: int,
    group_by_length: bool = False,
    process_index: int = 0,
    process_count: int = 1,
  ):
    """See the module docstring.

    Args:
      lengths: (N,) caption lengths of the examples, <start> and <end> in.
      image_index: (N,) the image of each example (any integer ids).
      batch_size: the global batch size.
      seed: seeds the example order.
      bucket_lengths: allowed caption lengths T.
      shuffle_buffer: examples per shuffling block, at least.
      group_by_length: batch captions of similar length together.
      process_index: this process.
      process_count: processes sharing each global batch.
    """
    check_process(process_index, process_count)
    self.local_batch_size = local_batch_size(batch_size, process_count)
    if len(lengths) < batch_size:
      raise errors.UserError(
        f'{len(lengths)} training examples do not make '
        f'one batch of {batch_size}'
      )
    self._lengths = np.asarray(lengths)
    self.batch_size = batch_size
    self._seed = seed
    self._buckets = tuple(bucket_lengths)
    self._block_examples = max(shuffle_buffer, MIN_BLOCK_BATCHES * batch_size)
    self._group_by_length = group_by_length
    self.process_index = process_index
    self.steps_per_epoch = len(lengths) // batch_size
    # Examples grouped by image: those of image `unique_images[j]` are
    # `by_image[starts[j]:starts[j] + counts[j]]`.
    self._by_image = np.argsort(image_index, kind='stable')
    self._unique_images, self._starts, self._counts = np.unique(
      np.asarray(image_index)[self._by_image],
      return_index=True,
      return_counts=True,
    )
    self._lock = threading.Lock()
    self._orders: collections.OrderedDict[
      int, tuple[np.ndarray, np.ndarray]
    ] = collections.OrderedDict()

  @property
  def mean_batch_tokens(self) -> float:
    """The expected count of target tokens (<end> in, <start> out) per batch."""
    return self.batch_size * float(np.mean(self._lengths - 1))

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
      lengths = self._lengths[grouped]
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

  def _shuffle_batches_within_blocks(
    self, order: np.ndarray, block: np.ndarray, rng: np.random.Generator
  ) -> np.ndarray:
    """Reorders the batches that lie wholly inside a block among themselves.

    Args:
      order: example ids, grouped by block (and sorted within each).
      block: (N,) the block of each position of `order`, non-decreasing.
      rng: the epoch's generator.
    """
    num_batches = len(order) // self.batch_size
    first = np.arange(num_batches) * self.batch_size
    first_block, last_block = block[first], block[first + self.batch_size - 1]
    inside = np.flatnonzero(first_block == last_block)
    # Sorting the inside batches by (block, random key) permutes each block's
    # batches among the positions that block's inside batches occupy.
    shuffled = inside[
      np.lexsort((rng.random(len(inside)), first_block[inside]))
    ]
    batch_order = np.arange(num_batches)
    batch_order[inside] = shuffled
    used = num_batches * self.batch_size
    batches = order[:used].reshape(num_batches, self.batch_size)
    return np.concatenate([batches[batch_order].reshape(-1), order[used:]])

  def caption_length(self, step: int) -> int:
    """T of the global batch of `step`: the bucket of its longest caption."""
    epoch, i = divmod(step, self.steps_per_epoch)
    order, _ = self.epoch_order(epoch)
    batch = order[i * self.batch_size : (i + 1) * self.batch_size]
    return bucket_length(int(self._lengths[batch].max()), self._buckets)

  def rows(self, step: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(this process's positions in the epoch, its example ids, T)."""
    if step < 0:
      raise ValueError(f'step must be >= 0, got {step}')
    epoch, i = divmod(step, self.steps_per_epoch)
    order, _ = self.epoch_order(epoch)
    start = i * self.batch_size + self.process_index * self.local_batch_size
    positions = np.arange(start, start + self.local_batch_size)
    return positions, order[positions], self.caption_length(step)

  def block_examples(self, epoch: int, block: int) -> np.ndarray:
    """The example ids this process uses in a block of an epoch."""
    order, block_starts = self.epoch_order(epoch)
    used = self.steps_per_epoch * self.batch_size
    positions = np.arange(
      block_starts[block], min(block_starts[block + 1], used)
    )
    mine = positions[
      (positions % self.batch_size) // self.local_batch_size
      == self.process_index
    ]
    return order[mine]

  def num_blocks(self, epoch: int) -> int:
    return len(self.epoch_order(epoch)[1]) - 1

  def blocks_of(self, epoch: int, positions: np.ndarray) -> np.ndarray:
    """The block of each position of an epoch."""
    _, block_starts = self.epoch_order(epoch)
    return np.searchsorted(block_starts, positions, side='right') - 1
