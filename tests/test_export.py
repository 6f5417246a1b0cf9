"""capjax.export: a graph that captions as capjax.sample, run without capjax.

The reference client (examples/onnx_caption.py) and the SavedModel run in
processes where capjax, JAX and Flax cannot be imported; their token ids
must equal capjax's and their attention agree to 1e-5, for batches of 7 and
of 1 (the batch dimension is dynamic).
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from capjax import errors
from capjax import files
from capjax import inference
from capjax import workdir as workdir_lib
from capjax.data import images as images_lib
from capjax.exporting import artifact
from capjax.model import decoding
from capjax.testing import training as testing_lib

CLIENT = testing_lib.REPO_ROOT / 'examples' / 'onnx_caption.py'
_BLOCKED = ('capjax', 'jax', 'jaxlib', 'flax')

# Runs `body` in a fresh interpreter where the _BLOCKED packages cannot be
# imported, and checks at the end that none of them was.
_WITHOUT_CAPJAX = """
import sys
BLOCKED = set({blocked!r})
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in BLOCKED:
      raise ImportError(name + ' may not be imported here')
sys.meta_path.insert(0, Block())
{body}
assert not BLOCKED & set(sys.modules), BLOCKED & set(sys.modules)
"""

_RUN_CLIENT = """
import runpy
sys.argv = sys.argv[1:]
try:
  runpy.run_path(sys.argv[0], run_name='__main__')
except SystemExit as e:
  assert not e.code, e.code
"""


def run_without_capjax(body: str, *args) -> str:
  code = _WITHOUT_CAPJAX.format(blocked=_BLOCKED, body=body)
  result = subprocess.run(
    [sys.executable, '-c', code, *map(str, args)],
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def run_client(out: pathlib.Path, paths) -> list[dict]:
  stdout = run_without_capjax(
    _RUN_CLIENT, CLIENT, '--artifact', out, '--json', *paths
  )
  return [json.loads(line) for line in stdout.splitlines()]


@pytest.fixture(scope='module')
def trained(trained_workdir):
  return inference.load_trained(trained_workdir)


@pytest.fixture(scope='module')
def shapes_images(trained_workdir):
  """7 held-out shapes test images."""
  paths = sorted(trained_workdir.parent.glob('shapes/*/test/*.png'))[:7]
  assert len(paths) == 7
  return [str(p) for p in paths]


def capjax_captions(trained, paths, beam_size):
  """What capjax.sample computes for the images: texts and search.Captions."""
  extractor = inference.make_extractor(trained)
  features_NLD = extractor([images_lib.load_image(p) for p in paths])
  captions = decoding.caption_features(
    trained.params,
    features_NLD,
    model=trained.model,
    max_len=decoding.max_caption_tokens(trained.config),
    beam_size=beam_size,
  )
  texts = [
    r.caption
    for r in inference.caption_files(trained, paths, beam_size=beam_size)
  ]
  return texts, captions


def assert_same_captions(got: list[dict], texts, captions) -> None:
  """Client results equal capjax's: tokens, captions; attention to 1e-5."""
  tokens_BT = np.asarray(captions.tokens_BT)
  assert [g['caption'] for g in got] == texts
  np.testing.assert_array_equal([g['tokens'] for g in got], tokens_BT)
  np.testing.assert_allclose(
    [g['log_prob'] for g in got], captions.log_prob_B, atol=1e-4
  )
  for g, attention_TL, n in zip(
    got, np.asarray(captions.attention_BTL), np.asarray(captions.lengths_B)
  ):
    np.testing.assert_allclose(g['attention'], attention_TL[:n], atol=1e-5)


def _export(trained_workdir, tmp_path_factory, **kwargs):
  out = tmp_path_factory.mktemp('export')
  return artifact.export_workdir(trained_workdir, out, **kwargs)


@pytest.fixture(scope='module')
def onnx_greedy(trained_workdir, tmp_path_factory):
  return _export(trained_workdir, tmp_path_factory)


