"""The built-in synthetic `shapes` captioning data set.

Each image (RGB, `image_size` pixels square, dark background) holds one to
three objects, each a circle, square or triangle in one of four colours and one
of two sizes, with distinct (colour, shape) pairs. Each image has five captions
whose words are a function of the image: the objects' sizes, colours and shapes
listed left to right, their number, and the relative position ("left of",
"right of", "above", "below") of neighbours. The five captions differ only in
sentence template, never in word choice, so a captioner can learn the data set
almost perfectly from a vocabulary of 27 words.

Everything is generated deterministically from a seed: image `index` of a
split depends only on (seed, split, index, image_size), so a larger split
extends a smaller one. `write_split` saves a split as PNG files plus a
COCO-format caption file, which `capjax.datasets` reads back like any other
COCO-format data (`annotations/captions_{split}.json` + `{split}/`).
"""

from collections.abc import Sequence
import dataclasses
import json
import os
import pathlib
from typing import Any

import numpy as np
from PIL import Image

from capjax import config_checks
from capjax import files

PathLike = str | os.PathLike[str]

# Their order seeds each split's images.
SPLITS = config_checks.SPLITS['shapes']
COLOURS = {
  'red': (220, 50, 50),
  'green': (40, 180, 70),
  'blue': (60, 100, 240),
  'yellow': (235, 210, 40),
}
SHAPES = ('circle', 'square', 'triangle')
# Half the side of an object's bounding box, as a fraction of the image side.
SIZES = {'small': 0.1, 'large': 0.18}
BACKGROUND = (30, 30, 30)

# Layouts are redrawn until every pair of objects is clearly apart, clearly
# ordered left to right and clearly more horizontal than vertical (or the
# reverse), so that every caption word is unambiguous in the pixels.
_MIN_GAP = 2  # pixels between bounding boxes
_MIN_DX = 4  # pixels between the centres' x coordinates
_MIN_AXIS_MARGIN = 4  # pixels between |dx| and |dy|
_MAX_LAYOUT_TRIES = 1000
# Images of different splits get different COCO image ids.
_ID_STRIDE = 10_000_000
_COUNT_WORDS = ('one shape', 'two shapes', 'three shapes')


@dataclasses.dataclass(frozen=True)
class Shape:
  """One object: its words and its bounding box (centre cx, cy; half side r)."""

  shape: str
  colour: str
  size: str
  cx: int
  cy: int
  r: int

  @property
  def phrase(self) -> str:
    return f'a {self.size} {self.colour} {self.shape}'


@dataclasses.dataclass(frozen=True)
class Example:
  """A generated image with its objects (left to right) and captions."""

  image_id: int
  image: np.ndarray  # (S, S, 3) uint8
  objects: tuple[Shape, ...]
  captions: tuple[str, ...]


def relation(a: Shape, b: Shape) -> str:
  """Where `a` is relative to `b`: 'left of', 'right of', 'above', 'below'."""
  dx, dy = a.cx - b.cx, a.cy - b.cy
  if abs(dx) > abs(dy):
    return 'left of' if dx < 0 else 'right of'
  return 'above' if dy < 0 else 'below'


def captions_for(objects: Sequence[Shape]) -> tuple[str, ...]:
  """The five captions of objects sorted left to right (1 to 3 of them)."""
  n = len(objects)
  if not 1 <= n <= 3:
    raise ValueError(f'shapes images hold 1 to 3 objects, got {n}')
  phrases = [o.phrase for o in objects]
  listing = (
    phrases[0] if n == 1 else ' '.join(phrases[:-1]) + ' and ' + phrases[-1]
  )
  if n == 1:
    first, second = (f'the image shows {listing}', f'a picture of {listing}')
  else:
    a, b, last = objects[0], objects[1], objects[-1]
    before_last = objects[-2]
    first = f'{a.phrase} {relation(a, b)} {b.phrase}'
    second = f'{last.phrase} {relation(last, before_last)} {before_last.phrase}'
    if n == 3:
      first += f' and {objects[2].phrase}'
      second += f' and {a.phrase}'
  return (
    listing,
    f'there is {listing}',
    first,
    second,
    f'{_COUNT_WORDS[n - 1]} {listing}',
  )


def object_mask(obj: Shape, image_size: int) -> np.ndarray:
  """(S, S) bool mask of the pixels an object covers."""
  y, x = np.mgrid[:image_size, :image_size]
  dx, dy = x - obj.cx, y - obj.cy
  if obj.shape == 'circle':
    return dx * dx + dy * dy <= obj.r * obj.r
  if obj.shape == 'square':
    return (np.abs(dx) <= obj.r) & (np.abs(dy) <= obj.r)
  if obj.shape == 'triangle':  # apex up, base at the bottom of the box
    return (np.abs(dy) <= obj.r) & (2 * np.abs(dx) <= dy + obj.r)
  raise ValueError(f'unknown shape {obj.shape!r}')


def _layout_ok(objects: Sequence[Shape]) -> bool:
  for i, a in enumerate(objects):
    for b in objects[i + 1 :]:
      dx, dy = abs(a.cx - b.cx), abs(a.cy - b.cy)
      apart = max(dx, dy) > a.r + b.r + _MIN_GAP
      if not apart or dx < _MIN_DX or abs(dx - dy) < _MIN_AXIS_MARGIN:
        return False
  return True


