"""CIDEr-D speed: capjax's jitted scorer against pycocoevalcap's `Cider`.

The candidates are those of an SCST step at the tutorial's sizes: 64 images
of the Flickr8k training captions with 5 candidates each (320 captions),
each scored against the image's 5 references, with document frequencies
from those references. The candidates are other images' human captions, so
the scores are neither all zero nor all equal. Both scorers see the same
words: pycocoevalcap gets the vocabulary's tokens joined by spaces. The row
is left out when the Flickr8k captions are absent.
"""

import contextlib
import io

import jax
import numpy as np
from pycocoevalcap.cider.cider import Cider

from capjax.benchmarks import harness
from capjax.data import datasets
from capjax.data import vocab as vocab_lib
from capjax.metrics import cider
from capjax.testing import real_data

IMAGES, SAMPLES, REFERENCES, MAX_LEN = 64, 5, 5, 24


def _captions() -> list[list[str]] | None:
  """REFERENCES captions of each of the first IMAGES Flickr8k images."""
  data = real_data.find()
  token_file = data / 'flickr8k' / 'Flickr8k.token.txt' if data else None
  if token_file is None or not token_file.exists():
    return None
  captions = [
    c
    for c in datasets.read_flickr_tokens(token_file).values()
    if len(c) >= REFERENCES
  ]
  return [c[:REFERENCES] for c in captions[:IMAGES]]


def _ids(captions: list[str], vocab: vocab_lib.Vocab) -> np.ndarray:
  rows = np.zeros((len(captions), MAX_LEN), np.int32)
  for row, caption in zip(rows, captions):
    ids = vocab.encode(caption, MAX_LEN)
    row[: len(ids)] = ids
  return rows


def bench_cider(repeats: int) -> dict[str, float] | None:
  """Seconds per 320 candidates of each scorer, and their largest gap."""
  references = _captions()
  if references is None:
    return None
  vocab = vocab_lib.Vocab.build((c for r in references for c in r), 10_000)
  words = lambda caption: vocab.decode(vocab.encode(caption, MAX_LEN))
  # Candidate k of image i: caption k of image i + k + 1.
  candidates = [
    [references[(i + k + 1) % IMAGES][k] for k in range(SAMPLES)]
    for i in range(IMAGES)
  ]
  references_BRT = np.stack([_ids(r, vocab) for r in references])
  candidates_BKT = np.stack([_ids(c, vocab) for c in candidates])
  doc_freqs = cider.document_frequencies(references_BRT, vocab.size)
  mask_BR = np.ones(references_BRT.shape[:2], bool)
  score = jax.jit(cider.cider_d)
  gts = {i: [words(c) for c in references[i]] for i in range(IMAGES)}

  def pycocoevalcap_scores():
    scores = []
    # Cider scores one candidate per image: one call per sample, as SCST
    # implementations that use it do.
    with contextlib.redirect_stdout(io.StringIO()):
      for k in range(SAMPLES):
        res = {i: [words(candidates[i][k])] for i in range(IMAGES)}
        scores.append(Cider().compute_score(gts, res)[1])
    return np.stack(scores, axis=1)

  seconds = harness.interleaved_medians(
    {
      'capjax': lambda: score(
        candidates_BKT, references_BRT, mask_BR, doc_freqs
      ),
      'pycocoevalcap': pycocoevalcap_scores,
    },
    repeats,
  )
  gap = np.abs(
    np.asarray(score(candidates_BKT, references_BRT, mask_BR, doc_freqs))
    - pycocoevalcap_scores()
  ).max()
  return {
    'capjax_s': seconds['capjax'],
    'pycocoevalcap_s': seconds['pycocoevalcap'],
    'candidates': IMAGES * SAMPLES,
    'max_abs_difference': float(gap),
  }
