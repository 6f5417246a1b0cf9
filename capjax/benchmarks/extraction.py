"""Feature extraction images/s, decoding included (no baseline).

`patches` on `shapes` PNGs, and `inception_v3` (random weights) on 640x480
JPEGs with each backend: Flax (capjax.model.inception) and Keras.
"""

import json
import pathlib
import time

import numpy as np
from PIL import Image

from capjax.configs import default
from capjax.data import datasets
from capjax.data import extraction
from capjax.data import extractors


def _extraction_rate(config, split: str, feature_dir: pathlib.Path) -> float:
  extractor = extractors.make_extractor(config)
  # Built and compiled untimed, at the batch size extraction uses.
  extractor([np.zeros((8, 8, 3), np.uint8)] * config.extract_batch_size)
  start = time.perf_counter()
  store = extraction.extract_split(config, split, feature_dir, extractor)
  return len(store) / (time.perf_counter() - start)


def _write_jpegs(tmp: pathlib.Path, num_images: int) -> str:
  """Synthetic 640x480 JPEGs and a COCO-format caption file; its split name."""
  image_dir = tmp / 'jpegs'
  image_dir.mkdir()
  rng = np.random.default_rng(0)
  ramp = np.linspace(0, 200, 640)[None, :, None]
  for i in range(num_images):
    pixels = ramp + rng.integers(0, 55, size=(480, 640, 3))
    Image.fromarray(pixels.astype(np.uint8)).save(
      image_dir / f'{i}.jpg', quality=90
    )
  annotations = {
    'images': [{'id': i, 'file_name': f'{i}.jpg'} for i in range(num_images)],
    'annotations': [
      {'id': i, 'image_id': i, 'caption': 'noise'} for i in range(num_images)
    ],
  }
  (tmp / 'jpegs.json').write_text(json.dumps(annotations))
  return 'jpegs.json:jpegs'


def bench_extraction(
  tmp: pathlib.Path, patch_images: int, inception_images: int
) -> dict[str, float]:
  """Images/s of `patches` and of `inception_v3` on JAX and on Keras."""
  config = default.get_config()
  config.data_dir = str(tmp / 'shapes')
  config.shapes.num_train = patch_images
  datasets.load_split(config, 'train')  # generate the PNGs untimed
  results = {'patches': _extraction_rate(config, 'train', tmp / 'f_patches')}
  split = _write_jpegs(tmp, inception_images)
  config.dataset, config.data_dir = 'coco_json', str(tmp)
  config.extractor, config.extractor_weights = 'inception_v3', 'none'
  for backend in ('jax', 'keras'):
    config.extractor_backend = backend
    results[f'inception_v3_{backend}'] = _extraction_rate(
      config, split, tmp / f'f_inception_{backend}'
    )
  return results