@pytest.mark.slow
def test_artifact_layout_and_metadata(onnx_greedy, trained):
  out = onnx_greedy.out
  assert (out / 'model' / '1' / 'model.onnx').is_file()
  config = (out / 'model' / 'config.pbtxt').read_text()
  assert 'dynamic_batching' in config and 'name: "pixels"' in config
  meta = files.read_json(out / 'capjax_export.json')
  assert meta['checkpoint_step'] == trained.step == 200
  assert meta['preprocessing']['image_size'] == 64
  assert meta['tokens'] | {'vocab_size': 0} == {
    'pad': 0,
    'start': 1,
    'end': 2,
    'unk': 3,
    'vocab': 'vocab.json',
    'vocab_size': 0,
  }
  assert meta['inputs'] == [
    {'name': 'pixels', 'dtype': 'float32', 'shape': ['batch', 64, 64, 3]}
  ]
  assert [o['name'] for o in meta['outputs']] == [
    'tokens',
    'lengths',
    'log_prob',
    'attention',
  ]
  assert files.read_json(out / 'vocab.json') == files.read_json(
    pathlib.Path(trained.config.data_dir).parent
    / 'workdir'
    / workdir_lib.VOCAB_FILE
  )


@pytest.mark.slow
def test_onnx_client_without_capjax_equals_sample_greedy(
  onnx_greedy, trained, shapes_images
):
  for paths in (shapes_images, shapes_images[3:4]):
    texts, captions = capjax_captions(trained, paths, beam_size=1)
    assert_same_captions(run_client(onnx_greedy.out, paths), texts, captions)


@pytest.mark.slow
def test_onnx_client_without_capjax_equals_sample_beam(
  trained_workdir, tmp_path_factory, trained, shapes_images
):
  exported = _export(trained_workdir, tmp_path_factory, beam_size=3)
  for paths in (shapes_images, shapes_images[3:4]):
    texts, captions = capjax_captions(trained, paths, beam_size=3)
    assert_same_captions(run_client(exported.out, paths), texts, captions)


# Loads the SavedModel and captions the images twice, from their encoded
# bytes (serving_default) and from capjax's resized pixels ('pixels').
_RUN_SAVED_MODEL = """
import json
import numpy as np
import tensorflow as tf
model_dir, pixels_path, *paths = sys.argv[1:]
model = tf.saved_model.load(model_dir)
data = tf.constant([open(p, 'rb').read() for p in paths])
by_input = {
  'bytes': model.signatures['serving_default'](image_bytes=data),
  'pixels': model.signatures['pixels'](
    pixels=tf.constant(np.load(pixels_path))
  ),
}
print(json.dumps({
  name: {k: v.numpy().tolist() if k != 'caption' else
         [c.decode() for c in v.numpy()] for k, v in out.items()}
  for name, out in by_input.items()
}))
"""


@pytest.mark.slow
@pytest.mark.parametrize('beam_size', [1, 3])
def test_saved_model_without_capjax_equals_sample(
  trained_workdir, tmp_path_factory, trained, shapes_images, beam_size
):
  exported = _export(
    trained_workdir, tmp_path_factory, fmt='saved_model', beam_size=beam_size
  )
  assert exported.model == exported.out / 'model' / '1' / 'saved_model.pb'
  extractor = inference.make_extractor(trained)
  for paths in (shapes_images, shapes_images[3:4]):
    pixels = exported.out / f'pixels{len(paths)}.npy'
    np.save(
      pixels,
      np.stack([extractor.prepare(images_lib.load_image(p)) for p in paths]),
    )
    got = json.loads(
      run_without_capjax(
        _RUN_SAVED_MODEL, exported.model.parent, pixels, *paths
      )
    )
    texts, captions = capjax_captions(trained, paths, beam_size)
    for out in got.values():
      assert out['caption'] == texts
      rows = [
        {'caption': c, 'tokens': t, 'log_prob': p, 'attention': a[:n]}
        for c, t, p, a, n in zip(
          out['caption'],
          out['tokens'],
          out['log_prob'],
          out['attention'],
          out['lengths'],
        )
      ]
      assert_same_captions(rows, texts, captions)


