"""What each step trains on and how: config.objective on either data path.

An `Objective` is the per-step input (`items`), the pure step over it and
the device arrays every step takes (`constants`). On the host path an
input is this process's numpy batch (capjax.data.input_pipeline,
capjax.data.reference_batches); on the device path (config.device_data,
capjax.training.device_data) it is only the batch's example ids, and the
step gathers the features and tokens from the resident tables. Both read
the same schedule, so a step sees the same batch, to the bit, on either.
Validation batches take the same path (`Evaluator`).
"""

from collections.abc import Callable, Iterator
import dataclasses
import functools
import itertools
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from capjax import errors
from capjax.data import input_pipeline
from capjax.data import reference_batches
from capjax.metrics import cider
from capjax.model import losses
from capjax.training import device_data
from capjax.training import parallel
from capjax.training import scst
from capjax.training import step as step_lib

Inputs = dict[str, np.ndarray]
# (this process's inputs of a step, the step's static key: its T)
Item = tuple[Inputs, int]


@dataclasses.dataclass(frozen=True)
class Objective:
  """A training objective on one data path.

  Attributes:
    items: start step -> the endless items of the steps from there on.
    gather: (global inputs, constants, key) -> the step's batch, pure; key
      is static (the item's). The host path's inputs are the batch.
    train: (state, batch, constants) -> (state, metric sums), pure.
    constants: device arrays every step takes (resident tables, idf).
    normalize: summed metrics -> the logged means.
    choice: the data path, and why.
  """

  items: Callable[[int], Iterator[Item]]
  gather: Callable
  train: Callable
  constants: dict[str, Any]
  normalize: Callable[[dict], dict[str, float]]
  choice: device_data.Choice

  def step(self, state, inputs, constants, key):
    """(state, metric sums) of one step on its inputs; pure."""
    return self.train(state, self.gather(inputs, constants, key), constants)


def _host_batch(batch, constants, key):
  del constants, key
  return batch


def _take(table: jax.Array, ids: jax.Array, mesh: Mesh) -> jax.Array:
  return device_data.gather_rows(table, ids, 'replicated', mesh)


@dataclasses.dataclass(frozen=True)
class _Grids:
  """Puts a store's grids in the chosen layout, and gathers from them."""

  layout: str
  mesh: Mesh

  def put(self, store) -> jax.Array:
    return device_data.put_table(
      store.read,
      len(store),
      (store.num_locations, store.feature_dim),
      store.dtype,
      self.layout,
      self.mesh,
    )

  def gather(self, grids: jax.Array, rows: jax.Array) -> jax.Array:
    return device_data.gather_rows(grids, rows, self.layout, self.mesh)


def _examples_constants(examples: input_pipeline.Examples, mesh: Mesh):
  return {
    'image_index': device_data.put_replicated(
      examples.image_index.astype(np.int32), mesh
    ),
    'tokens': device_data.put_replicated(examples.tokens, mesh),
  }


def _small_bytes(examples: input_pipeline.Examples) -> int:
  return examples.tokens.nbytes + 4 * len(examples)


def _row_bytes(store) -> int:
  return store.num_locations * store.feature_dim * store.dtype.itemsize


class Evaluator:
  """The validation loss over a fixed set, its batches gathered on the devices.

  The same batches as input_pipeline.EvalBatches: padding rows (id -1) get
  zero features and tokens, and so count for nothing.
  """

  def __init__(self, batches: input_pipeline.EvalBatches, model, grids, mesh):
    self._batches = batches
    self._grids = grids
    self._mesh = mesh
    store = batches.examples.store
    self.constants = dict(
      _examples_constants(batches.examples, mesh), grids=grids.put(store)
    )
    self._model = model

  def gather(self, ids, constants, length: int) -> dict[str, jax.Array]:
    """The features and tokens of a batch's ids (-1: padding); pure."""
    valid = ids >= 0
    safe = jnp.maximum(ids, 0)
    features = self._grids.gather(
      constants['grids'], _take(constants['image_index'], safe, self._mesh)
    )
    tokens = _take(constants['tokens'], safe, self._mesh)[:, :length]
    return {
      'features': jnp.where(valid[:, None, None], features, 0),
      'tokens': jnp.where(valid[:, None], tokens, 0),
    }

  def global_ids(self, index: int) -> tuple[jax.Array, int]:
    """(the ids of evaluation batch `index`, -1 for padding; its T)."""
    ids, length = self._batches.rows(index)
    local = np.full(self._batches.local_batch_size, -1, np.int32)
    local[: len(ids)] = ids
    (global_ids,) = parallel.global_batch({'ids': local}, self._mesh).values()
    return global_ids, length

  @functools.cache  # noqa: B019 (one Evaluator per run)
  def _step(self, length: int) -> Callable:
    def step(params, ids, constants):
      batch = self.gather(ids, constants, length)
      return step_lib.eval_step(params, batch, model=self._model)

    replicated = parallel.replicated(self._mesh)
    return jax.jit(
      step,
      in_shardings=(
        replicated,
        parallel.batch_sharded(self._mesh),
        jax.tree_util.tree_map(lambda a: a.sharding, self.constants),
      ),
      out_shardings=replicated,
    )

  def __call__(self, params: Any) -> dict[str, float]:
    totals = None
    for index in range(self._batches.num_batches):
      global_ids, length = self.global_ids(index)
      sums = jax.device_get(
        self._step(length)(params, global_ids, self.constants)
      )
      totals = (
        sums if totals is None else jax.tree_util.tree_map(np.add, totals, sums)
      )
    if totals is None:
      raise errors.UserError('the evaluation split is empty')
    return losses.normalize(totals)


