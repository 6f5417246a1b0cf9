"""capjax.data.datasets on the real COCO/Flickr8k slices and mocked TFDS."""

import functools
import io
import json
import os
import time

import numpy as np
from PIL import Image
import pytest

from capjax.configs import default
from capjax.data import datasets


def _config(dataset, data_dir=''):
  config = default.get_config()
  config.dataset = dataset
  config.data_dir = str(data_dir)
  return config


# --- COCO-format JSON ---------------------------------------------------------


def test_coco_json_finds_2017_files(shared_data):
  config = _config('coco_json', shared_data / 'coco-mini')
  val = datasets.load_split(config, 'val')
  train = datasets.load_split(config, 'train')
  assert (len(train), len(val)) == (80, 159)
  first = val[0]
  assert first.image_id == '397133'
  assert first.image == str(
    shared_data / 'coco-mini' / 'val2017' / '000000397133.jpg'
  )
  assert os.path.isfile(first.image)
  for record in val:
    assert len(record.captions) >= 5
    assert all(c == c.strip() and c for c in record.captions)
  both = datasets.load_split(config, 'train+val')
  assert both == train + val


def test_coco_json_captions_keep_annotation_order(shared_data):
  path = shared_data / 'coco-mini' / 'annotations' / 'captions_val2017.json'
  data = json.loads(path.read_text())
  expected = [
    a['caption'].strip() for a in data['annotations'] if a['image_id'] == 397133
  ]
  records = datasets.coco_json_records(str(path), 'images')
  assert records[0].captions == tuple(expected)
  assert records[0].image == os.path.join('images', '000000397133.jpg')


def test_coco_json_explicit_files(tmp_path, shared_data):
  annotations = {
    'images': [
      {'id': 5, 'file_name': 'b.png'},
      {'id': 3, 'file_name': 'a.png'},
      {'id': 9, 'file_name': 'no_captions.png'},
    ],
    'annotations': [
      {'id': 1, 'image_id': 3, 'caption': 'Three \n'},
      {'id': 2, 'image_id': 5, 'caption': 'five'},
      {'id': 3, 'image_id': 3, 'caption': 'three again'},
    ],
  }
  (tmp_path / 'mine.json').write_text(json.dumps(annotations))
  config = _config('coco_json', tmp_path)
  records = datasets.load_split(config, 'mine.json:pics')
  assert records == [
    datasets.Record('5', str(tmp_path / 'pics' / 'b.png'), ('five',)),
    datasets.Record(
      '3', str(tmp_path / 'pics' / 'a.png'), ('Three', 'three again')
    ),
  ]
  # Both paths are relative to data_dir, or absolute.
  config.data_dir = str(shared_data)
  split = f'{tmp_path}/mine.json:{tmp_path}/pics'
  assert datasets.load_split(config, split) == records
  with pytest.raises(ValueError, match='image directory .*pics of split'):
    list(datasets.iter_images(config, split))


def test_coco_json_errors(tmp_path, shared_data):
  config = _config('coco_json', shared_data / 'coco-mini')
  with pytest.raises(ValueError, match='captions_test2017.json'):
    datasets.load_split(config, 'test')
  with pytest.raises(ValueError, match='twice'):
    datasets.load_split(config, 'val+val')
  with pytest.raises(ValueError, match='needs config.data_dir'):
    datasets.load_split(_config('coco_json'), 'val')
  (tmp_path / 'bad.json').write_text(
    json.dumps(
      {
        'images': [{'id': 1}],
        'annotations': [{'image_id': 1, 'caption': 'no file name'}],
      }
    )
  )
  with pytest.raises(ValueError, match='not a COCO caption file'):
    datasets.load_split(_config('coco_json', tmp_path), 'bad.json:x')


def test_bad_splits():
  with pytest.raises(ValueError, match='joined with'):
    datasets.load_split(_config('shapes'), 'train+')
  with pytest.raises(ValueError, match='unknown shapes split'):
    datasets.load_split(_config('shapes'), 'restval')


# --- Flickr -------------------------------------------------------------------


def test_flickr8k_splits(shared_data):
  config = _config('flickr', shared_data / 'flickr8k')
  train = datasets.load_split(config, 'train')
  val = datasets.load_split(config, 'val')
  test = datasets.load_split(config, 'test')
  assert (len(train), len(val), len(test)) == (6000, 1000, 1000)
  assert sum(len(r.captions) for r in train) == 30000
  assert all(len(r.captions) == 5 for r in train + val + test)
  assert datasets.load_split(config, 'dev') == val
  ids = {r.image_id for r in train}
  assert not ids & {r.image_id for r in val + test}
  first = train[0]
  assert first.image_id == '2513260012_03d33305cf'
  assert first.captions[0] == (
    'A black dog is running after a white dog in the snow .'
  )
  assert first.image.endswith(
    os.path.join('Flicker8k_Dataset', '2513260012_03d33305cf.jpg')
  )
  # These captions come without their images.
  with pytest.raises(
    ValueError, match="Flicker8k_Dataset of split 'train' not found"
  ):
    next(datasets.iter_images(config, 'train'))
  with pytest.raises(ValueError, match="unknown flickr split 'restval'"):
    datasets.load_split(config, 'restval')


def test_flickr_all_with_images(shared_data):
  config = _config('flickr', shared_data / 'flickr8k-1k')
  records = datasets.load_split(config, 'all')
  assert len(records) == 1000
  assert sum(len(r.captions) for r in records) == 5000
  image_id, path = next(datasets.iter_images(config, 'all'))
  assert image_id == '1000268201_693b08cb0e'
  assert path == str(
    shared_data / 'flickr8k-1k' / 'images' / '1000268201_693b08cb0e.jpg'
  )
  with pytest.raises(ValueError, match='Flickr_\\*.trainImages.txt'):
    datasets.load_split(config, 'train')


