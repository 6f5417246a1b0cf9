"""capjax.metrics.coco against pycocoevalcap called directly, on real data."""

import contextlib
import io

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
import pytest

from capjax.data import datasets
from capjax.data import vocab as vocab_lib
from capjax.metrics import coco as metrics

needs_java = pytest.mark.skipif(
  not metrics.java_available(), reason='Java is needed for PTB and METEOR'
)


@pytest.fixture(scope='module')
def coco_human_captions(shared_data):
  """COCO val2017 (coco-mini): each image's first caption and the others."""
  records = datasets.coco_json_records(
    str(shared_data / 'coco-mini' / 'annotations' / 'captions_val2017.json'),
    str(shared_data / 'coco-mini' / 'val2017'),
  )
  assert len(records) == 159 and all(len(r.captions) >= 5 for r in records)
  candidates = {int(r.image_id): r.captions[0] for r in records}
  references = {int(r.image_id): list(r.captions[1:]) for r in records}
  return candidates, references


def _direct(gts, res, scorers):
  """pycocoevalcap's scorers as its COCOEvalCap runs them."""
  scores = {}
  with contextlib.redirect_stdout(io.StringIO()):
    for scorer, names in scorers:
      score, _ = scorer.compute_score(gts, res)
      scores.update(
        zip(names, score) if isinstance(names, tuple) else [(names, score)]
      )
  return {k: float(v) for k, v in scores.items()}


def _score_directly_with_ptb(candidates, references, scorers):
  tokenizer = PTBTokenizer()
  gts = tokenizer.tokenize(
    {k: [{'caption': c} for c in v] for k, v in references.items()}
  )
  res = tokenizer.tokenize({k: [{'caption': c}] for k, c in candidates.items()})
  return _direct(gts, res, scorers)


@needs_java
def test_human_captions_score_as_pycocoevalcap_does(coco_human_captions):
  candidates, references = coco_human_captions
  no_meteor = [m for m in metrics.ALL_METRICS if m != 'METEOR']
  got = metrics.score_captions(candidates, references, metrics=no_meteor)
  expected = _score_directly_with_ptb(
    candidates,
    references,
    [(Bleu(4), metrics.BLEU), (Rouge(), 'ROUGE_L'), (Cider(), 'CIDEr')],
  )
  assert list(got) == no_meteor
  assert got == expected
  # Human captions against the other humans' score high, but not perfect.
  assert 0.5 < got['Bleu_1'] < 1 and 0.5 < got['CIDEr'] < 2


@needs_java
@pytest.mark.slow  # METEOR's Java start-up takes about 10 s, twice here
def test_meteor_as_pycocoevalcap_does(coco_human_captions):
  candidates, references = coco_human_captions
  got = metrics.score_captions(candidates, references)
  assert list(got) == list(metrics.ALL_METRICS)
  expected = _score_directly_with_ptb(
    candidates, references, [(Meteor(), 'METEOR')]
  )
  assert got['METEOR'] == expected['METEOR']
  assert 0.2 < got['METEOR'] < 1


def test_without_java_scores_vocab_tokens(coco_human_captions, monkeypatch):
  candidates, references = coco_human_captions
  monkeypatch.setattr(metrics.shutil, 'which', lambda name: None)
  assert not metrics.java_available()
  got = metrics.score_captions(candidates, references)

  tokens = lambda text: ' '.join(vocab_lib.tokenize(text))
  gts = {k: [tokens(c) for c in v] for k, v in references.items()}
  res = {k: [tokens(c)] for k, c in candidates.items()}
  expected = _direct(
    gts,
    res,
    [(Bleu(4), metrics.BLEU), (Rouge(), 'ROUGE_L'), (Cider(), 'CIDEr')],
  )
  assert list(got) == list(metrics.BLEU) + ['ROUGE_L', 'CIDEr']
  assert got == expected


def test_known_values():
  # Unigram precision 3/4, bigram 2/3, equal lengths; the longest common
  # subsequence is 3 of 4 words.
  got = metrics.score_captions(
    {1: 'A b c, d.'}, {1: ['a b c e']}, use_java=False
  )
  assert got['Bleu_1'] == pytest.approx(3 / 4)
  assert got['Bleu_2'] == pytest.approx((3 / 4 * 2 / 3) ** 0.5)
  assert got['Bleu_4'] == pytest.approx(0.0, abs=1e-3)
  assert got['ROUGE_L'] == pytest.approx(3 / 4)
  same = metrics.score_captions(
    {1: 'a b c d', 2: 'e f g h'},
    {1: ['a b c d'], 2: ['e f g h']},
    use_java=False,
  )
  assert same['Bleu_4'] == pytest.approx(1.0)
  assert same['ROUGE_L'] == pytest.approx(1.0)
  assert same['CIDEr'] == pytest.approx(10.0)  # CIDEr-D's scale


def test_empty_caption_scores_zero():
  got = metrics.score_captions(
    {1: '', 2: 'a cat'},
    {1: ['a dog'], 2: ['a cat']},
    metrics=('Bleu_1', 'ROUGE_L', 'CIDEr'),
    use_java=False,
  )
  assert list(got) == ['Bleu_1', 'ROUGE_L', 'CIDEr']
  assert got['ROUGE_L'] == pytest.approx(0.5)


@pytest.mark.parametrize(
  'candidates, references, message',
  [
    ({}, {}, 'no captions'),
    ({1: 'a'}, {2: ['a']}, 'same images'),
    ({1: 'a'}, {1: []}, 'no reference caption'),
  ],
)
def test_bad_inputs(candidates, references, message):
  with pytest.raises(ValueError, match=message):
    metrics.score_captions(candidates, references, use_java=False)


def test_unknown_metric():
  with pytest.raises(ValueError, match='unknown metrics'):
    metrics.score_captions({1: 'a'}, {1: ['a']}, metrics=('SPICE',))