def build(
  config, data, model, tx, mesh: Mesh, process: dict[str, int]
) -> tuple[Objective, Evaluator | None]:
  """The config's objective on its data path, and the device evaluator.

  Args:
    config: the run's config.
    data: capjax.training.loop.TrainingData.
    model: the Captioner.
    tx: the optimizer.
    mesh: the data mesh.
    process: process_index and process_count.

  Returns:
    (the objective, an Evaluator where validation runs on the devices, else
    None: the caller reads validation batches on the host).
  """
  if config.objective == 'xent':
    batches = input_pipeline.train_batches(
      config, data.train_store, data.train_records, data.vocab, **process
    )
    train_rows, small = len(data.train_store), _small_bytes(batches.examples)
  else:
    references = reference_batches.image_references(
      input_pipeline.make_examples(
        data.train_store, data.train_records, data.vocab, config.max_caption_len
      )
    )
    train_rows, small = len(data.train_store), references.references_MRT.nbytes
  eval_batches = input_pipeline.EvalBatches(
    input_pipeline.make_examples(
      data.eval_store, data.eval_records, data.vocab, config.max_caption_len
    ),
    batch_size=config.batch_size,
    bucket_lengths=config.bucket_lengths,
    num_examples=config.num_eval_examples,
    **process,
  )
  choice = device_data.decide(
    config,
    device_data.Tables(
      grid_rows=(train_rows, len(data.eval_store)),
      grid_row_bytes=_row_bytes(data.train_store),
      small_bytes=small + _small_bytes(eval_batches.examples),
    ),
    mesh,
  )
  grids = _Grids(choice.layout, mesh) if choice.on else None
  if config.objective == 'xent':
    objective = _xent(config, batches, model, tx, grids, choice)
  else:
    objective = _scst(
      config,
      references,
      data.vocab.size,
      model,
      tx,
      mesh,
      grids,
      choice,
      process,
    )
  evaluator = Evaluator(eval_batches, model, grids, mesh) if grids else None
  return objective, evaluator


def _xent(config, batches, model, tx, grids, choice) -> Objective:
  # Batches grouped by length hold very different token counts: dividing
  # by a fixed count keeps every token's weight (losses.caption_loss).
  normalizer = (
    batches.schedule.mean_batch_tokens if config.group_by_length else None
  )
  train_step = functools.partial(
    step_lib.train_step,
    model=model,
    tx=tx,
    attention_penalty=config.attention_penalty,
    token_normalizer=normalizer,
  )
  train = lambda state, batch, constants: train_step(state, batch)
  if grids is None:
    return Objective(
      lambda start: (
        (b, b['tokens'].shape[1]) for b in batches.iterator(start)
      ),
      _host_batch,
      train,
      {},
      losses.normalize,
      choice,
    )
  examples = batches.examples
  mesh = grids.mesh
  constants = dict(
    _examples_constants(examples, mesh), grids=grids.put(examples.store)
  )

  def items(start: int) -> Iterator[Item]:
    for step in itertools.count(start):
      _, example_ids, length = batches.schedule.rows(step)
      yield {'ids': example_ids.astype(np.int32)}, length

  def gather(inputs, constants, length):
    ids = inputs['ids']
    rows = _take(constants['image_index'], ids, mesh)
    return {
      'features': grids.gather(constants['grids'], rows),
      'tokens': _take(constants['tokens'], ids, mesh)[:, :length],
    }

  return Objective(items, gather, train, constants, losses.normalize, choice)


def _scst(
  config, references, vocab_size, model, tx, mesh, grids, choice, process
) -> Objective:
  # SCST's idf comes from the training references (Rennie et al.).
  doc_freqs = jax.device_put(
    cider.document_frequencies(references.references_MRT, vocab_size),
    parallel.replicated(mesh),
  )
  batches = reference_batches.ImageBatches(
    references,
    batch_size=config.batch_size,
    seed=config.seed,
    cache_features=config.cache_features and grids is None,
    **process,
  )
  scst_step = scst.make_step(model, tx, config)
  logging.info(
    'SCST on %d training images: %d samples each, %s baseline',
    len(references),
    config.scst_samples,
    config.scst_baseline,
  )
  train = lambda state, batch, constants: scst_step(
    state, batch, constants['doc_freqs']
  )
  if grids is None:
    return Objective(
      lambda start: ((b, 0) for b in batches.iterator(start)),
      _host_batch,
      train,
      {'doc_freqs': doc_freqs},
      scst.normalize,
      choice,
    )
  constants = {
    'doc_freqs': doc_freqs,
    'grids': grids.put(references.store),
    'rows_M': device_data.put_replicated(
      references.rows_M.astype(np.int32), mesh
    ),
    'references_MRT': device_data.put_replicated(
      references.references_MRT, mesh
    ),
  }

  def items(start: int) -> Iterator[Item]:
    for step in itertools.count(start):
      yield {'images': batches.images(step).astype(np.int32)}, 0

  def gather(inputs, constants, key):
    del key
    images = inputs['images']
    references_BRT = _take(constants['references_MRT'], images, mesh)
    return {
      'features': grids.gather(
        constants['grids'], _take(constants['rows_M'], images, mesh)
      ),
      'references': references_BRT,
      'reference_mask': jnp.any(references_BRT != 0, axis=-1),
    }

  return Objective(items, gather, train, constants, scst.normalize, choice)
