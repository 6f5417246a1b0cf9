"""capjax.data extractors, store and extraction; the capjax.features program."""

import json
import logging
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from capjax.configs import default
from capjax.data import datasets
from capjax.data import extraction
from capjax.data import extractors
from capjax.data import feature_store
from capjax.data import images as images_lib
from capjax.data import input_pipeline
from capjax.data import vocab as vocab_lib
from capjax.testing import real_data

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _coco_config(data_dir, **overrides):
  config = default.get_config()
  config.dataset = 'coco_json'
  config.data_dir = str(data_dir)
  config.update(overrides)
  return config


def _write_coco(path, file_names, ids=None, captions_per_image=2):
  """A COCO-format caption file for the given image files, ids 1, 2, ..."""
  ids = ids or range(1, len(file_names) + 1)
  images = [{'id': i, 'file_name': f} for i, f in zip(ids, file_names)]
  annotations = [
    {
      'id': len(file_names) * j + n,
      'image_id': i,
      'caption': f'picture {i} caption {j}',
    }
    for n, i in enumerate(ids)
    for j in range(captions_per_image)
  ]
  path.write_text(json.dumps({'images': images, 'annotations': annotations}))


class _Counting:
  """Wraps an extractor's features_fn to count the images it sees."""

  def __init__(self, extractor, fail_after=None):
    self.images = 0
    self._fn = extractor.features_fn
    self._fail_after = fail_after
    self.extractor = extractors.Extractor(
      extractor.info,
      extractor.image_size,
      extractor.num_locations,
      extractor.feature_dim,
      self,
    )

  def __call__(self, images):
    if self._fail_after is not None and self.images >= self._fail_after:
      raise KeyboardInterrupt('stopped')
    self.images += len(images)
    return self._fn(images)


# --- Images and extractors ----------------------------------------------------


def test_load_image_converts_modes_to_rgb(tmp_path):
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
  Image.fromarray(gray, 'L').save(tmp_path / 'gray.png')
  np.testing.assert_array_equal(
    images_lib.load_image(str(tmp_path / 'gray.png')),
    np.stack([gray] * 3, axis=-1),
  )
  Image.new('CMYK', (5, 2), (0, 255, 255, 0)).save(
    tmp_path / 'cmyk.jpg', quality=100
  )
  cmyk = images_lib.load_image(str(tmp_path / 'cmyk.jpg'))
  assert cmyk.shape == (2, 5, 3) and cmyk.dtype == np.uint8
  assert cmyk[0, 0, 0] > 240 and cmyk[0, 0, 1:].max() < 15  # red
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[0, 0] = (10, 20, 30, 255)  # opaque; the rest is transparent
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'alpha.png')
  with open(tmp_path / 'alpha.png', 'rb') as f:
    decoded = images_lib.load_image(f.read())
  np.testing.assert_array_equal(decoded[0, 0], (10, 20, 30))
  np.testing.assert_array_equal(decoded[1, 1], (255, 255, 255))


def test_numpy_resize_is_tensorflows(shared_data):
  """The JAX backend's resize against the tutorial's tf.image.resize.

  Real photos down (COCO, 640 px) and up (Flickr8k, 200-500 px) to
  InceptionV3's 299 and to 32, and odd shapes. Measured with TF 2.21 on a
  CPU: a largest difference of 0.0, bit for bit; the bound leaves room for
  a build whose kernel fuses multiply-adds.
  """
  coco = sorted((shared_data / 'coco-mini' / 'val2017').glob('*.jpg'))[:6]
  flickr = sorted((shared_data / 'flickr8k-1k').rglob('*.jpg'))[:6]
  rng = np.random.default_rng(0)
  pictures = [images_lib.load_image(p) for p in coco + flickr] + [
    rng.integers(0, 256, shape, np.uint8)
    for shape in ((1, 1, 3), (1, 7, 3), (5, 1000, 3))
  ]
  worst = 0.0
  for image_HW3 in pictures:
    for size in (299, 32):
      ours = images_lib.resize_bilinear(image_HW3, size)
      assert ours.shape == (size, size, 3) and ours.dtype == np.float32
      theirs = images_lib.resize(image_HW3, size)
      worst = max(worst, float(np.abs(ours - theirs).max()))
  assert worst <= 1e-4, worst


