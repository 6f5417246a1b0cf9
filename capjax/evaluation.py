"""Decoding a split's images and scoring the captions.

  report = evaluation.evaluate_split(workdir, 'test', beam_size=3)
  print(evaluation.format_report(report))

`evaluate_split` decodes every image of a split with a workdir's checkpoint,
scores the captions against all of each image's references with the COCO
caption evaluation (capjax.metrics.coco), and writes into the workdir, for
decoder NAME (`greedy`, `beam3`, ...):

  captions_{split}_{NAME}.json   COCO results format: [{image_id, caption}]
  metrics_{split}_{NAME}.json    the scores, their bootstrap intervals over
                                 the images, checkpoint step and settings
  comparison_{split}_{NAME}.json with `compare`: both models' scores on the
                                 same images and their paired differences

Decoding is capjax.captioning's, which training's periodic caption
metrics share.
"""

from collections.abc import Sequence
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
from capjax.metrics import bootstrap as bootstrap_lib
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


def _split_captions(
  trained: inference.TrainedModel,
  store: feature_store.FeatureStore,
  records: Sequence[datasets.Record],
  decoder: dict[str, Any],
  batch_size: int,
) -> dict[str, str]:
  return captioning.generate_captions(
    trained.params,
    trained.model,
    store,
    records,
    trained.vocab,
    max_len=decoder['max_len'],
    batch_size=batch_size,
    beam_size=decoder['beam_size'],
    alpha=decoder['alpha'],
  )


def _save_captions(path: pathlib.Path, captions: dict[str, str]) -> None:
  workdir_lib.save_json(
    path,
    [
      {'image_id': _coco_image_id(i), 'caption': c} for i, c in captions.items()
    ],
  )


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
  bootstrap: int = 0,
  seed: int = 0,
  compare: str | None = None,
  compare_step: int | None = None,
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
    bootstrap: resamples of the images for each score's 95% interval
      (capjax.metrics.bootstrap); 0: no intervals.
    seed: the resampling's seed.
    compare: another workdir, whose model captions the same images with the
      same decoder; the report's 'comparison' then holds both scores and
      their paired differences (this model minus that one). Needs
      bootstrap > 0.
    compare_step: that model's checkpoint, as `step`.

  Returns:
    The report written to metrics_{split}_{decoder}.json, with
    'comparison' (written to comparison_{split}_{decoder}.json) when
    comparing.
  """
  if compare and bootstrap <= 0:
    raise errors.UserError('--compare needs --bootstrap > 0 resamples')
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
  other = None
  if compare:
    # Loaded before decoding: a wrong path fails at once.
    other = inference.load_trained(compare, compare_step)
    feature_store.require_same_features(
      other.feature_info,
      store.describe(),
      expected_what=f'the features the model of {compare} was trained on',
      got_what=f'the features of split {split!r}',
    )
  name = decoder_name(beam_size, alpha)
  decoder = {
    'name': name,
    'beam_size': beam_size,
    'alpha': alpha,
    'max_len': max_len or decoding.max_caption_tokens(trained.config),
  }
  captions = _split_captions(trained, store, kept, decoder, batch_size)
  use_java = metrics.java_available()
  if not use_java:
    logging.warning(
      'Java not found: METEOR is left out and captions are '
      'tokenised without the PTB tokenizer, so the scores are '
      'close to, not equal to, the official ones. Install a '
      'Java runtime for the COCO evaluation proper.'
    )
  references = {r.image_id: r.captions for r in kept}
  scored = metrics.score_images(captions, references, use_java=use_java)

  # The split as a file name, made as its feature store's name is.
  tag = feature_store.file_name(split)
  out_dir = pathlib.Path(workdir)
  results_path = out_dir / f'captions_{tag}_{name}.json'
  _save_captions(results_path, captions)
  report = {
    'split': split,
    'step': trained.step,
    'num_images': len(kept),
    'decoder': decoder,
    'tokenizer': 'ptb' if use_java else 'simple',
    'metrics': scored.scores,
    'captions_file': results_path.name,
  }
  if bootstrap > 0:
    report['intervals'] = {
      m: list(v)
      for m, v in bootstrap_lib.intervals(scored, bootstrap, seed).items()
    }
    report['bootstrap'] = bootstrap_lib.describe(bootstrap, seed)
  workdir_lib.save_json(out_dir / f'metrics_{tag}_{name}.json', report)
  if other is not None:
    other_captions = _split_captions(other, store, kept, decoder, batch_size)
    other_scored = metrics.score_images(
      other_captions, references, use_java=use_java
    )
    other_path = out_dir / f'captions_{tag}_{name}_compared.json'
    _save_captions(other_path, other_captions)
    comparison = {
      'split': split,
      'num_images': len(kept),
      'decoder': decoder,
      'tokenizer': report['tokenizer'],
      'workdir': {'step': trained.step, 'metrics': scored.scores},
      'other': {
        'workdir': str(compare),
        'step': other.step,
        'metrics': other_scored.scores,
        'captions_file': other_path.name,
      },
      'difference': bootstrap_lib.paired_differences(
        scored, other_scored, bootstrap, seed
      ),
      'bootstrap': report['bootstrap'],
    }
    workdir_lib.save_json(out_dir / f'comparison_{tag}_{name}.json', comparison)
    report = dict(report, comparison=comparison)
  return report


def format_report(report: dict[str, Any]) -> str:
  """The scores as a two-column table under a one-line heading."""
  lines = [
    f'{report["split"]}: {report["num_images"]} images, '
    f'{report["decoder"]["name"]} decoding, checkpoint step '
    f'{report["step"]}, {report["tokenizer"]} tokenisation'
  ]
  intervals = report.get('intervals', {})
  if intervals:
    lines[0] += (
      f'; {report["bootstrap"]["level"]:.0%} bootstrap intervals over '
      f'images ({report["bootstrap"]["resamples"]} resamples)'
    )
  for name, value in report['metrics'].items():
    if name in intervals:
      lines.append(
        f'  {name:<8} {bootstrap_lib.format_interval(value, intervals[name])}'
      )
    else:
      lines.append(f'  {name:<8} {value:7.4f}')
  comparison = report.get('comparison')
  if comparison:
    other = comparison['other']
    lines.append(
      f'minus {other["workdir"]} (checkpoint step {other["step"]}) on the '
      'same images, paired bootstrap:'
    )
    lines.append(f'  {"":<8} {"other":>7}  {"difference [interval]"}')
    for name, diff in comparison['difference'].items():
      lines.append(
        f'  {name:<8} {other["metrics"][name]:7.4f}  '
        f'{bootstrap_lib.format_interval(diff["value"], diff)}'
      )
  return '\n'.join(lines)
