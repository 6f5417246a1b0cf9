"""capjax.metrics.bootstrap: intervals over test images, paired differences."""

import numpy as np
import pytest

from capjax.metrics import bootstrap
from capjax.metrics import coco as metrics

_CANDIDATES = {
  'a': 'a man rides a horse',
  'b': 'two dogs play on grass',
  'c': 'a child in a pink dress climbs stairs',
  'd': 'a dog',
}
_REFERENCES = {
  'a': ['a man is riding a horse', 'the man rides the brown horse'],
  'b': ['two dogs play in the grass', 'dogs running', 'two dogs on grass'],
  'c': [
    'a child in a pink dress is climbing up a set of stairs',
    'a girl going into a wooden building',
  ],
  'd': ['a black dog runs', 'a dog is running on the beach'],
}


def _mean_metric(scores_N: np.ndarray) -> metrics.ImageScores:
  """A synthetic metric whose corpus score is the mean of its image scores."""
  return metrics.ImageScores(
    {'CIDEr': float(scores_N.mean())},
    tuple(range(len(scores_N))),
    None,
    {'CIDEr': scores_N},
  )


def test_interval_covers_the_true_mean_95_percent_of_the_time():
  """Over 400 seeded test sets of 100 images from a known distribution.

  Each image's score is Gamma(2, 0.5)-distributed (skewed, as per-image
  CIDEr is), with true mean 1. A 95% interval should cover it in about 95%
  of the test sets; 400 repetitions put the coverage within +-0.022 of its
  true value (2 standard errors).
  """
  rng = np.random.default_rng(0)
  covered = 0
  repetitions = 400
  for seed in range(repetitions):
    scored = _mean_metric(rng.gamma(2.0, 0.5, size=100))
    low, high = bootstrap.intervals(scored, 1000, seed)['CIDEr']
    covered += low <= 1.0 <= high
  # The percentile bootstrap undercovers a little on 100 skewed samples.
  assert 0.91 <= covered / repetitions <= 0.975


def test_corpus_bleu_of_summed_counts_is_pycocoevalcaps():
  scored = metrics.score_images(_CANDIDATES, _REFERENCES, use_java=False)
  ones = np.ones((1, len(_CANDIDATES)))
  again = bootstrap.corpus_scores(scored, ones)
  for name, value in scored.scores.items():
    np.testing.assert_allclose(again[name][0], value, rtol=1e-7, atol=1e-12)
  # A resample that draws image 'a' twice and leaves out 'd' is scored as
  # the corpus of those images.
  twice = {'a': 'a man rides a horse', 'a2': 'a man rides a horse'}
  twice |= {k: _CANDIDATES[k] for k in 'bc'}
  refs = dict(_REFERENCES, a2=_REFERENCES['a'])
  direct = metrics.score_captions(
    twice, {k: refs[k] for k in twice}, metrics=metrics.BLEU, use_java=False
  )
  got = bootstrap.corpus_scores(scored, np.array([[2.0, 1.0, 1.0, 0.0]]))
  for name in metrics.BLEU:
    np.testing.assert_allclose(got[name][0], direct[name], rtol=1e-7)


def test_intervals_are_seeded_and_contain_the_score():
  scored = metrics.score_images(_CANDIDATES, _REFERENCES, use_java=False)
  first = bootstrap.intervals(scored, 200, seed=3)
  assert first == bootstrap.intervals(scored, 200, seed=3)
  assert first != bootstrap.intervals(scored, 200, seed=4)
  for name, (low, high) in first.items():
    assert low <= scored.scores[name] <= high


def test_paired_difference_of_a_shifted_metric_is_the_shift():
  """Adding 0.1 to every image's score moves every resample by 0.1."""
  scores_N = np.random.default_rng(1).gamma(2.0, 0.5, size=50)
  diff = bootstrap.paired_differences(
    _mean_metric(scores_N + 0.1), _mean_metric(scores_N), 500, seed=0
  )['CIDEr']
  for key in ('value', 'low', 'high'):
    assert diff[key] == pytest.approx(0.1)


def test_paired_differences_need_the_same_images():
  scored = _mean_metric(np.ones(3))
  other = metrics.ImageScores(scored.scores, (2, 1, 0), None, scored.per_image)
  with pytest.raises(ValueError, match='same images'):
    bootstrap.paired_differences(scored, other, 10, seed=0)
