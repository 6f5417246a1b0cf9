"""Training's periodic evaluation: the loss and the caption metrics.

Every evaluation scores the same examples of the evaluation split: the loss
and token accuracy over `config.num_eval_examples` of its captions, on every
device, and, with `config.num_caption_eval_images`, greedy BLEU-4 and CIDEr
of its first images, decoded by process 0.
"""

from collections.abc import Callable, Iterator, Sequence
import functools
from typing import Any

import jax
import ml_collections
import numpy as np

from capjax import captioning
from capjax import errors
from capjax.data import datasets
from capjax.data import feature_store
from capjax.data import input_pipeline
from capjax.data import vocab as vocab_lib
from capjax.model import captioner
from capjax.model import losses
from capjax.training import parallel
from capjax.training import step as step_lib


def evaluate_loss(
  params: Any, batches: Iterator[dict], p_eval_step: Callable, mesh
) -> dict[str, float]:
  """Loss and token accuracy over a fixed evaluation set."""
  totals = None
  for batch in batches:
    batch = {k: batch[k] for k in ('features', 'tokens')}
    sums = jax.device_get(
      p_eval_step(params, parallel.global_batch(batch, mesh))
    )
    totals = (
      sums if totals is None else jax.tree_util.tree_map(np.add, totals, sums)
    )
  if totals is None:
    raise errors.UserError('the evaluation split is empty')
  return losses.normalize(totals)


class Validator:
  """Scores parameters on the evaluation split; the same on every process."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    model: captioner.Captioner,
    mesh,
    vocab: vocab_lib.Vocab,
    store: feature_store.FeatureStore,
    records: Sequence[datasets.Record],
    device_loss: Callable[[Any], dict[str, float]] | None = None,
  ):
    """device_loss: the loss over batches gathered on the devices, if any."""
    self._config = config
    self._device_loss = device_loss
    self._model = model
    self._mesh = mesh
    self._vocab = vocab
    self._store = store
    self._records = records
    replicated = parallel.replicated(mesh)
    self._p_eval_step = jax.jit(
      functools.partial(step_lib.eval_step, model=model),
      in_shardings=(replicated, parallel.batch_sharded(mesh)),
      out_shardings=replicated,
    )

  def _batches(self) -> Iterator[dict]:
    return input_pipeline.eval_iterator(
      self._config,
      self._store,
      self._records,
      self._vocab,
      num_examples=self._config.num_eval_examples,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )

  def _caption_scores(self, params: Any) -> dict[str, float]:
    """Greedy BLEU-4 and CIDEr on the first validation images, on process 0.

    The replicated parameters are whole on every process, so process 0
    decodes alone, on its own device, while the others wait at the next step.
    """
    if jax.process_index() != 0:
      return {}
    return captioning.caption_metrics(
      jax.device_get(params),
      self._model,
      self._store,
      self._records,
      self._vocab,
      self._config,
      self._config.num_caption_eval_images,
    )

  def __call__(self, params: Any) -> dict[str, float]:
    """The loss, token accuracy and, if configured, the caption metrics."""
    scores = (
      self._device_loss(params)
      if self._device_loss
      else evaluate_loss(params, self._batches(), self._p_eval_step, self._mesh)
    )
    if self._config.num_caption_eval_images:
      scores.update(
        parallel.agreed(
          'computing the caption metrics',
          lambda: self._caption_scores(params),
        )
      )
    return scores
