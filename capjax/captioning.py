"""Captions for the images of a feature store, and their quick scores.

  captions = captioning.generate_captions(params, model, store, records,
                                          vocab, max_len=20, batch_size=64)

`generate_captions` decodes in fixed-shape batches; `caption_metrics` scores
greedy captions with BLEU-4 and CIDEr, without Java, for training's periodic
evaluation. `capjax.evaluation` decodes and scores a whole split properly.
"""

from collections.abc import Sequence
from typing import Any, cast

import jax
import ml_collections
import numpy as np

from capjax.data import datasets
from capjax.data import feature_store
from capjax.data import vocab as vocab_lib
from capjax.metrics import bootstrap as bootstrap_lib
from capjax.metrics import coco as metrics
from capjax.model import captioner
from capjax.model import decoding


def generate_captions(
  params: Any,
  model: captioner.Captioner,
  store: feature_store.FeatureStore,
  records: Sequence[datasets.Record],
  vocab: vocab_lib.Vocab,
  *,
  max_len: int,
  batch_size: int,
  beam_size: int = 1,
  alpha: float = 0.0,
) -> dict[str, str]:
  """One caption per record's image, decoded in batches: {image_id: text}.

  Every batch has the same shape (the last is padded), so decoding compiles
  once; all batches are dispatched before the first is read back.

  Raises:
    UserError: an image is not in the store.
  """
  rows = store.index_of(r.image_id for r in records)
  batch_size = max(1, min(batch_size, len(rows)))
  tokens = []
  for start in range(0, len(rows), batch_size):
    features_BLD = store.read(rows[start : start + batch_size])
    padding = batch_size - len(features_BLD)
    features_BLD = np.pad(features_BLD, ((0, padding), (0, 0), (0, 0)))
    tokens.append(
      decoding.caption_features(
        params,
        # jit takes NumPy arrays too; caption_features is annotated jax.Array.
        cast(jax.Array, features_BLD),
        model=model,
        max_len=max_len,
        beam_size=beam_size,
        alpha=alpha,
      ).tokens_BT
    )
  tokens_NT = np.concatenate(jax.device_get(tokens))[: len(rows)]
  return dict(zip((r.image_id for r in records), vocab.decode_rows(tokens_NT)))


def caption_metrics(
  params: Any,
  model: captioner.Captioner,
  store: feature_store.FeatureStore,
  records: Sequence[datasets.Record],
  vocab: vocab_lib.Vocab,
  config: ml_collections.ConfigDict,
  num_images: int,
) -> dict[str, float]:
  """Greedy BLEU-4 and CIDEr on the first num_images images (0: all).

  For training's periodic evaluation: no Java is started (captions are
  tokenised as the vocabulary tokenises them), so the numbers track
  progress but are close to, not equal to, `capjax.evaluate`'s. Images
  missing from the store (unreadable ones) are skipped.

  Returns:
    {'bleu4': ..., 'cider': ...}; with config.best_rule 'last_within' also
    each one's 95% bootstrap interval over the images, as 'bleu4_low',
    'bleu4_high', 'cider_low' and 'cider_high' (1000 resamples, seed 0).
  """
  records = store.with_features(records)
  if num_images:
    records = records[:num_images]
  captions = generate_captions(
    params,
    model,
    store,
    records,
    vocab,
    max_len=decoding.max_caption_tokens(config),
    batch_size=config.batch_size,
  )
  scored = metrics.score_images(
    captions,
    {r.image_id: r.captions for r in records},
    metrics=('Bleu_4', 'CIDEr'),
    use_java=False,
  )
  names = {'Bleu_4': 'bleu4', 'CIDEr': 'cider'}
  out = {names[m]: v for m, v in scored.scores.items()}
  if config.best_rule == 'last_within':
    for m, (low, high) in bootstrap_lib.intervals(scored, 1000, 0).items():
      out[f'{names[m]}_low'], out[f'{names[m]}_high'] = low, high
  return out
