r"""Captions for images: `python -m capjax.sample --workdir DIR IMAGE ...`.

Everything comes from the workdir: the latest checkpoint, the vocabulary and
the feature extractor's settings (the saved config and features.json), so
new images are featurised exactly as the training images were.

  python -m capjax.sample --workdir /tmp/capjax-demo /tmp/capjax-demo/examples/*.png
  python -m capjax.sample --workdir /tmp/coco photo.jpg --beam_size 3
  python -m capjax.sample --workdir /tmp/coco photo.jpg --temperature 0.8
  python -m capjax.sample --workdir /tmp/coco photo.jpg --plot_dir /tmp/plots

Prints `IMAGE: caption` per image. An IMAGE may also be a `.npy` file of
precomputed features, (L, D) or (H, W, D) as the workdir's extractor makes
them. With --plot_dir, writes one PNG per image with the attention map behind
every word. An unreadable image is reported and skipped; the others still get
their captions, and the exit status is 1.
"""

from collections.abc import Sequence
import dataclasses
import os
import pathlib
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from capjax import decode
from capjax import features as features_lib
from capjax import models
from capjax import plots
from capjax import reporting
from capjax import vocab as vocab_lib
from capjax import workdir as workdir_lib

FEATURES_SUFFIX = '.npy'


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A workdir's model, ready to caption.

  Attributes:
    config: the training config.
    vocab: the vocabulary.
    model: the Captioner the config describes.
    params: the checkpoint's parameters.
    step: the checkpoint's training step.
    feature_info: features.json: the extractor's description, num_locations
      (L) and feature_dim (D).
  """
  config: ml_collections.ConfigDict
  vocab: vocab_lib.Vocab
  model: models.Captioner
  params: Any
  step: int
  feature_info: dict[str, Any]

  @property
  def feature_shape_LD(self) -> tuple[int, int]:
    return self.feature_info['num_locations'], self.feature_info['feature_dim']


def load_trained(workdir: str | os.PathLike[str],
                 step: int | None = None) -> TrainedModel:
  """The model of a workdir's checkpoint (the latest by default).

  Raises:
    FileNotFoundError: not a workdir, or no checkpoint yet.
  """
  workdir = pathlib.Path(workdir)
  config = workdir_lib.load_config(workdir)
  for name in (workdir_lib.VOCAB_FILE, workdir_lib.FEATURES_FILE):
    if not (workdir / name).exists():
      raise FileNotFoundError(f'{workdir} lacks {name}: train first with '
                              f'`python -m capjax.train --workdir {workdir}`')
  vocab = vocab_lib.Vocab.load(workdir / workdir_lib.VOCAB_FILE)
  if step is None:
    manager = workdir_lib.checkpoint_manager(workdir, read_only=True)
    step = manager.latest_step()
    manager.close()
  params = workdir_lib.load_params(workdir, step)  # raises if step is None
  return TrainedModel(
      config=config, vocab=vocab, model=models.from_config(config, vocab.size),
      params=params, step=step,
      feature_info=workdir_lib.load_json(workdir / workdir_lib.FEATURES_FILE))


def make_extractor(trained: TrainedModel) -> features_lib.Extractor:
  """The extractor the workdir's features came from, checked.

  Raises:
    ValueError: the saved config now makes another extractor than the one
      in features.json, or its weights are missing.
  """
  extractor = features_lib.make_extractor(trained.config)
  info = trained.feature_info
  made = (extractor.info, extractor.num_locations, extractor.feature_dim)
  saved = (info['extractor'], info['num_locations'], info['feature_dim'])
  if made != saved:
    raise ValueError(f'the saved config makes features {made}, but the model '
                     f'was trained on {saved}')
  return extractor


@dataclasses.dataclass(frozen=True)
class FileCaption:
  """The caption of one input file, or why there is none.

  Attributes:
    path: the input file.
    caption: the caption's text ('' if the model ended at once).
    attention_TL: the attention behind each word (rows past the words unused).
    image_HW3: the decoded image; None for precomputed features or on error.
    error: why the file could not be captioned; None on success.
  """
  path: str
  caption: str = ''
  attention_TL: np.ndarray | None = None
  image_HW3: np.ndarray | None = None
  error: str | None = None


def read_features(path: str, shape_LD: tuple[int, int]) -> np.ndarray:
  """Precomputed features from a .npy file, (L, D) or (H, W, D), as float32.

  Raises:
    ValueError: not a readable array of the model's feature shape.
  """
  features = np.load(path, allow_pickle=False)
  if features.ndim == 3:
    features = features.reshape(-1, features.shape[-1])
  if features.shape != tuple(shape_LD):
    raise ValueError(f'features of shape {features.shape}; this model needs '
                     f'(L, D) = {tuple(shape_LD)}')
  return features.astype(np.float32)


def caption_files(trained: TrainedModel, paths: Sequence[str], *,
                  beam_size: int = 1, alpha: float = 0.0,
                  temperature: float = 0.0, seed: int = 0,
                  max_len: int | None = None) -> list[FileCaption]:
  """Captions for image files and .npy feature files, one per path, in order.

  Files that cannot be read get a FileCaption with `error` set.

  Raises:
    ValueError: the extractor cannot be made (e.g. its weights are missing);
      it is made only when there are images, not for .npy files alone.
  """
  is_image = lambda path: not path.endswith(FEATURES_SUFFIX)
  extractor = make_extractor(trained) if any(map(is_image, paths)) else None
  inputs, results = [], {}
  for path in paths:
    try:
      if is_image(path):
        image_HW3 = features_lib.load_image(path)
        inputs.append((path, extractor([image_HW3])[0], image_HW3))
      else:
        inputs.append((path, read_features(path, trained.feature_shape_LD),
                       None))
    # PIL raises OSError subclasses or ValueError for missing, truncated and
    # non-image files, numpy ValueError for bad arrays.
    except (OSError, ValueError) as e:
      results[path] = FileCaption(path, error=f'{type(e).__name__}: {e}')
  if inputs:
    features_BLD = np.stack([f for _, f, _ in inputs])
    captions = decode.caption_features(
        trained.params, features_BLD, model=trained.model,
        max_len=max_len or decode.max_caption_tokens(trained.config),
        beam_size=beam_size, alpha=alpha, temperature=temperature,
        rng=jax.random.PRNGKey(seed))
    texts = decode.texts(captions.tokens_BT, trained.vocab)
    attention_BTL = np.asarray(captions.attention_BTL)
    for (path, _, image_HW3), text, attention_TL in zip(inputs, texts,
                                                        attention_BTL):
      results[path] = FileCaption(path, text, attention_TL, image_HW3)
  return [results[p] for p in paths]


def plot_path(plot_dir: str, path: str, taken: set[str]) -> str:
  """`<plot_dir>/<file stem>.png`, numbered when two inputs share a stem."""
  stem = pathlib.Path(path).stem
  name, n = f'{stem}.png', 1
  while name in taken:
    n += 1
    name = f'{stem}-{n}.png'
  taken.add(name)
  return os.path.join(plot_dir, name)


def main(argv: Sequence[str]) -> None:
  reporting.concise_console_logging()
  paths = list(argv[1:])
  if not paths:
    raise app.UsageError('name one or more images (or .npy feature files)')
  # TensorFlow only decodes and featurises images here: keep it off the
  # accelerators JAX uses.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  try:
    trained = load_trained(_WORKDIR.value)
    results = caption_files(
        trained, paths, beam_size=_BEAM_SIZE.value, alpha=_ALPHA.value,
        temperature=_TEMPERATURE.value, seed=_SEED.value,
        max_len=_MAX_LEN.value or None)
  except (FileNotFoundError, ValueError) as e:
    logging.error('%s', e)
    raise SystemExit(1) from None
  if _PLOT_DIR.value:
    os.makedirs(_PLOT_DIR.value, exist_ok=True)
  taken = set()
  for r in results:
    if r.error is not None:
      logging.error('%s: %s', r.path, r.error)
      continue
    print(f'{r.path}: {r.caption}', flush=True)
    if _PLOT_DIR.value:
      plots.plot_attention(plot_path(_PLOT_DIR.value, r.path, taken),
                           r.caption.split(), r.attention_TL, r.image_HW3)
  failed = sum(r.error is not None for r in results)
  if failed:
    logging.error('%d of %d files could not be captioned', failed,
                  len(results))
    sys.exit(1)


if __name__ == '__main__':
  # Flags exist only when run as a program, so that importing the library
  # never clashes with the flags of the program that imports it.
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A trained workdir.',
                                 required=True)
  _BEAM_SIZE = flags.DEFINE_integer('beam_size', 1,
                                    'Beam search width; 1 is greedy search.')
  _ALPHA = flags.DEFINE_float('alpha', 0.0, "Beam search's length "
                              'normalisation (GNMT alpha; 0 = off).')
  _TEMPERATURE = flags.DEFINE_float(
      'temperature', 0.0, 'Sample each word at this temperature (0 = '
      'deterministic decoding).')
  _SEED = flags.DEFINE_integer('seed', 0, 'Random seed of --temperature.')
  _MAX_LEN = flags.DEFINE_integer('max_len', 0, 'Most words per caption, '
                                  "<end> included; 0: the config's longest "
                                  'caption.')
  _PLOT_DIR = flags.DEFINE_string('plot_dir', '', 'Write attention plots '
                                  'here, one PNG per image.')
  app.run(main)