def test_patches_extractor_cuts_row_major_cells():
  extractor = extractors.patches_extractor(2)
  p = extractors.PATCH_SIZE
  assert (
    extractor.image_size,
    extractor.num_locations,
    extractor.feature_dim,
  ) == (2 * p, 4, 3 * p * p + 4)
  image = np.zeros((2 * p, 2 * p, 3), np.uint8)
  image[:p, p:] = 255  # top right cell white
  image[p:, :p, 0] = 51  # bottom left cell dark red
  grid = extractor([image])
  assert grid.shape == (1, 4, 3 * p * p + 4)
  pixels, positions = grid[0, :, :-4], grid[0, :, -4:]
  np.testing.assert_allclose(pixels[0], -1.0)
  np.testing.assert_allclose(pixels[1], 1.0)
  np.testing.assert_allclose(pixels[2].reshape(p * p, 3)[:, 0], -0.6)
  np.testing.assert_allclose(pixels[2].reshape(p * p, 3)[:, 1:], -1.0)
  np.testing.assert_allclose(pixels[3], -1.0)
  np.testing.assert_array_equal(positions, np.eye(4))


def test_missing_imagenet_weights_say_where_to_put_them(tmp_path, monkeypatch):
  keras = pytest.importorskip('keras')
  monkeypatch.setenv('KERAS_HOME', str(tmp_path))

  def no_network(*args, **kwargs):
    raise Exception('URL fetch failure: no network')  # what Keras raises

  monkeypatch.setattr(keras.utils, 'get_file', no_network)
  expected = (
    tmp_path
    / 'models'
    / ('inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5')
  )
  with pytest.raises(ValueError) as error:
    extractors.inception_v3_extractor('imagenet')
  message = str(error.value)
  assert str(expected) in message and 'no network' in message
  assert 'storage.googleapis.com' in message
  # A cached file is used without any download.
  expected.parent.mkdir()
  expected.write_bytes(b'')
  assert extractors.inception_weights_path() == str(expected)
  with pytest.raises(ValueError, match='existing weights file'):
    extractors.inception_v3_extractor(str(tmp_path / 'missing.h5'))


@pytest.fixture(scope='module')
def inception():
  """InceptionV3 with random weights (built once: it takes seconds)."""
  return extractors.inception_v3_extractor('none')


# --- Real COCO images through the store and the pipeline ----------------------


def test_inception_v3_coco_through_store_and_pipeline(
  tmp_path, shared_data, inception
):
  split = real_data.coco_val_split(tmp_path, shared_data, 4)
  config = _coco_config(
    tmp_path,
    extractor='inception_v3',
    extractor_weights='none',
    extract_batch_size=3,
    shard_size=3,
    batch_size=8,
    max_caption_len=24,
    bucket_lengths=(12, 24),
  )
  store = extraction.extract_split(
    config, split, str(tmp_path / 'f'), extractor=inception
  )
  records = datasets.load_split(config, split)
  assert store.image_ids == tuple(r.image_id for r in records)
  assert (len(store), store.num_locations, store.feature_dim) == (4, 64, 2048)
  assert store.dtype == np.float16
  assert store.extractor == {
    'name': 'inception_v3',
    'weights': 'none',
    'backend': 'keras',
  }  # 'auto' on a CPU
  grids = store.read_all()
  assert np.isfinite(grids).all() and grids.std() > 0
  direct = inception([images_lib.load_image(records[3].image)])
  np.testing.assert_allclose(grids[3], direct[0], rtol=1e-2, atol=1e-2)

  vocab = vocab_lib.Vocab.build([c for r in records for c in r.captions], 100)
  batch = next(
    input_pipeline.train_batches(config, store, records, vocab).iterator(0)
  )
  assert batch['features'].shape == (8, 64, 2048)
  assert batch['features'].dtype == np.float16
  assert batch['tokens'].dtype == np.int32
  assert batch['tokens'].shape[1] in (12, 24)
  assert (batch['tokens'][:, 0] == vocab.start_id).all()
  assert ((batch['tokens'] == vocab.end_id).sum(axis=1) == 1).all()


