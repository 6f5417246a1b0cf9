"""Decoding a split's images and scoring the captions.

  report = evaluation.evaluate_split(workdir, 'test', beam_size=3)
  print(evaluation.format_report(report))

`evaluate_split` decodes every image of a split with a workdir's checkpoint,
scores the captions against all of each image's references with the COCO
caption evaluation (capjax.metrics.coco), and writes into the workdir, for
decoder NAME (`greedy`, `beam3`, ...):

  captions_{split}_{NAME}.json   COCO results format: [{image_id, caption}]
  metrics_{split}_{NAME}.json    the scores, checkpoint step and settings

`caption_metrics` is training's quicker periodic version.
"""

from collections.abc import Sequence
import pathlib
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from capjax import errors
from capjax import inference
from capjax import workdir as workdir_lib
from capjax.data import datasets
from capjax.data import extraction
from capjax.data import feature_store
from capjax.data import vocab as vocab_lib
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
        features_BLD,
        model=model,
        max_len=max_len,
        beam_size=beam_size,
        alpha=alpha,
      ).tokens_BT
    )
  tokens_NT = np.concatenate(jax.device_get(tokens))[: len(rows)]
  return dict(
    zip((r.image_id for r in records), decoding.texts(tokens_NT, vocab))
  )


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
    {'bleu4': ..., 'cider': ...}
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
  scores = metrics.score_captions(
    captions,
    {r.image_id: r.captions for r in records},
    metrics=('Bleu_4', 'CIDEr'),
    use_java=False,
  )
  return {'bleu4': scores['Bleu_4'], 'cider': scores['CIDEr']}


def decoder_name(beam_size: int, alpha: float) -> str:
  """'greedy', 'beam3', 'beam3_alpha0.6': names the output files."""
  if beam_size == 1:
    return 'greedy'
  return f'beam{beam_size}' + (f'_alpha{alpha:g}' if alpha else '')


def _coco_image_id(image_id: str) -> int | str:
  """COCO results carry integer ids; other sources keep their names."""
  return int(image_id) if image_id.isdigit() else image_id


def _split_features(
  trained: inference.TrainedModel, split: str, workdir: str
) -> feature_store.FeatureStore:
  """The split's feature store, checked against the model's features."""
  config = trained.config
  store = extraction.open_or_extract(
    config, split, feature_store.resolve_feature_dir(config, workdir)
  )
  feature_store.require_same_features(
    trained.feature_info,
    store.describe(),
    expected_what='the features the model was trained on',
    got_what=f'the features of split {split!r}',
  )
  return store


def evaluate_split(
  workdir: str,
  split: str,
  *,
  beam_size: int = 1,
  alpha: float = 0.0,
  batch_size: int = 64,
  max_len: int | None = None,
  num_images: int = 0,
  step: int | None = None,
) -> dict[str, Any]:
  """Decodes and scores a split; writes the captions and the report.

  Args:
    workdir: a trained workdir.
    split: the split to caption, named as the workdir's dataset names it.
    beam_size: 1 for greedy search.
    alpha: beam search's length normalisation.
    batch_size: images decoded at once.
    max_len: the most tokens per caption; default: the config's.
    num_images: caption only the split's first images (0: all).
    step: the checkpoint's step; None for the best, else the newest.

  Returns:
    The report written to metrics_{split}_{decoder}.json.
  """
  trained = inference.load_trained(workdir, step)
  records = datasets.load_split(trained.config, split)
  store = _split_features(trained, split, str(workdir))
  kept = store.with_features(records, split)
  if num_images:
    kept = kept[:num_images]
  if not kept:
    raise errors.UserError(
      f'split {split!r} has no image with features to caption'
    )
  max_len = max_len or decoding.max_caption_tokens(trained.config)
  captions = generate_captions(
    trained.params,
    trained.model,
    store,
    kept,
    trained.vocab,
    max_len=max_len,
    batch_size=batch_size,
    beam_size=beam_size,
    alpha=alpha,
  )
  use_java = metrics.java_available()
  if not use_java:
    logging.warning(
      'Java not found: METEOR is left out and captions are '
      'tokenised without the PTB tokenizer, so the scores are '
      'close to, not equal to, the official ones. Install a '
      'Java runtime for the COCO evaluation proper.'
    )
  scores = metrics.score_captions(
    captions, {r.image_id: r.captions for r in kept}, use_java=use_java
  )

  name = decoder_name(beam_size, alpha)
  # The split as a file name, made as its feature store's name is.
  tag = feature_store.file_name(split)
  workdir = pathlib.Path(workdir)
  results_path = workdir / f'captions_{tag}_{name}.json'
  workdir_lib.save_json(
    results_path,
    [
      {'image_id': _coco_image_id(i), 'caption': c} for i, c in captions.items()
    ],
  )
  report = {
    'split': split,
    'step': trained.step,
    'num_images': len(kept),
    'decoder': {
      'name': name,
      'beam_size': beam_size,
      'alpha': alpha,
      'max_len': max_len,
    },
    'tokenizer': 'ptb' if use_java else 'simple',
    'metrics': scores,
    'captions_file': results_path.name,
  }
  workdir_lib.save_json(workdir / f'metrics_{tag}_{name}.json', report)
  return report


def format_report(report: dict[str, Any]) -> str:
  """The scores as a two-column table under a one-line heading."""
  lines = [
    f'{report["split"]}: {report["num_images"]} images, '
    f'{report["decoder"]["name"]} decoding, checkpoint step '
    f'{report["step"]}, {report["tokenizer"]} tokenisation'
  ]
  lines += [
    f'  {name:<8} {value:7.4f}' for name, value in report['metrics'].items()
  ]
  return '\n'.join(lines)
