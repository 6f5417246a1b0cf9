"""Caption sources: each split as a list of records (image id, image, captions).

`load_split(config, split)` dispatches on `config.dataset`:

- 'shapes': the built-in synthetic data (`capjax.shapes`), generated on first
  use into `config.data_dir` (default `~/.cache/capjax/shapes`), one
  subdirectory per (seed, image size), then read back as COCO-format data.
  Splits: train, val, test.
- 'coco_json': COCO-format caption JSON + image directory under
  `config.data_dir`. A split name `s` is looked up as
  `annotations/captions_{s}.json` with images in `{s}/`, then
  `annotations/captions_{s}2017.json` + `{s}2017/`, then the 2014 names, so
  'train' and 'val' find COCO 2017 (or 2014) as unpacked from cocodataset.org
  and `s` may be 'val2014' or a name of one's own. A split may also name its
  files explicitly as `ANNOTATIONS.json:IMAGE_DIR` (relative to data_dir, or
  absolute).
- 'flickr': Flickr8k/30k as distributed: a token file (`Flickr8k.token.txt`,
  `captions.txt` or `results_20130124.token`; lines `name.jpg#n<TAB>caption`),
  split lists `Flickr_*.{train,dev,test}Images.txt` and an image directory
  (`Flicker8k_Dataset/`, `Flickr8k_Dataset/`, `flickr30k-images/`,
  `Images/` or `images/`), all in `config.data_dir`. Splits: train, val (the
  'dev' list; 'dev' works too), test, and all (every image of the token file).
- 'tfds_coco': TFDS `coco_captions` (COCO 2014 with the Karpathy splits train,
  restval, val, test), prepared beforehand with `tfds build coco_captions`;
  `config.data_dir` is the TFDS data_dir (empty: TFDS's default).

Splits join with '+', e.g. 'train+restval'. Image ids are strings: the COCO id,
or the Flickr file name without extension.
"""

import collections
from collections.abc import Iterator
import os
import pathlib
from typing import NamedTuple

from absl import logging

from capjax import config_checks
from capjax import errors
from capjax import files
from capjax.data import shapes

_TFDS_CACHE_FORMAT = 'capjax.tfds_captions/1'
DEFAULT_SHAPES_DIR = pathlib.Path('~/.cache/capjax/shapes')
# Held-out `shapes` images a new workdir gets (example_images).
_NUM_EXAMPLE_IMAGES = 4

_COCO_YEARS = ('', '2017', '2014')
_FLICKR_TOKEN_FILES = (
  'Flickr8k.token.txt',
  'captions.txt',
  'results_20130124.token',
)
_FLICKR_IMAGE_DIRS = (
  'Flicker8k_Dataset',
  'Flickr8k_Dataset',
  'flickr30k-images',
  'Images',
  'images',
)
PathLike = str | os.PathLike[str]
# The split list of each Flickr split but 'all' (config_checks.SPLITS).
_FLICKR_SPLIT_LISTS = {
  'train': 'train',
  'val': 'dev',
  'dev': 'dev',
  'test': 'test',
}


class Record(NamedTuple):
  """One image and its captions.

  `image` is the image file's path, or None for sources that stream their
  images (tfds_coco); `iter_images` yields the images of any source.
  """

  image_id: str
  image: str | None
  captions: tuple[str, ...]


def load_split(config, split: str) -> list[Record]:
  """The records of a split ('+'-joined splits are concatenated).

  Args:
    config: the capjax config (dataset, data_dir, shapes.*), checked
      (capjax.config_checks).
    split: split name(s), see the module docstring.

  Returns:
    Records in the source's order; every record has at least one caption.

  Raises:
    ValueError: an unknown split, missing files, or an image listed twice.
  """
  records = []
  for part in config_checks.split_names(split, config.dataset):
    records.extend(_load_part(config, part))
  seen = set()
  for r in records:
    if r.image_id in seen:
      raise errors.UserError(
        f'image {r.image_id!r} appears twice in split {split!r}'
      )
    seen.add(r.image_id)
  return records


def iter_images(config, split: str) -> Iterator[tuple[str, str | bytes]]:
  """(image id, image path or encoded bytes) for each image of a split.

  Images come in `load_split`'s order. TFDS images are streamed as their
  original encoded bytes, so a split never has to fit in memory.

  Raises:
    ValueError: a split's image directory does not exist.
  """
  for part in config_checks.split_names(split, config.dataset):
    if config.dataset == 'tfds_coco':
      for image_id, image, _ in _tfds_coco_examples(config, part):
        yield image_id, image
      continue
    # Every source but tfds_coco names each image's file.
    records = _load_part(config, part)
    paths = [(r.image_id, str(r.image)) for r in records]
    for image_dir in sorted({pathlib.Path(p).parent for _, p in paths}):
      if not image_dir.is_dir():
        raise errors.UserError(
          f'image directory {image_dir} of split {part!r} not '
          f'found; put the images of {config.dataset!r} '
          'there'
        )
    yield from paths