def test_patches_coco_train_through_store_and_pipeline(tmp_path, shared_data):
  config = _coco_config(
    shared_data / 'coco-mini', patch_grid=3, shard_size=32, batch_size=16
  )
  store = extraction.extract_split(config, 'train', str(tmp_path))
  records = datasets.load_split(config, 'train')
  assert len(store) == 80 and not store.failed
  assert sorted(os.listdir(tmp_path / 'train')) == [
    'metadata.json',
    'shard-00000.npy',
    'shard-00001.npy',
    'shard-00002.npy',
  ]
  p = extractors.PATCH_SIZE
  assert (store.num_locations, store.feature_dim) == (9, 3 * p * p + 9)
  extractor = extractors.make_extractor(config)
  row = store.index_of([records[5].image_id])
  np.testing.assert_allclose(
    store.read(row)[0],
    extractor([images_lib.load_image(records[5].image)])[0],
    atol=1e-3,
  )
  vocab = vocab_lib.Vocab.build([c for r in records for c in r.captions], 1000)
  batches = input_pipeline.eval_iterator(config, store, records, vocab)
  total = 0
  for batch in batches:
    assert batch['features'].shape == (16, 9, 3 * p * p + 9)
    assert batch['features'].dtype == np.float16
    total += int(batch['mask'].sum())
  assert total == sum(len(r.captions) for r in records)


# --- Unreadable images --------------------------------------------------------


