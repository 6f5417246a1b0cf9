"""Decoding a split's images and scoring the captions.

  report = evaluation.evaluate_split(workdir, 'test', beam_size=3)
  print(evaluation.format_report(report))

`evaluate_split` decodes every image of a split with a workdir's checkpoint,
scores the captions against all of each image's references with the COCO
caption evaluation (capjax.metrics.coco), and writes into the workdir, for
decoder NAME (`greedy`, `beam3`, ...):

  captions_{split}_{NAME}.json   COCO results format: [{image_id, caption}]
  metrics_{split}_{NAME}.json    the scores, checkpoint step and settings

Decoding is capjax.captioning's, which training's periodic caption
metrics share.
"""

import pathlib
from typing import Any

from absl import logging

from capjax import captioning
from capjax import errors
from capjax import inference
from capjax import workdir as workdir_lib
from capjax.data import datasets
from capjax.data import extraction
from capjax.data import feature_store
from capjax.metrics import coco as metrics
from capjax.model import decoding


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
  captions = captioning.generate_captions(
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
