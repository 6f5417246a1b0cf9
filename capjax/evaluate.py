r"""Caption metrics of a split: `python -m capjax.evaluate --workdir DIR`.

Decodes every image of a split (default: test) with the workdir's latest
checkpoint and scores the captions against all of each image's references
with the COCO caption evaluation (see capjax.metrics):

  python -m capjax.evaluate --workdir /tmp/capjax-demo --split test
  python -m capjax.evaluate --workdir /tmp/coco --split val --beam_size 3

Writes into the workdir, for decoder NAME (`greedy`, `beam3`, ...):

  captions_{split}_{NAME}.json   COCO results format: [{image_id, caption}]
  metrics_{split}_{NAME}.json    the scores, checkpoint step and settings

and prints the scores. The split's features come from the feature store
(`features.json`'s extractor); for `shapes` they are extracted when absent.
Without Java, METEOR is left out and captions are tokenised without PTB.
"""

from collections.abc import Sequence
import pathlib
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from capjax import datasets
from capjax import decode
from capjax import features as features_lib
from capjax import metrics
from capjax import models
from capjax import reporting
from capjax import sample
from capjax import vocab as vocab_lib
from capjax import workdir as workdir_lib


def generate_captions(params: Any, model: models.Captioner,
                      store: features_lib.FeatureStore,
                      records: Sequence[datasets.Record],
                      vocab: vocab_lib.Vocab, *, max_len: int,
                      batch_size: int, beam_size: int = 1,
                      alpha: float = 0.0) -> dict[str, str]:
  """One caption per record's image, decoded in batches: {image_id: text}.

  Every batch has the same shape (the last is padded), so decoding compiles
  once; all batches are dispatched before the first is read back.

  Raises:
    ValueError: an image is not in the store.
  """
  rows = store.index_of(r.image_id for r in records)
  batch_size = max(1, min(batch_size, len(rows)))
  tokens = []
  for start in range(0, len(rows), batch_size):
    features_BLD = store.read(rows[start:start + batch_size])
    padding = batch_size - len(features_BLD)
    features_BLD = np.pad(features_BLD, ((0, padding), (0, 0), (0, 0)))
    tokens.append(decode.caption_features(
        params, features_BLD, model=model, max_len=max_len,
        beam_size=beam_size, alpha=alpha).tokens_BT)
  tokens_NT = np.concatenate(jax.device_get(tokens))[:len(rows)]
  return dict(zip((r.image_id for r in records),
                  decode.texts(tokens_NT, vocab)))


def caption_metrics(params: Any, model: models.Captioner,
                    store: features_lib.FeatureStore,
                    records: Sequence[datasets.Record],
                    vocab: vocab_lib.Vocab, config: ml_collections.ConfigDict,
                    num_images: int) -> dict[str, float]:
  """Greedy BLEU-4 and CIDEr on the first num_images images (0: all).

  For training's periodic evaluation: no Java is started (captions are
  tokenised as the vocabulary tokenises them), so the numbers track
  progress but are close to, not equal to, `capjax.evaluate`'s. Images
  missing from the store (unreadable ones) are skipped.

  Returns:
    {'bleu4': ..., 'cider': ...}
  """
  records = [r for r in records if r.image_id in store]
  if num_images:
    records = records[:num_images]
  captions = generate_captions(
      params, model, store, records, vocab,
      max_len=decode.max_caption_tokens(config), batch_size=config.batch_size)
  scores = metrics.score_captions(
      captions, {r.image_id: r.captions for r in records},
      metrics=('Bleu_4', 'CIDEr'), use_java=False)
  return {'bleu4': scores['Bleu_4'], 'cider': scores['CIDEr']}


def decoder_name(beam_size: int, alpha: float) -> str:
  """'greedy', 'beam3', 'beam3_alpha0.6': names the output files."""
  if beam_size == 1:
    return 'greedy'
  return f'beam{beam_size}' + (f'_alpha{alpha:g}' if alpha else '')


def _coco_image_id(image_id: str) -> int | str:
  """COCO results carry integer ids; other sources keep their names."""
  return int(image_id) if image_id.isdigit() else image_id


def _split_features(trained: sample.TrainedModel, split: str,
                    workdir: str) -> features_lib.FeatureStore:
  """The split's feature store, checked against the model's features."""
  config = trained.config
  store = features_lib.open_or_extract(
      config, split, features_lib.resolve_feature_dir(config, workdir))
  info = features_lib.describe(store)
  if info != trained.feature_info:
    raise ValueError(f'the features of split {split!r} ({info}) are not those '
                     f'the model was trained on ({trained.feature_info})')
  return store


