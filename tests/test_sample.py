"""capjax.inference, capjax.sample, capjax.plots: captions, attention plots."""

import dataclasses
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from capjax import inference
from capjax import plots
from capjax import workdir as workdir_lib
from capjax.data import images as images_lib
from capjax.model import decoding


@pytest.fixture(scope='module')
def trained(trained_workdir):
  return inference.load_trained(trained_workdir)


@pytest.fixture(scope='module')
def examples(trained_workdir):
  """The held-out shapes test images training copied into the workdir."""
  paths = sorted(str(p) for p in (trained_workdir / 'examples').glob('*.png'))
  assert len(paths) == 4
  return paths


def _words(trained):
  return set(trained.vocab.words[4:])  # real words, no special tokens


def test_load_trained(trained, trained_workdir):
  assert trained.step == 200
  assert trained.feature_shape_LD == (16, 16 * 16 * 3 + 16)
  assert trained.model.units == 32
  assert trained.model.vocab_size == trained.vocab.size
  assert trained.config == workdir_lib.load_config(trained_workdir)


def test_captions_equal_decoding_the_extracted_features(
  trained, examples, tmp_path
):
  extractor = inference.make_extractor(trained)
  images = [images_lib.load_image(p) for p in examples]
  features_NLD = extractor(images)
  expected = trained.vocab.decode_rows(
    decoding.greedy_captions(
      trained.params,
      features_NLD,
      model=trained.model,
      max_len=decoding.max_caption_tokens(trained.config),
    ).tokens_BT
  )
  # The same features as .npy files, flat (L, D) and as a (4, 4, D) grid.
  flat, grid = tmp_path / 'flat.npy', tmp_path / 'grid.npy'
  np.save(flat, features_NLD[0])
  np.save(grid, features_NLD[1].reshape(4, 4, -1))
  results = inference.caption_files(trained, examples + [str(flat), str(grid)])

  assert [r.path for r in results] == examples + [str(flat), str(grid)]
  assert [r.caption for r in results] == expected + expected[:2]
  assert all(r.error is None for r in results)
  for r, image in zip(results, images):
    np.testing.assert_array_equal(r.image_HW3, image)
  assert results[-1].image_HW3 is None
  # Real shapes captions: known words that ended with <end>, not cut.
  for r in results:
    words = r.caption.split()
    assert 3 <= len(words) < decoding.max_caption_tokens(trained.config)
    assert set(words) <= _words(trained)
    assert words[-1] in ('circle', 'square', 'triangle')
    np.testing.assert_allclose(
      r.attention_TL[: len(words)].sum(-1), 1.0, rtol=1e-5
    )


def test_beam_and_sampling_give_shapes_captions(trained, examples):
  beams = inference.caption_files(trained, examples, beam_size=3, alpha=0.6)
  sampled = inference.caption_files(trained, examples, temperature=0.7, seed=1)
  again = inference.caption_files(trained, examples, temperature=0.7, seed=1)
  assert [r.caption for r in sampled] == [r.caption for r in again]
  for r in beams + sampled:
    assert r.caption and set(r.caption.split()) <= _words(trained)


def test_unreadable_files_are_reported_and_the_others_captioned(
  trained, examples, tmp_path
):
  corrupt = tmp_path / 'corrupt.jpg'
  corrupt.write_bytes(b'\xff\xd8 not really a jpeg')
  truncated = tmp_path / 'truncated.png'
  truncated.write_bytes(open(examples[0], 'rb').read()[:100])
  wrong_shape = tmp_path / 'wrong.npy'
  np.save(wrong_shape, np.zeros((16, 5), np.float32))
  missing = str(tmp_path / 'missing.png')
  paths = [str(corrupt), examples[0], missing, str(truncated), str(wrong_shape)]
  results = inference.caption_files(trained, paths)

  assert [r.path for r in results] == paths
  failed = [r for r in results if r.error is not None]
  assert [r.path for r in failed] == [
    str(corrupt),
    missing,
    str(truncated),
    str(wrong_shape),
  ]
  assert 'MissingFileError: no such file' in failed[1].error
  assert 'this model needs (L, D) = (16, 784)' in failed[3].error
  assert (
    results[1].caption
    == inference.caption_files(trained, examples[:1])[0].caption
  )


def test_missing_extractor_weights_fail_only_images(
  trained, examples, tmp_path, monkeypatch
):
  keras = pytest.importorskip('keras')
  monkeypatch.setenv('KERAS_HOME', str(tmp_path))

  def no_network(*args, **kwargs):
    raise Exception('URL fetch failure: no network')  # what Keras raises

  monkeypatch.setattr(keras.utils, 'get_file', no_network)
  config = trained.config.copy_and_resolve_references()
  config.extractor, config.extractor_weights = 'inception_v3', 'imagenet'
  inception = dataclasses.replace(trained, config=config)
  with pytest.raises(ValueError, match='InceptionV3 ImageNet weights'):
    inference.caption_files(inception, examples[:1])
  # Precomputed features need no extractor.
  features = tmp_path / 'features.npy'
  np.save(features, np.zeros(trained.feature_shape_LD, np.float32))
  assert inference.caption_files(inception, [str(features)])[0].error is None