def test_corrupt_and_non_image_files_are_reported_and_skipped(
  tmp_path, shared_data, caplog
):
  images = tmp_path / 'pics'
  images.mkdir()
  real = shared_data / 'coco-mini' / 'val2017' / '000000397133.jpg'
  jpeg = real.read_bytes()
  (images / 'good.jpg').write_bytes(jpeg)
  (images / 'truncated.jpg').write_bytes(jpeg[: len(jpeg) // 3])
  (images / 'text.jpg').write_text('not an image')
  (images / 'empty.png').write_bytes(b'')
  Image.new('L', (30, 20), 128).save(images / 'gray.png')
  Image.new('CMYK', (30, 20), (0, 0, 0, 0)).save(images / 'cmyk.jpg')
  names = [
    'good.jpg',
    'truncated.jpg',
    'text.jpg',
    'missing.jpg',
    'gray.png',
    'empty.png',
    'cmyk.jpg',
  ]
  _write_coco(tmp_path / 'c.json', names)
  config = _coco_config(
    tmp_path, patch_grid=1, shard_size=3, extract_batch_size=2
  )
  with caplog.at_level(logging.WARNING):
    store = extraction.extract_split(config, 'c.json:pics', str(tmp_path / 'f'))
  assert store.image_ids == ('1', '5', '7')
  assert [image_id for image_id, _ in store.failed] == ['2', '3', '4', '6']
  assert 'MissingFileError: no such file' in dict(store.failed)['4']
  summary = [
    r.getMessage()
    for r in caplog.records
    if 'could not be read' in r.getMessage()
  ]
  assert len(summary) == 1
  assert summary[0].startswith('4 images of')
  for image_id in ('2', '3', '4', '6'):
    assert f'\n  {image_id}: ' in summary[0]
  gray = store.read(store.index_of(['5']))[0]
  # Its pixels, that is, all but the one-hot position code.
  np.testing.assert_allclose(gray[:, :-1], 128 / 127.5 - 1, atol=1e-3)
  # The pipeline only sees the images that have features.
  records = datasets.load_split(config, 'c.json:pics')
  vocab = vocab_lib.Vocab.build([c for r in records for c in r.captions], 10)
  examples = input_pipeline.make_examples(store, records, vocab, 10)
  assert len(examples) == 6
  np.testing.assert_array_equal(examples.image_index, [0, 0, 1, 1, 2, 2])


# --- Resuming -----------------------------------------------------------------


def _five_pngs(tmp_path):
  images = tmp_path / 'pics'
  images.mkdir()
  for i in range(5):
    Image.new('RGB', (20, 20), (i * 50, 10, 10)).save(images / f'{i}.png')
  _write_coco(tmp_path / 'c.json', [f'{i}.png' for i in range(5)])
  return _coco_config(
    tmp_path, patch_grid=1, shard_size=2, extract_batch_size=2
  )


def test_rerun_skips_finished_shards(tmp_path):
  config = _five_pngs(tmp_path)
  split, out = 'c.json:pics', str(tmp_path / 'f')
  interrupted = _Counting(extractors.make_extractor(config), fail_after=4)
  with pytest.raises(KeyboardInterrupt):
    extraction.extract_split(config, split, out, interrupted.extractor)
  assert interrupted.images == 4
  store_dir = feature_store.store_dir(out, split)
  assert sorted(os.listdir(store_dir)) == [
    'metadata.json',
    'shard-00000.json',
    'shard-00000.npy',
    'shard-00001.json',
    'shard-00001.npy',
  ]
  with pytest.raises(ValueError, match='incomplete'):
    feature_store.FeatureStore.open(store_dir)

  resumed = _Counting(extractors.make_extractor(config))
  store = extraction.extract_split(config, split, out, resumed.extractor)
  assert resumed.images == 1  # only the last shard's image
  assert store.image_ids == ('1', '2', '3', '4', '5')
  fresh = extraction.extract_split(config, split, str(tmp_path / 'fresh'))
  np.testing.assert_array_equal(store.read_all(), fresh.read_all())

  again = _Counting(extractors.make_extractor(config))
  mtimes = {
    f: os.stat(os.path.join(store_dir, f)).st_mtime_ns
    for f in os.listdir(store_dir)
    if f.endswith('.npy')
  }
  extraction.extract_split(config, split, out, again.extractor)
  assert again.images == 0
  assert mtimes == {
    f: os.stat(os.path.join(store_dir, f)).st_mtime_ns
    for f in os.listdir(store_dir)
    if f.endswith('.npy')
  }


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_resume_and_write_the_store_one_writes(tmp_path):
  config = default.get_config()  # `shapes` and `patches`
  config.data_dir = str(tmp_path / 'shapes')
  config.shapes.num_train = 36
  config.shard_size, config.extract_batch_size = 8, 4  # 5 shards, 1 short
  one = extraction.extract_split(config, 'train', str(tmp_path / 'one'))
  # A first run stops after shards 0 and 1; each process resumes its own.
  interrupted = _Counting(extractors.make_extractor(config), fail_after=16)
  with pytest.raises(KeyboardInterrupt):
    extraction.extract_split(
      config, 'train', str(tmp_path / 'two'), interrupted.extractor
    )
  address = f'127.0.0.1:{_free_port()}'
  env = dict(
    os.environ, JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo', JAX_PLATFORMS='cpu'
  )
  processes = [
    subprocess.Popen(
      [
        sys.executable,
        '-m',
        'capjax.features',
        f'--config.data_dir={config.data_dir}',
        '--config.shapes.num_train=36',
        '--config.shard_size=8',
        '--config.extract_batch_size=4',
        '--split=train',
        f'--feature_dir={tmp_path / "two"}',
        f'--coordinator_address={address}',
        '--num_processes=2',
        f'--process_id={i}',
      ],
      env=env,
      cwd=_REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-3000:]
  # Shards 0, 2, 4 (8 + 8 + 4 images) and 1, 3 (8 + 8), less 0 and 1.
  assert 'process 0 of 2: 12 images extracted' in outputs[0]
  assert 'process 1 of 2: 8 images extracted' in outputs[1]
  assert all('8 already done, finished' in out for out in outputs)
  store_one = feature_store.store_dir(tmp_path / 'one', 'train')
  store_two = feature_store.store_dir(tmp_path / 'two', 'train')
  names = sorted(os.listdir(store_one))
  assert names == ['metadata.json'] + [f'shard-0000{k}.npy' for k in range(5)]
  assert sorted(os.listdir(store_two)) == names
  for name in names:
    assert (store_two / name).read_bytes() == (store_one / name).read_bytes()
  assert len(one) == 36


def test_rerun_refuses_other_settings_or_images(tmp_path):
  config = _five_pngs(tmp_path)
  split, out = 'c.json:pics', str(tmp_path / 'f')
  extraction.extract_split(config, split, out)
  config.patch_grid = 2
  with pytest.raises(ValueError, match='other settings'):
    extraction.extract_split(config, split, out)
  config.patch_grid = 1
  files = [f'{i}.png' for i in range(5)]
  _write_coco(tmp_path / 'c.json', files, ids=[2, 1, 4, 3, 5])
  extraction.extract_split(config, split, out)  # same images per shard: fine
  _write_coco(tmp_path / 'c.json', files, ids=[1, 3, 2, 4, 5])
  with pytest.raises(ValueError, match='shard 0 differs'):
    extraction.extract_split(config, split, out)
  _write_coco(tmp_path / 'c.json', [f'{i}.png' for i in range(4)])
  with pytest.raises(
    ValueError, match='holds 3 shards but the data now makes 2'
  ):
    extraction.extract_split(config, split, out)


# --- The store ----------------------------------------------------------------


def test_write_feature_store_and_read_back(tmp_path):
  grids = np.arange(7 * 3 * 2, dtype=np.float32).reshape(7, 3, 2) / 4
  ids = [f'im{i}' for i in range(7)]
  store = feature_store.write_feature_store(
    str(tmp_path / 'a'), grids, ids, {'name': 'mine', 'layer': 4}, shard_size=3
  )
  assert len(os.listdir(tmp_path / 'a')) == 4  # 3 shards + metadata
  assert store.image_ids == tuple(ids)
  assert store.extractor == {'name': 'mine', 'layer': 4}
  assert (store.num_locations, store.feature_dim) == (3, 2)
  np.testing.assert_array_equal(
    store.read([6, 0, 3, 3, 4]), grids[[6, 0, 3, 3, 4]]
  )
  np.testing.assert_array_equal(store.read_all(), grids)
  assert store.read([]).shape == (0, 3, 2)
  np.testing.assert_array_equal(store.index_of(['im2', 'im0']), [2, 0])
  assert 'im3' in store and 'im9' not in store
  with pytest.raises(ValueError, match="'im9' is not in the feature store"):
    store.index_of(['im9'])
  with pytest.raises(ValueError, match='rows must be in'):
    store.read([7])
  with pytest.raises(ValueError, match='distinct'):
    feature_store.write_feature_store(
      str(tmp_path / 'b'), grids[:2], ['x', 'x'], {'name': 'mine'}
    )
  with pytest.raises(ValueError, match='2 image ids for 7'):
    feature_store.write_feature_store(
      str(tmp_path / 'b'), grids, ['x', 'y'], {'name': 'mine'}
    )


def test_open_split_joins_stores_and_reports_missing(tmp_path):
  grids = np.ones((2, 3, 2), np.float32)
  info = {'name': 'mine'}
  feature_store.write_feature_store(
    feature_store.store_dir(str(tmp_path), 'train'), grids, ['a', 'b'], info
  )
  feature_store.write_feature_store(
    feature_store.store_dir(str(tmp_path), 'restval'),
    2 * grids,
    ['c', 'd'],
    info,
  )
  store = feature_store.FeatureStore.open_split(str(tmp_path), 'train+restval')
  assert store.image_ids == ('a', 'b', 'c', 'd')
  np.testing.assert_array_equal(store.read([3, 0])[:, 0, 0], [2, 1])
  with pytest.raises(ValueError, match='no feature store in .*val'):
    feature_store.FeatureStore.open_split(str(tmp_path), 'val')
  feature_store.write_feature_store(
    feature_store.store_dir(str(tmp_path), 'other'),
    grids,
    ['e', 'f'],
    {'name': 'theirs'},
  )
  with pytest.raises(ValueError, match='extractor differ'):
    feature_store.FeatureStore.open_split(str(tmp_path), 'train+other')


def _run_cli(*args):
  return subprocess.run(
    [sys.executable, '-m', 'capjax.features', *args],
    capture_output=True,
    text=True,
    check=False,
    cwd=os.path.dirname(os.path.dirname(__file__)),
  )


def test_cli_stores_features_from_numpy(tmp_path):
  grids = np.random.default_rng(0).normal(size=(5, 2, 2, 3)).astype(np.float32)
  np.save(tmp_path / 'grids.npy', grids)
  (tmp_path / 'ids.txt').write_text('a\nb\nc\nd\ne\n')
  result = _run_cli(
    f'--from_numpy={tmp_path}/grids.npy',
    f'--ids={tmp_path}/ids.txt',
    '--split=train',
    f'--feature_dir={tmp_path}/f',
    '--extractor_name=vit',
  )
  assert result.returncode == 0, result.stderr
  store = feature_store.FeatureStore.open_split(str(tmp_path / 'f'), 'train')
  assert store.extractor == {'name': 'vit'}
  np.testing.assert_allclose(
    store.read_all(), grids.reshape(5, 4, 3), atol=2e-3
  )


def test_cli_reports_user_errors_without_traceback(tmp_path):
  result = _run_cli('--config.dataset=coco_json', f'--feature_dir={tmp_path}')
  assert result.returncode == 1
  assert 'error: ' in result.stderr and 'needs config.data_dir' in (
    result.stderr
  )
  assert 'Traceback' not in result.stderr