def test_flickr_token_parsing(tmp_path):
  token_file = tmp_path / 'captions.txt'
  token_file.write_text(
    'x.jpg#0\tA cat .\n\ny.jpg#0\tA dog\t!\nx.jpg#1\tTwo cats .  \n',
    encoding='utf-8',
  )
  assert datasets.read_flickr_tokens(str(token_file)) == {
    'x.jpg': ['A cat .', 'Two cats .'],
    'y.jpg': ['A dog\t!'],
  }
  (tmp_path / 'Flickr_8k.testImages.txt').write_text('y.jpg\nmissing.jpg\n')
  records = datasets.load_split(_config('flickr', tmp_path), 'test')
  assert records == [
    datasets.Record(
      'y', str(tmp_path / 'Flicker8k_Dataset' / 'y.jpg'), ('A dog\t!',)
    )
  ]
  (tmp_path / 'Images').mkdir()
  assert datasets.load_split(_config('flickr', tmp_path), 'test')[0].image == (
    str(tmp_path / 'Images' / 'y.jpg')
  )
  token_file.write_text('x.jpg A cat\n')
  with pytest.raises(ValueError, match='captions.txt:1'):
    datasets.load_split(_config('flickr', tmp_path), 'all')
  with pytest.raises(ValueError, match='no Flickr caption file'):
    datasets.load_split(_config('flickr', tmp_path / 'Images'), 'all')


# --- TFDS coco_captions -------------------------------------------------------


def _png(value):
  buffer = io.BytesIO()
  Image.fromarray(np.full((4, 6, 3), value, np.uint8)).save(buffer, 'PNG')
  return buffer.getvalue()


_TFDS_EXAMPLES = {
  'train': [(11, ['A dog.', 'A DOG runs\n']), (12, ['A cat'])],
  'restval': [(13, ['x y', 'z'])],
  'val': [],
  'test': [],
}


def _mock_as_dataset(
  self, split, decoders=None, read_config=None, shuffle_files=False
):
  """What TFDS gives with decoders={'image': SkipDecoding()}: encoded images."""
  del self, decoders, read_config, shuffle_files
  import tensorflow as tf  # noqa: PLC0415

  examples = _TFDS_EXAMPLES[split]
  return tf.data.Dataset.from_tensor_slices(
    {
      'image': [_png(i) for i, _ in examples],
      'image/id': np.array([i for i, _ in examples], np.int64),
      'captions': {'text': tf.ragged.constant([c for _, c in examples])},
    }
  )


@pytest.fixture(name='mock_tfds')
def mock_tfds_fixture(tmp_path):
  """tfds.testing.mock_data with its data directory in the test's directory.

  capjax caches captions beside TFDS's prepared data: the mock's would
  otherwise be inside the installed package.
  """
  tfds = pytest.importorskip('tensorflow_datasets')
  metadata = tmp_path / 'metadata'
  metadata.mkdir()
  return functools.partial(tfds.testing.mock_data, data_dir=str(metadata))


def test_tfds_coco_with_mock_data(tmp_path, mock_tfds):
  config = _config('tfds_coco', tmp_path)
  with mock_tfds(as_dataset_fn=_mock_as_dataset):
    records = datasets.load_split(config, 'train+restval')
    images = list(datasets.iter_images(config, 'train+restval'))
  assert records == [
    datasets.Record('11', None, ('A dog.', 'A DOG runs')),
    datasets.Record('12', None, ('A cat',)),
    datasets.Record('13', None, ('x y', 'z')),
  ]
  assert [i for i, _ in images] == ['11', '12', '13']
  decoded = np.asarray(Image.open(io.BytesIO(images[2][1])))
  np.testing.assert_array_equal(decoded, np.full((4, 6, 3), 13, np.uint8))


def _refuse_as_dataset(*args, **kwargs):
  raise AssertionError('TFDS was read, not the cache')


def test_tfds_coco_captions_are_cached_after_the_first_read(
  tmp_path, mock_tfds
):
  config = _config('tfds_coco', tmp_path)
  with mock_tfds(as_dataset_fn=_mock_as_dataset):
    first = datasets.load_split(config, 'train')
  cache = list(tmp_path.rglob('capjax_captions_train.json'))
  assert len(cache) == 1 and not list(tmp_path.rglob('*.tmp'))
  # TFDS is not read again: a read would fail.
  with mock_tfds(as_dataset_fn=_refuse_as_dataset):
    start = time.perf_counter()
    again = datasets.load_split(config, 'train')
    seconds = time.perf_counter() - start
  assert again == first and seconds < 1.0
  # A cache of another TFDS version is read anew.
  data = json.loads(cache[0].read_text())
  cache[0].write_text(json.dumps(dict(data, version='0.0.1')))
  with mock_tfds(as_dataset_fn=_mock_as_dataset):
    assert datasets.load_split(config, 'train') == first
  assert json.loads(cache[0].read_text())['version'] == data['version']


def test_tfds_coco_errors(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  config = _config('tfds_coco', tmp_path)
  with pytest.raises(ValueError, match='tfds build coco_captions'):
    datasets.load_split(config, 'val')
  with pytest.raises(ValueError, match="unknown tfds_coco split 'validation'"):
    datasets.load_split(config, 'validation')
