"""capjax.evaluation and capjax.evaluate: captions, scores, command line."""

import json
import subprocess
import sys

import pytest

from capjax import captioning
from capjax import evaluation
from capjax import inference
from capjax.data import datasets
from capjax.data import feature_store
from capjax.metrics import coco as metrics
from capjax.model import decoding


@pytest.fixture(scope='module')
def trained(trained_workdir):
  return inference.load_trained(trained_workdir)


@pytest.fixture(scope='module')
def val_data(trained, trained_workdir):
  """The validation split's records and features, as training made them."""
  config = trained.config
  store = feature_store.FeatureStore.open_split(
    feature_store.resolve_feature_dir(config, str(trained_workdir)), 'val'
  )
  return store, datasets.load_split(config, 'val')


def test_generate_captions_in_padded_batches_equals_one_batch(
  trained, val_data
):
  store, records = val_data
  max_len = decoding.max_caption_tokens(trained.config)
  # 16 images in batches of 6: the last batch is padded with 2 empty rows.
  got = captioning.generate_captions(
    trained.params,
    trained.model,
    store,
    records,
    trained.vocab,
    max_len=max_len,
    batch_size=6,
  )
  whole = decoding.greedy_captions(
    trained.params,
    store.read(store.index_of(r.image_id for r in records)),
    model=trained.model,
    max_len=max_len,
  )
  assert list(got) == [r.image_id for r in records]
  assert list(got.values()) == trained.vocab.decode_rows(whole.tokens_BT)


def test_caption_metrics_for_training(trained, val_data):
  store, records = val_data
  got = captioning.caption_metrics(
    trained.params,
    trained.model,
    store,
    records,
    trained.vocab,
    trained.config,
    num_images=10,
  )
  captions = captioning.generate_captions(
    trained.params,
    trained.model,
    store,
    records[:10],
    trained.vocab,
    max_len=decoding.max_caption_tokens(trained.config),
    batch_size=10,
  )
  expected = metrics.score_captions(
    captions, {r.image_id: r.captions for r in records[:10]}, use_java=False
  )
  assert got == {'bleu4': expected['Bleu_4'], 'cider': expected['CIDEr']}
  # A model trained for 200 steps already says much of what the humans say.
  assert 0.1 < got['bleu4'] < 1 and got['cider'] > 0.2


def test_evaluate_split_without_java(trained, trained_workdir, monkeypatch):
  monkeypatch.setattr(metrics.shutil, 'which', lambda name: None)
  report = evaluation.evaluate_split(
    str(trained_workdir), 'val', beam_size=2, num_images=6
  )
  assert report['tokenizer'] == 'simple'
  assert report['num_images'] == 6 and report['step'] == 200
  assert report['decoder'] == {
    'name': 'beam2',
    'beam_size': 2,
    'alpha': 0.0,
    'max_len': decoding.max_caption_tokens(trained.config),
  }
  assert list(report['metrics']) == list(metrics.BLEU) + ['ROUGE_L', 'CIDEr']
  saved = json.loads((trained_workdir / 'metrics_val_beam2.json').read_text())
  assert saved == report
  results = json.loads(
    (trained_workdir / 'captions_val_beam2.json').read_text()
  )
  records = datasets.load_split(trained.config, 'val')[:6]
  assert [r['image_id'] for r in results] == [int(r.image_id) for r in records]
  assert report['metrics'] == metrics.score_captions(
    {str(r['image_id']): r['caption'] for r in results},
    {r.image_id: r.captions for r in records},
    use_java=False,
  )


def test_compare_with_itself_is_zero_with_a_zero_width_interval(
  trained_workdir, monkeypatch
):
  monkeypatch.setattr(metrics.shutil, 'which', lambda name: None)
  report = evaluation.evaluate_split(
    str(trained_workdir),
    'val',
    num_images=8,
    bootstrap=200,
    compare=str(trained_workdir),
  )
  comparison = report['comparison']
  assert comparison['other']['metrics'] == report['metrics']
  assert set(comparison['difference']) == set(report['metrics'])
  for diff in comparison['difference'].values():
    assert diff == {'value': 0.0, 'low': 0.0, 'high': 0.0}
  saved = json.loads(
    (trained_workdir / 'comparison_val_greedy.json').read_text()
  )
  assert saved == comparison
  # The model's own scores carry their intervals, which hold the scores.
  for name, (low, high) in report['intervals'].items():
    assert low <= report['metrics'][name] <= high
  assert report['bootstrap']['resamples'] == 200
  assert 'minus' in evaluation.format_report(report)


def test_compare_needs_resamples(trained_workdir):
  with pytest.raises(ValueError, match='--compare needs --bootstrap'):
    evaluation.evaluate_split(
      str(trained_workdir), 'val', compare=str(trained_workdir)
    )


def test_evaluate_split_errors(trained_workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match='not a capjax workdir'):
    evaluation.evaluate_split(str(tmp_path), 'test')
  with pytest.raises(ValueError, match="unknown shapes split 'nope'"):
    evaluation.evaluate_split(str(trained_workdir), 'nope')


def test_decoder_name():
  assert evaluation.decoder_name(1, 0.0) == 'greedy'
  assert evaluation.decoder_name(3, 0.0) == 'beam3'
  assert evaluation.decoder_name(3, 0.6) == 'beam3_alpha0.6'


@pytest.mark.slow  # METEOR's Java start-up alone takes about 10 s
def test_command_line(trained, trained_workdir):
  """After training (the fixture; test_sample runs the sample command line)."""
  run = subprocess.run(
    [
      sys.executable,
      '-m',
      'capjax.evaluate',
      f'--workdir={trained_workdir}',
      '--split=test',
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 0, run.stderr
  report = json.loads(
    (trained_workdir / 'metrics_test_greedy.json').read_text()
  )
  assert report['num_images'] == 16 and report['split'] == 'test'
  expected_metrics = [
    m for m in metrics.ALL_METRICS if metrics.java_available() or m != 'METEOR'
  ]
  assert list(report['metrics']) == expected_metrics
  assert 0.2 < report['metrics']['Bleu_1'] <= 1
  assert run.stdout.strip() == evaluation.format_report(report)
  results = json.loads(
    (trained_workdir / 'captions_test_greedy.json').read_text()
  )
  assert all(r['caption'] for r in results)
  assert sorted(r['image_id'] for r in results) == sorted(
    int(r.image_id) for r in datasets.load_split(trained.config, 'test')
  )
