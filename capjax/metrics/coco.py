"""Caption metrics: the COCO caption evaluation (pycocoevalcap).

`score_captions` scores one candidate caption per image against all of its
reference captions with BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D), after the
Stanford PTB tokenisation, exactly as the COCO evaluation server does. Those
two steps run Java; without it METEOR is left out and captions are tokenised
like the vocabulary's words (`capjax.vocab.tokenize`: lowercase, punctuation
removed), which agrees with PTB on plain captions but not on every one
("man's" stays one word), so such numbers are close to, not equal to, the
official ones.

CIDEr weighs n-grams by their document frequency over the references scored
together: its value depends on the whole set, not on each image alone.

`score_images` also keeps what each image contributes (`ImageScores`), from
which capjax.metrics.bootstrap recomputes the corpus scores of resampled
image sets without running the scorers again.
"""

from collections.abc import Hashable, Mapping, Sequence
import contextlib
import dataclasses
import io
import re
import shutil
from typing import TypeVar

import numpy as np
from pycocoevalcap.bleu import bleu_scorer
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from capjax import console
from capjax.data import vocab as vocab_lib

BLEU = ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4')
# pycocoevalcap's names, the COCO leaderboard's columns.
ALL_METRICS = BLEU + ('METEOR', 'ROUGE_L', 'CIDEr')
JAVA_METRICS = ('METEOR',)

Key = Hashable
# The keys of one call's mappings, whichever Hashable type they are.
KeyT = TypeVar('KeyT', bound=Hashable)


def java_available() -> bool:
  """Whether `java` is on the PATH (for PTB tokenisation and METEOR)."""
  return shutil.which('java') is not None


# The statistics line the Java tokenizer prints to the stderr it inherits.
_TOKENIZER_STATISTICS = re.compile(r'PTBTokenizer tokenized \d+ tokens at ')


def ptb_tokenize(
  captions: Mapping[KeyT, Sequence[str]],
) -> dict[KeyT, list[str]]:
  """pycocoevalcap's PTB tokenisation (Java): lowercase, punctuation dropped."""
  with console.stderr_without(_TOKENIZER_STATISTICS):
    return PTBTokenizer().tokenize(
      {k: [{'caption': c} for c in v] for k, v in captions.items()}
    )


def simple_tokenize(
  captions: Mapping[KeyT, Sequence[str]],
) -> dict[KeyT, list[str]]:
  """The vocabulary's tokenisation, for when Java is missing."""
  return {
    k: [' '.join(vocab_lib.tokenize(c)) for c in v] for k, v in captions.items()
  }


def _check(
  candidates: Mapping[KeyT, str], references: Mapping[KeyT, Sequence[str]]
) -> None:
  if not candidates:
    raise ValueError('no captions to score')
  if set(candidates) != set(references):
    missing = set(candidates) ^ set(references)
    raise ValueError(
      f'candidates and references must cover the same images; '
      f'{len(missing)} differ, e.g. {next(iter(missing))!r}'
    )
  empty = [k for k, v in references.items() if not v]
  if empty:
    raise ValueError(f'image {empty[0]!r} has no reference caption')


@dataclasses.dataclass(frozen=True)
class ImageScores:
  """Corpus scores and each image's share of them.

  Attributes:
    scores: {metric: corpus score}, as `score_captions` returns them.
    image_ids: the images, in the order of the rows below.
    bleu_counts_N10: BLEU's statistics of each image (when a BLEU metric was
      asked for): candidate length, closest reference length, then the
      candidate's 1..4-gram counts and its clipped matches of each; corpus
      BLEU is a function of their sums (`bootstrap.bleu_of_counts`).
    per_image: {metric: (N,) scores} for METEOR, ROUGE_L and CIDEr, whose
      corpus score is their mean (METEOR's is Java's aggregate of its
      statistics, close to but not exactly the mean). CIDEr's document
      frequencies are those of all N images' references.
  """

  scores: dict[str, float]
  image_ids: tuple[Key, ...]
  bleu_counts_N10: np.ndarray | None
  per_image: dict[str, np.ndarray]


def _bleu_counts(
  gts: Mapping[KeyT, list[str]], res: Mapping[KeyT, list[str]]
) -> np.ndarray:
  """(N, 10) BLEU statistics per image, as pycocoevalcap's Bleu(4) cooks them.

  The reference length is the one closest to the candidate's ('closest',
  Bleu's option for more than one image).
  """
  rows = []
  for key in gts:
    refs = bleu_scorer.cook_refs(gts[key])
    test = bleu_scorer.cook_test(res[key][0], refs)
    reflen = min((abs(n - test['testlen']), n) for n in refs[0])[1]
    rows.append([test['testlen'], reflen, *test['guess'], *test['correct']])
  return np.array(rows, np.float64).reshape(-1, 10)


def score_captions(
  candidates: Mapping[KeyT, str],
  references: Mapping[KeyT, Sequence[str]],
  *,
  metrics: Sequence[str] = ALL_METRICS,
  use_java: bool | None = None,
) -> dict[str, float]:
  """Corpus-level caption metrics: `score_images(...).scores`."""
  return score_images(
    candidates, references, metrics=metrics, use_java=use_java
  ).scores


def score_images(
  candidates: Mapping[KeyT, str],
  references: Mapping[KeyT, Sequence[str]],
  *,
  metrics: Sequence[str] = ALL_METRICS,
  use_java: bool | None = None,
) -> ImageScores:
  """Corpus-level caption metrics, with each image's statistics.

  Args:
    candidates: one generated caption per image id.
    references: the human captions of the same image ids.
    metrics: which of ALL_METRICS to compute.
    use_java: PTB tokenisation and METEOR; None means when Java is found.
      Without Java, JAVA_METRICS are left out of the result.

  Returns:
    The scores ({metric name: score}, in ALL_METRICS order) and each
    image's statistics (see ImageScores).
  """
  unknown = set(metrics) - set(ALL_METRICS)
  if unknown:
    raise ValueError(
      f'unknown metrics {sorted(unknown)}; choose from {ALL_METRICS}'
    )
  _check(candidates, references)
  if use_java is None:
    use_java = java_available()
  tokenize = ptb_tokenize if use_java else simple_tokenize
  res = tokenize({k: [c] for k, c in candidates.items()})
  gts = tokenize({k: list(references[k]) for k in candidates})
  wanted = [m for m in metrics if use_java or m not in JAVA_METRICS]
  scores: dict[str, float] = {}
  per_image: dict[str, np.ndarray] = {}
  bleu_counts = None
  # pycocoevalcap prints its BLEU statistics; keep them off the console.
  with contextlib.redirect_stdout(io.StringIO()):
    if any(m in BLEU for m in wanted):
      bleu, _ = Bleu(4).compute_score(gts, res)
      scores.update(zip(BLEU, bleu))
      bleu_counts = _bleu_counts(gts, res)
    for name, scorer_cls in (
      ('METEOR', Meteor),
      ('ROUGE_L', Rouge),
      ('CIDEr', Cider),
    ):
      if name in wanted:
        score, image_scores = scorer_cls().compute_score(gts, res)
        scores[name] = score
        per_image[name] = np.asarray(image_scores, np.float64)
  return ImageScores(
    {m: float(scores[m]) for m in ALL_METRICS if m in wanted},
    tuple(gts),
    bleu_counts,
    per_image,
  )
