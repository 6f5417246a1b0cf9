"""sample, evaluate and serve on InceptionV3 features of the JAX backend
never import TensorFlow, so they run on hosts where only JAX is installed.

Each program runs in a process of its own on a workdir of random weights
(a tiny captioner on InceptionV3's (64, 2048) grid, the JAX backend's
'none' weights), and reports at exit which TensorFlow modules it loaded.
"""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from capjax.configs import default
from capjax.data import datasets
from capjax.data import feature_store
from capjax.data import vocab as vocab_lib
from capjax.model import inception
from capjax.testing import real_data
from capjax.testing import training as testing_lib

_EXTRACTOR = {'name': 'inception_v3', 'weights': 'none', 'backend': 'jax'}
_LOADED = 'TensorFlow modules loaded: '

# Runs a program as `python -m` does, after `patch`; at exit (absl's app.run
# ends with sys.exit) it prints the TensorFlow modules that were imported.
_RUN_AND_REPORT = """
import atexit, runpy, sys
atexit.register(lambda: print({loaded!r} + repr(sorted(
    {{'tensorflow', 'keras', 'tensorflow_datasets'}} & set(sys.modules))),
    file=sys.stderr, flush=True))
{patch}
sys.argv = [{program!r}] + sys.argv[1:]
runpy.run_module({program!r}, run_name='__main__', alter_sys=True)
"""

# The server is built (model, extractor, image pool, app) but, instead of
# serving, prepares one real image as each upload is: decoded and resized.
_SERVE_ONE_IMAGE = """
from capjax import inference
from capjax.data import images
from capjax.serving import server
made = []
make_extractor = inference.make_extractor
inference.make_extractor = lambda t: made.append(make_extractor(t)) or made[0]
def prepare_one_image(app, sock, *args, **kwargs):
  sock.close()
  prepared = made[0].prepare(images.load_image({image!r}))
  print('prepared', prepared.shape, prepared.dtype, file=sys.stderr)
server.serve = prepare_one_image
"""


def _write_workdir(
  workdir: pathlib.Path, data_dir: pathlib.Path, split: str
) -> None:
  """A workdir of random parameters on JAX InceptionV3 features, with a
  store of random features for `split`."""
  config = default.get_config()
  config.dataset, config.data_dir = 'coco_json', str(data_dir)
  config.extractor, config.extractor_weights = 'inception_v3', 'none'
  config.extractor_backend = 'jax'
  config.embedding_dim, config.units = 8, 16
  records = datasets.load_split(config, split)
  vocab = vocab_lib.Vocab.build([c for r in records for c in r.captions], 50)
  testing_lib.write_inception_workdir(workdir, config, vocab)
  shape_LD = (inception.NUM_LOCATIONS, inception.FEATURE_DIM)
  features_NLD = (
    np.random.default_rng(0)
    .normal(size=(len(records), *shape_LD))
    .astype(np.float32)
  )
  feature_store.write_feature_store(
    feature_store.store_dir(workdir / 'features', split),
    features_NLD,
    [r.image_id for r in records],
    _EXTRACTOR,
  )


@pytest.fixture(scope='module')
def inception_workdir(tmp_path_factory, shared_data):
  root = tmp_path_factory.mktemp('jax_inception')
  split = real_data.coco_val_split(root, shared_data, 4)
  _write_workdir(root / 'workdir', root, split)
  image = sorted((shared_data / 'coco-mini' / 'val2017').glob('*.jpg'))[0]
  return root / 'workdir', split, str(image)


def _run(program: str, args, patch: str = '') -> subprocess.CompletedProcess:
  code = _RUN_AND_REPORT.format(loaded=_LOADED, patch=patch, program=program)
  result = subprocess.run(
    [sys.executable, '-c', code, *args],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=testing_lib.REPO_ROOT,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'{_LOADED}[]' in result.stderr, result.stderr[-3000:]
  return result


def test_sample_captions_a_real_image(inception_workdir):
  workdir, _, image = inception_workdir
  result = _run('capjax.sample', [f'--workdir={workdir}', image])
  assert result.stdout.startswith(f'{image}: ')


def test_evaluate(inception_workdir):
  workdir, split, _ = inception_workdir
  result = _run(
    'capjax.evaluate',
    [f'--workdir={workdir}', f'--split={split}', '--num_images=2'],
  )
  assert 'CIDEr' in result.stdout


def test_serve_loads_and_prepares_a_real_image(inception_workdir):
  workdir, _, image = inception_workdir
  result = _run(
    'capjax.serve',
    [f'--workdir={workdir}', '--port=0'],
    patch=_SERVE_ONE_IMAGE.format(image=image),
  )
  assert 'prepared (299, 299, 3) float32' in result.stderr