def test_not_a_workdir_and_no_checkpoint(trained_workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match='not a capjax workdir'):
    inference.load_trained(tmp_path)
  for name in (
    workdir_lib.CONFIG_FILE,
    workdir_lib.VOCAB_FILE,
    workdir_lib.FEATURES_FILE,
  ):
    shutil.copy(trained_workdir / name, tmp_path / name)
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    inference.load_trained(tmp_path)


def test_command_line(trained_workdir, examples, tmp_path):
  """After training (the fixture): captions, plots, and one corrupt image."""
  corrupt = tmp_path / 'corrupt.png'
  corrupt.write_bytes(b'not an image')
  plot_dir = tmp_path / 'plots'
  run = subprocess.run(
    [
      sys.executable,
      '-m',
      'capjax.sample',
      f'--workdir={trained_workdir}',
      '--beam_size=2',
      f'--plot_dir={plot_dir}',
      *examples[:2],
      str(corrupt),
      *examples[2:],
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  # The corrupt image fails; the others are captioned, in order.
  assert run.returncode == 1
  assert f'{corrupt}: UnsupportedImage: not an image' in run.stderr
  assert '1 of 5 files could not be captioned' in run.stderr
  assert 'Traceback' not in run.stderr
  lines = run.stdout.splitlines()
  assert [line.split(': ')[0] for line in lines] == examples
  assert all(len(line.split(': ')[1].split()) >= 3 for line in lines)
  assert sorted(p.name for p in plot_dir.iterdir()) == [
    'test_000000.png',
    'test_000001.png',
    'test_000002.png',
    'test_000003.png',
  ]


def test_command_line_without_checkpoint_says_so(
  trained_workdir, examples, tmp_path
):
  shutil.copy(trained_workdir / workdir_lib.CONFIG_FILE, tmp_path)
  shutil.copy(trained_workdir / workdir_lib.VOCAB_FILE, tmp_path)
  shutil.copy(trained_workdir / workdir_lib.FEATURES_FILE, tmp_path)
  run = subprocess.run(
    [
      sys.executable,
      '-m',
      'capjax.sample',
      f'--workdir={tmp_path}',
      examples[0],
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 1
  assert 'no checkpoint in' in run.stderr and 'capjax.train' in run.stderr
  assert 'Traceback' not in run.stderr and not run.stdout


@pytest.mark.parametrize(
  'flags, message',
  [
    (['--beam_size=0'], 'flag --beam_size=0: 0 is not a positive integer'),
    (['--alpha=-1'], 'flag --alpha=-1: -1.0 is not a non-negative number'),
    (['--temperature=-1'], 'flag --temperature=-1: -1.0 is not a non-neg'),
    (
      ['--beam_size=2', '--temperature=0.5'],
      'error: give --temperature (sampling) or --beam_size (search), not both',
    ),
  ],
)
def test_bad_decoder_flags_are_the_users_error(
  trained_workdir, examples, flags, message
):
  # The model raises ValueError on these; the program refuses them first.
  run = subprocess.run(
    [sys.executable, '-m', 'capjax.sample', f'--workdir={trained_workdir}']
    + flags
    + [examples[0]],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 1
  assert message in run.stderr
  assert 'Traceback' not in run.stderr and not run.stdout


# --- Attention plots ----------------------------------------------------------


def test_attention_grid():
  assert plots.attention_grid(64) == (8, 8)
  assert plots.attention_grid(16) == (4, 4)
  assert plots.attention_grid(1) == (1, 1)
  assert plots.attention_grid(10) == (1, 10)


@pytest.mark.parametrize(
  'num_panels, expected',
  [
    (1, (1, 1)),
    (2, (1, 2)),
    (3, (2, 2)),
    (4, (2, 2)),
    (5, (2, 3)),
    (7, (3, 3)),
    (10, (3, 4)),
    (13, (4, 4)),
    (17, (4, 5)),
  ],
)
def test_panel_layout(num_panels, expected):
  assert plots.panel_layout(num_panels) == expected


@pytest.mark.parametrize('num_words', [0, 1, 3, 4, 7])
@pytest.mark.parametrize(
  'num_positions, with_image', [(16, True), (6, True), (16, False)]
)
def test_plot_has_a_panel_per_word(
  tmp_path, num_words, num_positions, with_image
):
  rng = np.random.default_rng(0)
  attention = rng.dirichlet(np.ones(num_positions), size=num_words + 2)
  image = rng.integers(0, 255, (40, 30, 3), np.uint8) if with_image else None
  path = tmp_path / 'plot.png'
  plots.plot_attention(
    path, [f'w{i}' for i in range(num_words)], attention, image
  )
  rows, cols = plots.panel_layout(1 + num_words)
  # 2.5 inches a panel at 80 dpi.
  assert Image.open(path).size == (200 * cols, 200 * rows)


def test_plot_needs_attention_for_every_word(tmp_path):
  with pytest.raises(ValueError, match='3 words but attention for only 2'):
    plots.plot_attention(
      tmp_path / 'p.png', ['a', 'b', 'c'], np.ones((2, 4)) / 4
    )
