"""capjax.data.shapes: determinism, and captions read back from pixels."""

import collections

import numpy as np
from PIL import Image
import pytest

from capjax.configs import default
from capjax.data import datasets
from capjax.data import shapes

_SIZE = 64


def _components(image):
  """Connected regions of non-background pixels: (colour, pixel set) each."""
  background = np.all(image == shapes.BACKGROUND, axis=-1)
  seen = np.zeros(background.shape, bool)
  regions = []
  for start in zip(*np.nonzero(~background)):
    if seen[start]:
      continue
    colour = tuple(image[start])
    stack, pixels = [start], []
    seen[start] = True
    while stack:
      y, x = stack.pop()
      pixels.append((y, x))
      for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
        if (
          0 <= ny < image.shape[0]
          and 0 <= nx < image.shape[1]
          and not seen[ny, nx]
          and tuple(image[ny, nx]) == colour
        ):
          seen[ny, nx] = True
          stack.append((ny, nx))
    regions.append((colour, np.array(pixels)))
  return regions


def _describe(colour, pixels):
  """(size, colour, shape, cx, cy) of a region, from its pixels alone."""
  colour_name = {v: k for k, v in shapes.COLOURS.items()}[colour]
  ys, xs = pixels[:, 0], pixels[:, 1]
  side = xs.max() - xs.min() + 1
  assert side == ys.max() - ys.min() + 1
  fill = len(pixels) / side**2
  # Filled fractions of the bounding box: square 1, circle 0.67 (small) to
  # 0.72 (large), triangle 0.5.
  assert not 0.55 < fill < 0.62
  shape = 'square' if fill > 0.95 else 'circle' if fill > 0.6 else 'triangle'
  size = {2 * round(f * _SIZE) + 1: s for s, f in shapes.SIZES.items()}[side]
  return (
    size,
    colour_name,
    shape,
    (xs.min() + xs.max()) / 2,
    (ys.min() + ys.max()) / 2,
  )


def _relation(a, b):
  dx, dy = a[3] - b[3], a[4] - b[4]
  if abs(dx) > abs(dy):
    return 'left of' if dx < 0 else 'right of'
  return 'above' if dy < 0 else 'below'


def _phrase(obj):
  return f'a {obj[0]} {obj[1]} {obj[2]}'


@pytest.mark.parametrize('index', range(60))
def test_captions_agree_with_pixels(index):
  example = shapes.make_example(7, 'train', index, _SIZE)
  found = sorted(
    (_describe(*r) for r in _components(example.image)), key=lambda o: o[3]
  )
  assert 1 <= len(found) <= 3
  phrases = [_phrase(o) for o in found]
  listing = (
    ' and '.join(phrases)
    if len(found) < 3
    else f'{phrases[0]} {phrases[1]} and {phrases[2]}'
  )
  count = ('one shape', 'two shapes', 'three shapes')[len(found) - 1]
  captions = example.captions
  assert len(captions) == 5 == len(set(captions))
  assert captions[0] == listing
  assert captions[1] == f'there is {listing}'
  assert captions[4] == f'{count} {listing}'
  if len(found) == 1:
    assert captions[2:4] == (
      f'the image shows {listing}',
      f'a picture of {listing}',
    )
  else:
    a, b, last, before = found[0], found[1], found[-1], found[-2]
    assert captions[2].startswith(
      f'{_phrase(a)} {_relation(a, b)} {_phrase(b)}'
    )
    assert captions[3].startswith(
      f'{_phrase(last)} {_relation(last, before)} {_phrase(before)}'
    )


def test_object_centres_have_their_colour():
  for index in range(20):
    example = shapes.make_example(0, 'val', index, _SIZE)
    for obj in example.objects:
      np.testing.assert_array_equal(
        example.image[obj.cy, obj.cx], shapes.COLOURS[obj.colour]
      )


def test_generation_is_deterministic():
  first = shapes.generate(3, 'train', 10, _SIZE)
  again = shapes.generate(3, 'train', 10, _SIZE)
  other_seed = shapes.generate(4, 'train', 10, _SIZE)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a.image, b.image)
    assert a.captions == b.captions and a.image_id == b.image_id
  assert any(a.captions != b.captions for a, b in zip(first, other_seed))
  # A larger split extends a smaller one.
  np.testing.assert_array_equal(
    shapes.generate(3, 'train', 12, _SIZE)[9].image, first[9].image
  )
  # Splits differ from each other and have distinct ids.
  val = shapes.generate(3, 'val', 10, _SIZE)
  assert [e.captions for e in val] != [e.captions for e in first]
  assert not {e.image_id for e in val} & {e.image_id for e in first}


def test_data_set_statistics_and_vocabulary():
  examples = shapes.generate(0, 'train', 300, _SIZE)
  assert collections.Counter(len(e.objects) for e in examples).keys() == {
    1,
    2,
    3,
  }
  words = {w for e in examples for c in e.captions for w in c.split()}
  assert words == {
    'a',
    'above',
    'and',
    'below',
    'blue',
    'circle',
    'green',
    'image',
    'is',
    'large',
    'left',
    'of',
    'one',
    'picture',
    'red',
    'right',
    'shape',
    'shapes',
    'shows',
    'small',
    'square',
    'the',
    'there',
    'three',
    'triangle',
    'two',
    'yellow',
  }
  image = examples[0].image
  assert image.shape == (_SIZE, _SIZE, 3) and image.dtype == np.uint8


def test_small_images_still_fit():
  for index in range(10):
    example = shapes.make_example(0, 'test', index, 24)
    assert example.image.shape == (24, 24, 3)
    assert 1 <= len(example.objects) <= 3


def test_write_split_and_read_back(tmp_path):
  config = default.get_config()
  config.data_dir = str(tmp_path)
  config.shapes.num_train = 12
  config.shapes.num_val = 3
  records = datasets.load_split(config, 'train')
  examples = shapes.generate(config.shapes.seed, 'train', 12, 64)
  assert [r.image_id for r in records] == [str(e.image_id) for e in examples]
  for record, example in zip(records, examples):
    assert record.captions == example.captions
    np.testing.assert_array_equal(
      np.asarray(Image.open(record.image)), example.image
    )
  directory = datasets.shapes_dir(config)
  assert shapes.is_written(directory, 'train', config.shapes)
  assert not shapes.is_written(directory, 'val', config.shapes)
  assert len(datasets.load_split(config, 'val')) == 3
  # A changed size regenerates the split.
  config.shapes.num_train = 5
  assert not shapes.is_written(directory, 'train', config.shapes)
  assert len(datasets.load_split(config, 'train')) == 5


def test_unknown_split():
  with pytest.raises(ValueError, match='unknown shapes split'):
    shapes.make_example(0, 'dev', 0, _SIZE)