def _load_part(config, split: str) -> list[Record]:
  if config.dataset == 'shapes':
    return _shapes_records(config, split)
  if config.dataset == 'coco_json':
    return coco_json_records(*_coco_json_files(config.data_dir, split))
  if config.dataset == 'flickr':
    return _flickr_split(config.data_dir, split)
  return _tfds_coco_records(config, split)  # the last of the datasets


# --- COCO-format JSON ---------------------------------------------------------


def coco_json_records(
  annotation_file: PathLike, image_dir: PathLike
) -> list[Record]:
  """Records of a COCO-format caption file, images in `image_dir`.

  The file holds `images` ({id, file_name}) and `annotations` ({image_id,
  caption}). Images keep the file's order; captions keep the annotations'
  order, with surrounding whitespace stripped. Images without captions are
  left out.
  """
  data = files.read_json(annotation_file)
  image_dir = pathlib.Path(image_dir)
  try:
    captions = collections.defaultdict(list)
    for ann in data['annotations']:
      captions[ann['image_id']].append(ann['caption'].strip())
    records, seen = [], set()
    for image in data['images']:
      if image['id'] in seen:
        raise errors.UserError(
          f'{annotation_file}: image id {image["id"]} is listed twice'
        )
      seen.add(image['id'])
      if captions.get(image['id']):
        records.append(
          Record(
            str(image['id']),
            str(image_dir / image['file_name']),
            tuple(captions[image['id']]),
          )
        )
  except (KeyError, TypeError, AttributeError) as e:
    raise errors.UserError(
      f'{annotation_file} is not a COCO caption file: needs '
      '"images" with id and file_name and "annotations" with '
      f'image_id and caption ({e!r})'
    ) from None
  return records


def _coco_json_files(
  data_dir: str, split: str
) -> tuple[pathlib.Path, pathlib.Path]:
  """(annotation file, image directory) of a split, see the module docstring."""
  if ':' in split:
    annotation_file, image_dir = (
      pathlib.Path(data_dir) / p for p in split.split(':', 1)
    )
    if not annotation_file.is_file():
      raise errors.UserError(f'annotation file {annotation_file} not found')
    return annotation_file, image_dir
  if not data_dir:
    raise errors.UserError(
      "dataset 'coco_json' needs config.data_dir, the directory "
      'holding annotations/ and the image directories'
    )
  tried = []
  for year in _COCO_YEARS:
    annotation_file = (
      pathlib.Path(data_dir) / 'annotations' / f'captions_{split}{year}.json'
    )
    if annotation_file.is_file():
      return annotation_file, pathlib.Path(data_dir) / f'{split}{year}'
    tried.append(str(annotation_file))
  raise errors.UserError(
    f'no caption file for split {split!r}: tried '
    f'{", ".join(tried)}. Name the files explicitly with a '
    'split "ANNOTATIONS.json:IMAGE_DIR".'
  )


# --- Flickr8k / Flickr30k -----------------------------------------------------


def read_flickr_tokens(token_file: PathLike) -> dict[str, list[str]]:
  """Captions per image file name from `name.jpg#n<TAB>caption` lines.

  Images keep the file's order and captions their order within it.
  """
  captions = collections.defaultdict(list)
  with pathlib.Path(token_file).open(encoding='utf-8') as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      key, sep, caption = line.rstrip('\n').partition('\t')
      name, hash_sign, _ = key.rpartition('#')
      if not sep or not hash_sign:
        raise errors.UserError(
          f'{token_file}:{line_number}: expected '
          f'"name.jpg#n<TAB>caption", got {line.strip()!r}'
        )
      captions[name].append(caption.strip())
  return dict(captions)


def flickr_records(
  token_file: PathLike, image_names: list[str] | None, image_dir: PathLike
) -> list[Record]:
  """Records of the images `image_names` (all if None) of a token file."""
  captions = read_flickr_tokens(token_file)
  if image_names is None:
    image_names = list(captions)
  missing = [n for n in image_names if n not in captions]
  if missing:
    logging.warning(
      '%d images have no captions in %s and are left out, e.g. %s',
      len(missing),
      token_file,
      missing[0],
    )
  return [
    Record(
      pathlib.Path(n).stem, str(pathlib.Path(image_dir) / n), tuple(captions[n])
    )
    for n in image_names
    if n in captions
  ]


def _first_existing(
  directory: pathlib.Path, names: tuple[str, ...]
) -> pathlib.Path | None:
  for name in names:
    if (directory / name).exists():
      return directory / name
  return None