def evaluate_split(workdir: str, split: str, *, beam_size: int = 1,
                   alpha: float = 0.0, batch_size: int = 64,
                   max_len: int | None = None,
                   num_images: int = 0) -> dict[str, Any]:
  """Decodes and scores a split; writes the captions and the report.

  Args:
    workdir: a trained workdir.
    split: the split to caption, named as the workdir's dataset names it.
    beam_size: 1 for greedy search.
    alpha: beam search's length normalisation.
    batch_size: images decoded at once.
    max_len: the most tokens per caption; default: the config's.
    num_images: caption only the split's first images (0: all).

  Returns:
    The report written to metrics_{split}_{decoder}.json.
  """
  trained = sample.load_trained(workdir)
  records = datasets.load_split(trained.config, split)
  store = _split_features(trained, split, str(workdir))
  kept = [r for r in records if r.image_id in store]
  if len(kept) < len(records):
    logging.warning('%d images of %r have no features (unreadable) and are '
                    'left out', len(records) - len(kept), split)
  if num_images:
    kept = kept[:num_images]
  if not kept:
    raise ValueError(f'split {split!r} has no image with features to caption')
  max_len = max_len or decode.max_caption_tokens(trained.config)
  captions = generate_captions(
      trained.params, trained.model, store, kept, trained.vocab,
      max_len=max_len, batch_size=batch_size, beam_size=beam_size,
      alpha=alpha)
  use_java = metrics.java_available()
  if not use_java:
    logging.warning('Java not found: METEOR is left out and captions are '
                    'tokenised without the PTB tokenizer, so the scores are '
                    'close to, not equal to, the official ones. Install a '
                    'Java runtime for the COCO evaluation proper.')
  scores = metrics.score_captions(
      captions, {r.image_id: r.captions for r in kept}, use_java=use_java)

  name = decoder_name(beam_size, alpha)
  # The split as a file name, made as its feature store's name is.
  tag = features_lib.store_dir('', split.replace('+', '_'))
  workdir = pathlib.Path(workdir)
  results_path = workdir / f'captions_{tag}_{name}.json'
  workdir_lib.save_json(results_path, [
      {'image_id': _coco_image_id(i), 'caption': c}
      for i, c in captions.items()])
  report = {
      'split': split, 'step': trained.step, 'num_images': len(kept),
      'decoder': {'name': name, 'beam_size': beam_size, 'alpha': alpha,
                  'max_len': max_len},
      'tokenizer': 'ptb' if use_java else 'simple',
      'metrics': scores, 'captions_file': results_path.name,
  }
  workdir_lib.save_json(workdir / f'metrics_{tag}_{name}.json', report)
  return report


def format_report(report: dict[str, Any]) -> str:
  """The scores as a two-column table under a one-line heading."""
  lines = [f"{report['split']}: {report['num_images']} images, "
           f"{report['decoder']['name']} decoding, checkpoint step "
           f"{report['step']}, {report['tokenizer']} tokenisation"]
  lines += [f'  {name:<8} {value:7.4f}'
            for name, value in report['metrics'].items()]
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  reporting.concise_console_logging()
  # TensorFlow only featurises images here: keep it off JAX's accelerators.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  try:
    report = evaluate_split(
        _WORKDIR.value, _SPLIT.value, beam_size=_BEAM_SIZE.value,
        alpha=_ALPHA.value, batch_size=_BATCH_SIZE.value,
        max_len=_MAX_LEN.value or None, num_images=_NUM_IMAGES.value)
  except (FileNotFoundError, ValueError) as e:
    logging.error('%s', e)
    raise SystemExit(1) from None
  print(format_report(report), flush=True)


if __name__ == '__main__':
  # Flags exist only when run as a program, so that importing the library
  # never clashes with the flags of the program that imports it.
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A trained workdir.',
                                 required=True)
  _SPLIT = flags.DEFINE_string('split', 'test', 'The split to caption.')
  _BEAM_SIZE = flags.DEFINE_integer('beam_size', 1,
                                    'Beam search width; 1 is greedy search.')
  _ALPHA = flags.DEFINE_float('alpha', 0.0, "Beam search's length "
                              'normalisation (GNMT alpha; 0 = off).')
  _BATCH_SIZE = flags.DEFINE_integer('batch_size', 64,
                                     'Images decoded at once.')
  _MAX_LEN = flags.DEFINE_integer('max_len', 0, 'Most words per caption, '
                                  "<end> included; 0: the config's longest "
                                  'caption.')
  _NUM_IMAGES = flags.DEFINE_integer('num_images', 0, "Caption the split's "
                                     'first images only (0: all).')
  app.run(main)