def _workdir_copy(trained_workdir, tmp_path, features=None, **config_fields):
  """The trained workdir with another features.json or config fields."""
  workdir = tmp_path / 'workdir'
  workdir.mkdir()
  for name in (workdir_lib.VOCAB_FILE, workdir_lib.FEATURES_FILE):
    (workdir / name).write_bytes((trained_workdir / name).read_bytes())
  (workdir / 'best_checkpoint').symlink_to(trained_workdir / 'best_checkpoint')
  (workdir / 'checkpoints').symlink_to(trained_workdir / 'checkpoints')
  config = workdir_lib.load_config(trained_workdir)
  for key, value in config_fields.items():
    config[key] = value
  workdir_lib.save_config(workdir, config)
  if features is not None:
    workdir_lib.save_json(workdir / workdir_lib.FEATURES_FILE, features)
  return workdir


def test_features_from_numpy_need_from_features(trained_workdir, tmp_path):
  features = files.read_json(trained_workdir / workdir_lib.FEATURES_FILE)
  features['extractor'] = {'name': 'custom'}
  workdir = _workdir_copy(trained_workdir, tmp_path, features)
  with pytest.raises(errors.UserError, match='--from_features') as e:
    artifact.export_workdir(workdir, tmp_path / 'out')
  assert "'custom'" in str(e.value) and '--from_numpy' in str(e.value)
  assert '\n' not in str(e.value)


def test_keras_only_inception_weights_have_no_jax_form(
  trained_workdir, tmp_path
):
  features = {
    'extractor': {'name': 'inception_v3', 'weights': 'x', 'backend': 'keras'},
    'num_locations': 16,
    'feature_dim': 784,
  }
  workdir = _workdir_copy(
    trained_workdir, tmp_path, features, extractor_weights='my_model.keras'
  )
  with pytest.raises(errors.UserError, match='no JAX form') as e:
    artifact.export_workdir(workdir, tmp_path / 'out')
  assert 'my_model.keras' in str(e.value) and '--from_features' in str(e.value)


def test_a_primitive_the_converter_lacks_is_named(
  trained_workdir, tmp_path, monkeypatch
):
  import jax2onnx  # noqa: PLC0415

  def no_rule(*args, **kwargs):
    raise NotImplementedError(
      "[lowering] No plugins registered for primitive 'top_k'"
    )

  monkeypatch.setattr(jax2onnx, 'to_onnx', no_rule)
  with pytest.raises(errors.UserError) as e:
    artifact.export_workdir(trained_workdir, tmp_path / 'out', beam_size=3)
  assert "'top_k'" in str(e.value) and 'beam search' in str(e.value)


def test_program_reports_an_unexportable_workdir_in_one_line(
  trained_workdir, tmp_path
):
  features = files.read_json(trained_workdir / workdir_lib.FEATURES_FILE)
  features['extractor'] = {'name': 'custom'}
  workdir = _workdir_copy(trained_workdir, tmp_path, features)
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'capjax.export',
      f'--workdir={workdir}',
      f'--out={tmp_path / "out"}',
    ],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'Traceback' not in result.stderr


def _inception_workdir(workdir: pathlib.Path, shared_data: pathlib.Path):
  """A workdir of random parameters on JAX InceptionV3 ('none' weights)."""
  from capjax.configs import default  # noqa: PLC0415
  from capjax.data import vocab as vocab_lib  # noqa: PLC0415

  config = default.get_config()
  config.extractor, config.extractor_weights = 'inception_v3', 'none'
  config.extractor_backend = 'jax'
  config.embedding_dim, config.units = 16, 32
  config.max_caption_len = 16
  annotations = files.read_json(
    shared_data / 'coco-mini' / 'annotations' / 'captions_val2017.json'
  )['annotations']
  vocab = vocab_lib.Vocab.build([a['caption'] for a in annotations], 200)
  testing_lib.write_inception_workdir(workdir, config, vocab)
  return workdir


@pytest.mark.slow
def test_inception_on_real_photos_greedy(tmp_path, shared_data):
  """32 COCO photos through InceptionV3 (random weights): capjax's tokens."""
  workdir = _inception_workdir(tmp_path / 'workdir', shared_data)
  exported = artifact.export_workdir(workdir, tmp_path / 'out')
  paths = sorted(
    str(p) for p in (shared_data / 'coco-mini' / 'val2017').glob('*.jpg')
  )
  paths = paths[:32]
  trained = inference.load_trained(workdir)
  texts, captions = capjax_captions(trained, paths, beam_size=1)
  assert_same_captions(run_client(exported.out, paths), texts, captions)
