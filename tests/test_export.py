"""capjax.export: a graph that captions as capjax.sample does, run without capjax.

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
