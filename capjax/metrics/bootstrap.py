"""Bootstrap confidence intervals of caption metrics over the test images.

A test set is a sample of images; a score on it is an estimate. The
bootstrap resamples the images with replacement (each with all of its
references), recomputes the corpus score on every resample, and takes the
central `level` of those scores as the interval (the percentile bootstrap,
Efron & Tibshirani 1993). Two models captioning the same images are
compared on the same resamples (the paired bootstrap, Koehn 2004): their
difference varies far less than either score, as both see the same easy and
hard images.

Nothing is rescored: every image's statistics are computed once
(capjax.metrics.coco.ImageScores), and a resample is a vector of counts, how
often each image was drawn. Corpus BLEU is a function of the images' summed
n-gram statistics, so it is recomputed from the count-weighted sums;
ROUGE-L and CIDEr are means of per-image scores, and so, nearly, is METEOR
(its corpus score aggregates its statistics over the images; its resamples
are the means of its per-image scores, shifted by the full set's difference
between the two). CIDEr's document
frequencies stay those of the full reference set, as pycocoevalcap computes
them: the interval covers the variation from which images are tested, with
the n-gram weights held fixed.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from capjax.metrics import coco

LEVEL = 0.95
# pycocoevalcap's smoothing of BLEU's precisions (bleu_scorer.compute_score).
_TINY, _SMALL = 1e-15, 1e-9


def resample_counts(num_images: int, resamples: int, seed: int) -> np.ndarray:
  """(resamples, num_images) draw counts: each row sums to num_images."""
  rng = np.random.default_rng(seed)
  return rng.multinomial(
    num_images, np.full(num_images, 1.0 / num_images), size=resamples
  )


def bleu_of_counts(counts_X10: np.ndarray) -> np.ndarray:
  """BLEU-1..4 (X, 4) of summed statistics (coco.ImageScores.bleu_counts_N10).

  pycocoevalcap's corpus BLEU: cumulative geometric means of the clipped
  n-gram precisions, times the brevity penalty of the summed lengths.
  """
  testlen, reflen = counts_X10[:, 0], counts_X10[:, 1]
  guess_X4, correct_X4 = counts_X10[:, 2:6], counts_X10[:, 6:10]
  log_precision_X4 = np.log(correct_X4 + _TINY) - np.log(guess_X4 + _SMALL)
  orders = np.arange(1, 5)
  bleu_X4 = np.exp(np.cumsum(log_precision_X4, axis=1) / orders)
  ratio_X = (testlen + _TINY) / (reflen + _SMALL)
  penalty_X = np.where(ratio_X < 1, np.exp(1 - 1 / np.minimum(ratio_X, 1)), 1.0)
  return bleu_X4 * penalty_X[:, None]


def corpus_scores(
  scored: coco.ImageScores, weights_XN: np.ndarray
) -> dict[str, np.ndarray]:
  """Each metric's corpus score under each row of image weights: (X,) each."""
  weights_XN = np.asarray(weights_XN, np.float64)
  out: dict[str, np.ndarray] = {}
  if scored.bleu_counts_N10 is not None:
    bleu_X4 = bleu_of_counts(weights_XN @ scored.bleu_counts_N10)
    out.update(zip(coco.BLEU, bleu_X4.T))
  total_X = weights_XN.sum(axis=1)
  for name, scores_N in scored.per_image.items():
    # METEOR's corpus score is not quite its images' mean: the offset puts
    # the resamples around it (0 for ROUGE-L and CIDEr).
    offset = scored.scores[name] - scores_N.mean()
    out[name] = weights_XN @ scores_N / total_X + offset
  return {m: out[m] for m in scored.scores}


def _interval(values_X: np.ndarray, level: float) -> tuple[float, float]:
  tail = (1 - level) / 2
  low, high = np.quantile(values_X, [tail, 1 - tail])
  return float(low), float(high)


def intervals(
  scored: coco.ImageScores,
  resamples: int,
  seed: int,
  level: float = LEVEL,
) -> dict[str, tuple[float, float]]:
  """{metric: (low, high)}: the percentile bootstrap interval of each score."""
  counts = resample_counts(len(scored.image_ids), resamples, seed)
  return {
    name: _interval(values, level)
    for name, values in corpus_scores(scored, counts).items()
  }


def paired_differences(
  scored: coco.ImageScores,
  other: coco.ImageScores,
  resamples: int,
  seed: int,
  level: float = LEVEL,
) -> dict[str, dict[str, float]]:
  """{metric: {'value', 'low', 'high'}} of `scored` minus `other`.

  The value is the difference of the corpus scores; the interval that of
  the differences on the same resamples of the images.

  Raises:
    ValueError: the two do not score the same images in the same order.
  """
  if scored.image_ids != other.image_ids:
    raise ValueError('a paired comparison needs the same images, in order')
  counts = resample_counts(len(scored.image_ids), resamples, seed)
  mine, theirs = corpus_scores(scored, counts), corpus_scores(other, counts)
  out = {}
  for name in scored.scores:
    low, high = _interval(mine[name] - theirs[name], level)
    value = scored.scores[name] - other.scores[name]
    out[name] = {'value': value, 'low': low, 'high': high}
  return out


def describe(resamples: int, seed: int, level: float = LEVEL) -> dict[str, Any]:
  """The settings recorded beside the intervals in a report."""
  return {
    'resamples': resamples,
    'seed': seed,
    'level': level,
    'unit': 'image, with all of its references',
    'method': 'percentile',
  }


def format_interval(
  value: float, interval: tuple[float, float] | Mapping[str, float]
) -> str:
  """'0.3160 [0.2810, 0.3520]'."""
  low, high = (
    (interval['low'], interval['high'])
    if isinstance(interval, Mapping)
    else interval
  )
  return f'{value:7.4f} [{low:7.4f}, {high:7.4f}]'