def _flickr_split(data_dir_name: str, split: str) -> list[Record]:
  if not data_dir_name or not pathlib.Path(data_dir_name).is_dir():
    raise errors.UserError(
      "dataset 'flickr' needs config.data_dir, the directory "
      f'of the Flickr token file (got {data_dir_name!r})'
    )
  data_dir = pathlib.Path(data_dir_name)
  token_file = _first_existing(data_dir, _FLICKR_TOKEN_FILES)
  if token_file is None:
    raise errors.UserError(
      f'no Flickr caption file in {data_dir}: expected one of '
      f'{", ".join(_FLICKR_TOKEN_FILES)}'
    )
  image_dir = (
    _first_existing(data_dir, _FLICKR_IMAGE_DIRS)
    or data_dir / _FLICKR_IMAGE_DIRS[0]
  )
  if split == 'all':
    return flickr_records(token_file, None, image_dir)
  pattern = f'Flickr_*.{_FLICKR_SPLIT_LISTS[split]}Images.txt'
  lists = sorted(data_dir.glob(pattern))
  if len(lists) != 1:
    raise errors.UserError(
      f'expected one split list {data_dir / pattern} for split {split!r}, '
      f'found {len(lists)}; use split "all" for every image of {token_file}'
    )
  names = [
    line.strip()
    for line in lists[0].read_text(encoding='utf-8').splitlines()
    if line.strip()
  ]
  return flickr_records(token_file, names, image_dir)


# --- Synthetic shapes ---------------------------------------------------------


def shapes_dir(config) -> pathlib.Path:
  """Where the shapes data of this config's seed and image size live."""
  root = pathlib.Path(config.data_dir or DEFAULT_SHAPES_DIR).expanduser()
  return root / f'seed{config.shapes.seed}_size{config.shapes.image_size}'


def example_images(config) -> list[str]:
  """A few images, never seen in training, for `capjax.sample` to try.

  `shapes` offers the first images of its test split; other data sets none.
  """
  if config.dataset != 'shapes':
    return []
  test = _shapes_records(config, 'test')[:_NUM_EXAMPLE_IMAGES]
  return [r.image for r in test if r.image is not None]  # files, all of them


def _shapes_records(config, split: str) -> list[Record]:
  directory = shapes_dir(config)
  if not shapes.is_written(directory, split, config.shapes):
    logging.info('Generating shapes split %r in %s', split, directory)
    shapes.write_split(directory, split, config.shapes)
  return coco_json_records(
    shapes.annotation_path(directory, split), directory / split
  )


# --- TFDS coco_captions -------------------------------------------------------


def _tfds_coco_builder(config, split: str):
  # Imported here: TFDS is slow to import and only this source needs it.
  import tensorflow_datasets as tfds  # noqa: PLC0415

  return tfds.builder('coco_captions', data_dir=config.data_dir or None)


def _tfds_coco_records(config, split: str) -> list[Record]:
  """The records of a TFDS coco_captions split, cached after the first read.

  Reading a split's captions from TFDS reads every image's bytes too
  (minutes for COCO's train split, on every process); the image ids and
  captions alone are kept in `capjax_captions_{split}.json` beside the
  prepared data, written atomically, and read from there afterwards.
  """
  builder = _tfds_coco_builder(config, split)
  cache = pathlib.Path(builder.data_dir) / f'capjax_captions_{split}.json'
  stamp = {
    'format': _TFDS_CACHE_FORMAT,
    'version': str(builder.version),
    'split': split,
  }
  if cache.is_file():
    data = files.read_json(cache)
    if {k: data.get(k) for k in stamp} == stamp:
      return [
        Record(image_id, None, tuple(captions))
        for image_id, captions in data['records']
      ]
  records = [
    Record(image_id, None, captions)
    for image_id, _, captions in _tfds_coco_examples(config, split, builder)
  ]
  try:
    cache.parent.mkdir(parents=True, exist_ok=True)
    files.write_json_atomic(
      cache,
      dict(stamp, records=[[r.image_id, list(r.captions)] for r in records]),
    )
  except OSError as e:
    logging.warning(
      'could not cache the captions of %r in %s (%s); they '
      'are read from TFDS at every start',
      split,
      cache,
      e,
    )
  return records


def _tfds_coco_examples(
  config, split: str, builder=None
) -> Iterator[tuple[str, bytes, tuple[str, ...]]]:
  """(image id, encoded image, captions) of a TFDS coco_captions split."""
  builder = builder or _tfds_coco_builder(config, split)
  import tensorflow_datasets as tfds  # noqa: PLC0415

  try:
    ds = builder.as_dataset(
      split=split,
      shuffle_files=False,
      decoders={'image': tfds.decode.SkipDecoding()},
    )
  except AssertionError:  # TFDS's way of saying "not prepared"
    data_dir = config.data_dir or '~/tensorflow_datasets'
    raise errors.UserError(
      f'TFDS coco_captions is not prepared in {builder.data_dir}: run '
      f'`tfds build coco_captions --data_dir={data_dir}` first (it downloads '
      'COCO 2014, about 20 GB of images), or set config.data_dir to the '
      'TFDS data_dir that holds it'
    ) from None
  for ex in tfds.as_numpy(ds):
    yield (
      str(ex['image/id']),
      ex['image'],
      tuple(t.decode('utf-8').strip() for t in ex['captions']['text']),
    )
