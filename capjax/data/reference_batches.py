"""Batches of images with all of their reference captions, for SCST.

Cross-entropy training sees one (image, caption) pair per example
(capjax.data.input_pipeline); self-critical training samples captions of an
image and scores them against every reference of that image. Its batch is a
dict of numpy arrays:

  features        (b, L, D)  the feature store's dtype
  references      (b, R, T)  int32: <start> w1 ... wn <end>, then <pad> = 0;
                             R = the most captions of any image
  reference_mask  (b, R)     bool: which reference rows are real

where b = global batch // process_count is this process's slice. Each epoch
visits the images in a new order, a pure function of (seed, epoch), so a
resumed job gets exactly the batches of an uninterrupted one; the last
incomplete batch of an epoch is dropped.
"""

from collections.abc import Iterator
import dataclasses

import numpy as np

from capjax import errors
from capjax.data import feature_store
from capjax.data import input_pipeline
from capjax.data import schedule

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class ImageReferences:
  """Every image of a split with its tokenized reference captions.

  Attributes:
    store: the split's features.
    rows_M: (M,) each image's row in `store`, ascending.
    references_MRT: (M, R, T) int32 reference ids, <pad>-padded rows and
      columns; T is the longest reference.
  """

  store: feature_store.FeatureStore
  rows_M: np.ndarray
  references_MRT: np.ndarray

  def __len__(self) -> int:
    return len(self.rows_M)


def image_references(examples: input_pipeline.Examples) -> ImageReferences:
  """Groups a split's examples by image."""
  rows_M, counts_M = np.unique(examples.image_index, return_counts=True)
  by_image = np.argsort(examples.image_index, kind='stable')
  length = int(examples.lengths.max()) if len(examples) else 1
  references_MRT = np.zeros(
    (len(rows_M), int(counts_M.max(initial=1)), length), np.int32
  )
  starts_M = np.concatenate([[0], np.cumsum(counts_M)[:-1]])
  for m, (start, count) in enumerate(zip(starts_M, counts_M)):
    references_MRT[m, :count] = examples.tokens[
      by_image[start : start + count], :length
    ]
  return ImageReferences(examples.store, rows_M, references_MRT)


class ImageBatches:
  """The SCST batches of one process: images and their references."""

  def __init__(
    self,
    references: ImageReferences,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    cache_features: bool = False,
  ):
    """See the module docstring.

    Args:
      references: the training images and their references.
      batch_size: the global batch size, in images.
      seed: seeds the image order.
      process_index: this process.
      process_count: processes sharing each global batch.
      cache_features: read all features into memory once.

    Raises:
      UserError: fewer images than one batch.
    """
    schedule.check_process(process_index, process_count)
    self._local = schedule.local_batch_size(batch_size, process_count)
    if len(references) < batch_size:
      raise errors.UserError(
        f'{len(references)} training images do not make '
        f'one batch of {batch_size}'
      )
    self._references = references
    self._batch_size = batch_size
    self._seed = seed
    self._process_index = process_index
    self.steps_per_epoch = len(references) // batch_size
    self._all_features = references.store.read_all() if cache_features else None

  @property
  def references(self) -> ImageReferences:
    return self._references

  def images(self, step: int) -> np.ndarray:
    """This process's images of a step, as indices into `references`."""
    epoch, position = divmod(step, self.steps_per_epoch)
    order = np.random.default_rng([self._seed, epoch]).permutation(
      len(self._references)
    )
    start = position * self._batch_size + self._process_index * self._local
    return order[start : start + self._local]

  def batch(self, step: int) -> Batch:
    """This process's slice of the global batch of `step`."""
    images = self.images(step)
    rows = self._references.rows_M[images]
    if self._all_features is not None:
      features = self._all_features[rows]
    else:
      unique, inverse = np.unique(rows, return_inverse=True)
      features = self._references.store.read(unique)[inverse]
    references = self._references.references_MRT[images]
    return {
      'features': features,
      'references': references,
      'reference_mask': np.any(references != 0, axis=-1),
    }

  def iterator(self, start_step: int = 0) -> Iterator[Batch]:
    """Endless batches from `start_step` on."""
    return input_pipeline.tf_iterator(
      self.batch,
      start_step,
      None,
      ('features', 'references', 'reference_mask'),
      (self._references.store.dtype, np.int32, np.bool_),
    )