def _sample_objects(
  rng: np.random.Generator, image_size: int
) -> tuple[Shape, ...]:
  """1-3 objects of distinct (colour, shape), placed legibly, left to right."""
  num = int(rng.integers(1, 4))
  while True:
    kinds = rng.choice(len(COLOURS) * len(SHAPES), size=num, replace=False)
    sizes = rng.choice(list(SIZES), size=num)
    radii = [max(2, round(SIZES[s] * image_size)) for s in sizes]
    for _ in range(_MAX_LAYOUT_TRIES):
      objects = [
        Shape(
          shape=SHAPES[k % len(SHAPES)],
          colour=list(COLOURS)[k // len(SHAPES)],
          size=str(s),
          r=r,
          cx=int(rng.integers(r, image_size - r)),
          cy=int(rng.integers(r, image_size - r)),
        )
        for k, s, r in zip(kinds, sizes, radii)
      ]
      if _layout_ok(objects):
        return tuple(sorted(objects, key=lambda o: o.cx))
    # Too crowded for this image size: fewer objects always fit.
    num -= 1


def render(objects: Sequence[Shape], image_size: int) -> np.ndarray:
  """Draws objects on the background: (S, S, 3) uint8."""
  image = np.empty((image_size, image_size, 3), np.uint8)
  image[...] = BACKGROUND
  for obj in objects:
    image[object_mask(obj, image_size)] = COLOURS[obj.colour]
  return image


def make_example(seed: int, split: str, index: int, image_size: int) -> Example:
  """Image `index` of `split`, a pure function of its arguments."""
  if split not in SPLITS:
    raise ValueError(f'unknown shapes split {split!r}; use one of {SPLITS}')
  split_index = SPLITS.index(split)
  rng = np.random.default_rng([seed, split_index, index])
  objects = _sample_objects(rng, image_size)
  return Example(
    image_id=split_index * _ID_STRIDE + index,
    image=render(objects, image_size),
    objects=objects,
    captions=captions_for(objects),
  )


def generate(
  seed: int, split: str, num_images: int, image_size: int
) -> list[Example]:
  """The first `num_images` examples of `split`, in memory."""
  if not 0 <= num_images < _ID_STRIDE:
    raise ValueError(
      f'num_images must be in [0, {_ID_STRIDE}), got {num_images}'
    )
  return [make_example(seed, split, i, image_size) for i in range(num_images)]


def split_size(shapes_config, split: str) -> int:
  """Number of images of `split` in a `config.shapes` ConfigDict."""
  if split not in SPLITS:
    raise ValueError(f'unknown shapes split {split!r}; use one of {SPLITS}')
  return shapes_config[f'num_{split}']


def annotation_path(directory: PathLike, split: str) -> pathlib.Path:
  return pathlib.Path(directory) / 'annotations' / f'captions_{split}.json'


def _settings(shapes_config, split: str) -> dict[str, int]:
  return {
    'seed': shapes_config.seed,
    'image_size': shapes_config.image_size,
    'num_images': split_size(shapes_config, split),
  }


def is_written(directory: PathLike, split: str, shapes_config) -> bool:
  """Whether `write_split` already wrote this split with these settings."""
  try:
    info = json.loads(
      annotation_path(directory, split).read_text(encoding='utf-8')
    )['info']
  except (OSError, ValueError, KeyError, TypeError):
    return False
  return info.get('capjax_shapes') == _settings(shapes_config, split)


def write_split(directory: PathLike, split: str, shapes_config) -> pathlib.Path:
  """Writes a split as `{split}/*.png` + `annotations/captions_{split}.json`.

  The caption file is COCO-format (images, annotations) and is written last,
  atomically, so its presence marks a complete split.

  Args:
    directory: output directory (created if needed).
    split: 'train', 'val' or 'test'.
    shapes_config: `config.shapes` (seed, image_size, num_train, ...).

  Returns:
    The path of the caption file.
  """
  settings = _settings(shapes_config, split)
  image_dir = pathlib.Path(directory) / split
  image_dir.mkdir(parents=True, exist_ok=True)
  annotation_path(directory, split).parent.mkdir(parents=True, exist_ok=True)
  images: list[dict[str, Any]] = []
  annotations: list[dict[str, Any]] = []
  for example in generate(
    settings['seed'], split, settings['num_images'], settings['image_size']
  ):
    file_name = f'{split}_{example.image_id % _ID_STRIDE:06d}.png'
    Image.fromarray(example.image).save(image_dir / file_name)
    images.append(
      {
        'id': example.image_id,
        'file_name': file_name,
        'height': settings['image_size'],
        'width': settings['image_size'],
      }
    )
    for caption in example.captions:
      annotations.append(
        {
          'id': len(annotations),
          'image_id': example.image_id,
          'caption': caption,
        }
      )
  path = annotation_path(directory, split)
  files.write_json_atomic(
    path,
    {
      'info': {
        'description': 'capjax synthetic shapes',
        'capjax_shapes': settings,
      },
      'images': images,
      'annotations': annotations,
    },
  )
  return path
