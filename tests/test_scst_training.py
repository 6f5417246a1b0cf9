"""SCST through the training loop: init_from, exact resume, checks, reports."""

import json
import shutil

import jax
import pytest

from capjax import errors
from capjax.testing import training as testing_lib
from capjax.training import checkpoints
from capjax.training import loop

# The SCST step compiles in about 5 s; each run compiles it.
pytestmark = pytest.mark.usefixtures('compilation_cache')


@pytest.fixture(scope='module')
def shapes_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('shapes')


@pytest.fixture(scope='module')
def source(shapes_dir, tmp_path_factory):
  """A cross-entropy workdir, the SCST runs' init_from."""
  workdir = tmp_path_factory.mktemp('xent') / 'run'
  loop.train_and_evaluate(
    testing_lib.tiny_config(shapes_dir, num_caption_eval_images=8), str(workdir)
  )
  return workdir


def _scst_config(shapes_dir, source, **overrides):
  """4 SCST steps of 8 images, checkpoints every 2, one evaluation."""
  fields = dict(
    objective='scst',
    init_from=str(source),
    scst_samples=3,
    num_caption_eval_images=8,
    num_train_steps=4,
    checkpoint_every_steps=2,
    log_every_steps=2,
    eval_every_steps=4,
  )
  return testing_lib.tiny_config(shapes_dir, **(fields | overrides))


def test_scst_starts_from_init_from_and_resumes_exactly(
  shapes_dir, source, tmp_path
):
  start = loop.train_and_evaluate(
    _scst_config(shapes_dir, source, num_train_steps=0), str(tmp_path / 'start')
  )
  testing_lib.leaves_equal(
    start.params, checkpoints.restore_checkpoint(checkpoints.resolve(source))
  )
  assert (tmp_path / 'start' / 'vocab.json').read_text() == (
    source / 'vocab.json'
  ).read_text()

  config = _scst_config(shapes_dir, source)
  straight = loop.train_and_evaluate(config, str(tmp_path / 'straight'))
  # The resumed run's source is a copy, gone before the resume: a started
  # workdir has what it took from it.
  copy = tmp_path / 'source'
  shutil.copytree(source, copy)
  loop.train_and_evaluate(
    _scst_config(shapes_dir, copy, num_train_steps=2), str(tmp_path / 'resumed')
  )
  shutil.rmtree(copy)
  resumed = loop.train_and_evaluate(
    _scst_config(shapes_dir, copy), str(tmp_path / 'resumed')
  )
  assert int(resumed.step) == 4
  testing_lib.leaves_equal(resumed.params, straight.params)
  testing_lib.leaves_equal(resumed.opt_state, straight.opt_state)
  assert any(
    jax.tree_util.tree_leaves(
      jax.tree_util.tree_map(
        lambda a, b: bool((a != b).any()), straight.params, start.params
      )
    )
  )

  records = [
    json.loads(line)
    for line in (tmp_path / 'straight' / 'metrics.jsonl')
    .read_text()
    .splitlines()
  ]
  train = [r for r in records if r['split'] == 'train']
  assert train and all(
    {'reward', 'baseline', 'sample_length'} <= set(r) for r in train
  )
  assert all(r['sample_length'] >= 1 for r in train)
  assert any('cider' in r for r in records if r['split'] == 'eval')


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'units': 32}, r'holds another model: units 24 there, 32 here'),
    ({'init_from': ''}, r'set config.init_from'),
    (
      {'scst_baseline': 'mean', 'scst_samples': 1},
      r'scst_samples must be at '
      r"least 2 with the 'mean' baseline",
    ),
  ],
)
def test_scst_configs_that_cannot_work_are_refused_before_training(
  shapes_dir, source, tmp_path, overrides, message
):
  with pytest.raises(errors.UserError, match=message):
    loop.train_and_evaluate(
      _scst_config(shapes_dir, source, **overrides), str(tmp_path / 'run')
    )
  assert not (tmp_path / 'run' / 'checkpoints').exists()
