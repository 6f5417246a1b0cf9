r"""Extracts image features into a feature store: `python -m capjax.features`.

  python -m capjax.features --config=capjax/configs/default.py \
      --config.dataset=coco_json --config.data_dir=/data/coco \
      --config.extractor=inception_v3 --split=train+val --feature_dir=/data/f

Features from any other extractor, as a (N, L, D) or (N, H, W, D) .npy array
with one image id per line in a text file:

  python -m capjax.features --from_numpy=feats.npy --ids=ids.txt \
      --split=train --feature_dir=/data/f

Extraction resumes where it stopped when rerun, and TensorFlow uses a GPU if
it finds one (see docs/design.md for the store's format). Several processes
share an extraction as they share training (SLURM and Cloud TPU are
detected; elsewhere start each with --coordinator_address, --num_processes
and --process_id): each extracts its share of the shards into the same
--feature_dir, which all of them must see.
"""

from collections.abc import Sequence
import pathlib

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import numpy as np

from capjax import config_checks
from capjax import configs
from capjax import errors
from capjax import programs
from capjax.data import extraction
from capjax.data import feature_store
from capjax.training import parallel

_CONFIG = config_flags.DEFINE_config_file(
  'config',
  configs.DEFAULT_FILE,
  'Configuration file.',
  lock_config=True,
)
_SPLIT = flags.DEFINE_string(
  'split',
  '',
  'Split(s) to extract, joined with "+"; default: the '
  "config's train_split and eval_split.",
)
_FEATURE_DIR = flags.DEFINE_string(
  'feature_dir',
  '',
  'Root directory of the feature stores; default: config.feature_dir.',
)
_FROM_NUMPY = flags.DEFINE_string(
  'from_numpy',
  '',
  'Store precomputed features instead of extracting: a '
  '.npy file of shape (N, L, D) or (N, H, W, D). Needs --ids and --split.',
)
_IDS = flags.DEFINE_string(
  'ids', '', 'With --from_numpy: text file of the N image ids, one a line.'
)
_EXTRACTOR_NAME = flags.DEFINE_string(
  'extractor_name',
  'custom',
  "With --from_numpy: the name stored as the features' extractor.",
)
_PROCESSES = programs.define_process_flags()


def store_numpy(
  features_path: str,
  ids_path: str,
  split: str,
  feature_dir: str,
  shard_size: int,
  extractor_name: str,
) -> feature_store.FeatureStore:
  """Stores the grids of a .npy file under the ids of a text file."""
  if not ids_path or not split or '+' in split:
    raise errors.UserError('--from_numpy needs --ids and a single --split')
  try:
    features = np.load(features_path, mmap_mode='r')
    lines = pathlib.Path(ids_path).read_text(encoding='utf-8').splitlines()
  except (OSError, ValueError) as e:
    raise errors.UserError(f'cannot read --from_numpy or --ids: {e}') from None
  if features.ndim == 4:  # (N, H, W, D) grid
    features = features.reshape(features.shape[0], -1, features.shape[-1])
  ids = [line.strip() for line in lines if line.strip()]
  return feature_store.write_feature_store(
    feature_store.store_dir(feature_dir, split),
    features,
    ids,
    {'name': extractor_name},
    shard_size,
  )


def main(argv: Sequence[str]) -> None:
  programs.refuse_arguments(argv)
  config = _CONFIG.value
  config_checks.check_config(config)
  feature_dir = _FEATURE_DIR.value or config.feature_dir
  if not feature_dir:
    raise errors.UserError('set --feature_dir (or config.feature_dir)')
  if _FROM_NUMPY.value:
    store = store_numpy(
      _FROM_NUMPY.value,
      _IDS.value,
      _SPLIT.value,
      feature_dir,
      config.shard_size,
      _EXTRACTOR_NAME.value,
    )
    logging.info(
      'Stored %d feature grids (L=%d, D=%d)',
      len(store),
      store.num_locations,
      store.feature_dim,
    )
    return
  splits = (_SPLIT.value or f'{config.train_split}+{config.eval_split}').split(
    '+'
  )
  parallel.maybe_initialize_distributed(*_PROCESSES.values())
  processes = extraction.Processes(
    jax.process_index(), jax.process_count(), parallel.agreed
  )
  store = extraction.extract_split(
    config, '+'.join(dict.fromkeys(splits)), feature_dir, processes=processes
  )
  logging.info(
    '%d images with features (L=%d, D=%d) in %s',
    len(store),
    store.num_locations,
    store.feature_dim,
    feature_dir,
  )


if __name__ == '__main__':
  programs.run(main, tensorflow_gpus=True)
