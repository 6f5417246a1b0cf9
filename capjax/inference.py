"""A trained workdir, loaded to caption new images.

Everything comes from the workdir: the checkpoint's parameters, the
vocabulary and the feature extractor's settings (the saved config and
features.json), so new images are featurised exactly as the training images
were.

  trained = inference.load_trained(workdir)
  for result in inference.caption_files(trained, ['photo.jpg']):
    print(result.path, result.caption)
"""

from collections.abc import Sequence
import dataclasses
import os
from typing import Any, cast

from absl import logging
import jax
import ml_collections
import numpy as np

from capjax import errors
from capjax import files
from capjax import workdir as workdir_lib
from capjax.data import extractors
from capjax.data import feature_store
from capjax.data import images
from capjax.data import vocab as vocab_lib
from capjax.model import captioner
from capjax.model import decoding
from capjax.training import checkpoints
from capjax.training import state as state_lib

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
  model: captioner.Captioner
  params: Any
  step: int
  feature_info: dict[str, Any]

  @property
  def feature_shape_LD(self) -> tuple[int, int]:
    return self.feature_info['num_locations'], self.feature_info['feature_dim']


def load_trained(
  workdir: str | os.PathLike[str], step: int | None = None
) -> TrainedModel:
  """The model of a workdir's checkpoint: `step`, else the best, else newest.

  The rule is checkpoints.resolve's; the choice is logged in one line.

  Raises:
    MissingFileError: not a workdir, no checkpoint yet, or no such step.
    DamagedCheckpointError: the checkpoint cannot be read or does not fit
      the config and vocabulary.
  """
  config = workdir_lib.load_config(workdir)
  vocab = vocab_lib.Vocab.load(
    workdir_lib.require_file(workdir, workdir_lib.VOCAB_FILE)
  )
  feature_info = files.read_json(
    workdir_lib.require_file(workdir, workdir_lib.FEATURES_FILE)
  )
  model = captioner.from_config(config, vocab.size)
  shape_LD = (feature_info['num_locations'], feature_info['feature_dim'])
  checkpoint = checkpoints.resolve(workdir, step)
  logging.info(
    'loading %s from %s', checkpoint.describe(), checkpoint.directory
  )
  params = checkpoints.restore_checkpoint(
    checkpoint, expected=state_lib.abstract_params(model, shape_LD)
  )
  return TrainedModel(
    config=config,
    vocab=vocab,
    model=model,
    params=params,
    step=checkpoint.step,
    feature_info=feature_info,
  )


def make_extractor(trained: TrainedModel) -> extractors.Extractor:
  """The extractor the workdir's features came from, checked.

  Raises:
    UserError: the saved config now makes another extractor than the one
      in features.json, or its weights are missing.
  """
  extractor = extractors.make_extractor(trained.config)
  feature_store.require_same_features(
    trained.feature_info,
    extractor.describe(),
    expected_what='the features the model was trained on',
    got_what='the features the saved config makes',
  )
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
    raise errors.UserError(
      f'features of shape {features.shape}; this model needs '
      f'(L, D) = {tuple(shape_LD)}'
    )
  return features.astype(np.float32)


def caption_files(
  trained: TrainedModel,
  paths: Sequence[str],
  *,
  beam_size: int = 1,
  alpha: float = 0.0,
  temperature: float = 0.0,
  seed: int = 0,
  max_len: int | None = None,
) -> list[FileCaption]:
  """Captions for image files and .npy feature files, one per path, in order.

  Files that cannot be read get a FileCaption with `error` set.

  Raises:
    ValueError: the extractor cannot be made (e.g. its weights are missing);
      it is made only when there are images, not for .npy files alone.
  """
  is_image = lambda path: not path.endswith(FEATURES_SUFFIX)
  extractor = make_extractor(trained) if any(map(is_image, paths)) else None
  # (path, features, image or None) of each file that could be read.
  inputs: list[tuple[str, np.ndarray, np.ndarray | None]] = []
  results: dict[str, FileCaption] = {}
  for path in paths:
    try:
      if is_image(path):
        assert extractor is not None  # Made when any path is an image.
        image_HW3 = images.load_image(path)
        inputs.append((path, extractor([image_HW3])[0], image_HW3))
      else:
        inputs.append(
          (path, read_features(path, trained.feature_shape_LD), None)
        )
    # PIL raises OSError subclasses or ValueError for missing, truncated and
    # non-image files, numpy ValueError for bad arrays.
    except (OSError, ValueError) as e:
      results[path] = FileCaption(path, error=f'{type(e).__name__}: {e}')
  if inputs:
    features_BLD = np.stack([f for _, f, _ in inputs])
    captions = decoding.caption_features(
      trained.params,
      # jit takes NumPy arrays too; caption_features is annotated jax.Array.
      cast(jax.Array, features_BLD),
      model=trained.model,
      max_len=max_len or decoding.max_caption_tokens(trained.config),
      beam_size=beam_size,
      alpha=alpha,
      temperature=temperature,
      rng=jax.random.PRNGKey(seed),
    )
    texts = trained.vocab.decode_rows(captions.tokens_BT)
    attention_BTL = np.asarray(captions.attention_BTL)
    for (path, _, input_HW3), text, attention_TL in zip(
      inputs, texts, attention_BTL
    ):
      results[path] = FileCaption(path, text, attention_TL, input_HW3)
  return [results[p] for p in paths]
