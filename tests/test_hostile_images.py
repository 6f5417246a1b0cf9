"""Hostile and unusual image files, through the one opener and each entry point.

Each case is refused with its own error, or decoded as a viewer shows it:
directly (`images.load_image`), through `capjax.sample` (the others are
still captioned) and through feature extraction (the others are still
extracted). The server's answers to the same files are in tests/test_serve.py.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from capjax import errors
from capjax.data import extraction
from capjax.data import images
from capjax.testing import hostile_images
from capjax.testing import training as testing_lib

CASES, REFUSED = hostile_images.CASES, hostile_images.REFUSED


@pytest.fixture(scope='module')
def image_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('hostile')
  for name, (make, _) in CASES.items():
    (directory / name).write_bytes(make())
  return directory


@pytest.mark.parametrize('name', sorted(CASES))
def test_each_case_is_refused_or_decoded_as_viewers_show_it(image_dir, name):
  _, want = CASES[name]
  if isinstance(want, type):
    with pytest.raises(want) as error:
      images.load_image(image_dir / name)
    assert isinstance(error.value, errors.UserError)
    assert '\n' not in str(error.value)
    return
  pixels = images.load_image(image_dir / name)
  assert pixels.shape == (*want, 3) and pixels.dtype == np.uint8


def test_what_decoded_images_look_like(image_dir):
  load = lambda name: images.load_image(image_dir / name).astype(int)
  assert np.abs(load('cmyk.jpg')[6, 8] - [255, 0, 0]).max() < 8
  # 16-bit values keep their high byte: 0, 4, 8, ... 252.
  np.testing.assert_array_equal(
    load('sixteen_bit.png')[..., 0].ravel(), np.arange(64) * 4
  )
  palette = load('palette.png')
  np.testing.assert_array_equal(palette[0, 0], [200, 100, 50])
  np.testing.assert_array_equal(palette[1, 1], [255, 255, 255])
  np.testing.assert_array_equal(load('animated.gif')[0, 0], [255, 0, 0])


def test_the_same_bytes_in_memory_get_the_same_answers(image_dir):
  for name in ('bomb.png', 'text.jpg', 'cmyk.jpg'):
    data, want = (image_dir / name).read_bytes(), CASES[name][1]
    if isinstance(want, type):
      with pytest.raises(want):
        images.load_image(data)
    else:
      np.testing.assert_array_equal(
        images.load_image(data), images.load_image(image_dir / name)
      )


@pytest.mark.slow
def test_sample_captions_the_others_and_names_each_refused_file(
  trained_workdir, image_dir
):
  paths = [str(image_dir / name) for name in sorted(CASES)]
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'capjax.sample',
      f'--workdir={trained_workdir}',
      *paths,
    ],
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  captioned = [line.split(':')[0] for line in result.stdout.splitlines()]
  assert captioned == [p for p in paths if pathlib.Path(p).name not in REFUSED]
  for name in REFUSED:
    kind = CASES[name][1].__name__
    assert f'{image_dir / name}: {kind}: ' in result.stderr, name
  assert f'{len(REFUSED)} of {len(CASES)} files could not be captioned' in (
    result.stderr
  )


@pytest.mark.slow
def test_extraction_stores_the_others_and_lists_each_refused_file(
  image_dir, tmp_path
):
  names = sorted(CASES)
  annotations = {
    'images': [{'id': i, 'file_name': n} for i, n in enumerate(names)],
    'annotations': [
      {'id': i, 'image_id': i, 'caption': 'a picture'}
      for i in range(len(names))
    ],
  }
  (tmp_path / 'captions.json').write_text(json.dumps(annotations))
  config = testing_lib.tiny_config(tmp_path)
  config.dataset, config.data_dir = 'coco_json', str(tmp_path)
  store = extraction.extract_split(
    config, f'captions.json:{image_dir}', tmp_path / 'features'
  )
  failed = dict(store.failed)
  assert sorted(names[int(i)] for i in failed) == REFUSED
  assert sorted(names[int(i)] for i in store.image_ids) == sorted(
    set(names) - set(REFUSED)
  )
  for image_id, error in failed.items():
    assert error.startswith(CASES[names[int(image_id)]][1].__name__ + ': ')
