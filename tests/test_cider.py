"""capjax.metrics.cider against pycocoevalcap's CIDEr-D, on real captions.

Both sides get the same words: capjax's tokenisation, as ids for capjax and
space-joined for pycocoevalcap.
"""

import json

import jax
import numpy as np
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer
import pytest

from capjax.data import vocab as vocab_lib
from capjax.metrics import cider

Words = list[str]


@pytest.fixture(scope='module')
def flickr_words(shared_data) -> list[list[Words]]:
  """Every Flickr8k image's 5 captions, tokenised, in the token file's order."""
  captions = {}
  path = shared_data / 'flickr8k' / 'Flickr8k.token.txt'
  for line in path.read_text(encoding='utf-8').splitlines():
    key, _, caption = line.partition('\t')
    captions.setdefault(key.rpartition('#')[0], []).append(
      vocab_lib.tokenize(caption)
    )
  return list(captions.values())


@pytest.fixture(scope='module')
def coco_words(shared_data) -> list[list[Words]]:
  """The 5 tokenised captions of each coco-mini val2017 image."""
  path = shared_data / 'coco-mini' / 'annotations' / 'captions_val2017.json'
  captions = {}
  for annotation in json.loads(path.read_text(encoding='utf-8'))['annotations']:
    captions.setdefault(annotation['image_id'], []).append(
      vocab_lib.tokenize(annotation['caption'])
    )
  return list(captions.values())


def _vocab(images: list[list[Words]]) -> vocab_lib.Vocab:
  """A vocabulary of every word of the images' captions."""
  return vocab_lib.Vocab(
    sorted({w for caps in images for c in caps for w in c})
  )


def _rows(ids: list[np.ndarray], num_tokens: int) -> np.ndarray:
  """Id sequences right-padded with <pad> to (len(ids), num_tokens)."""
  rows = np.zeros((len(ids), num_tokens), np.int32)
  for row, i in zip(rows, ids):
    row[: len(i)] = i
  return rows


def _references(
  vocab: vocab_lib.Vocab,
  references: list[list[Words]],
  num_refs: int,
  num_tokens: int,
) -> tuple[np.ndarray, np.ndarray]:
  """References (B, R, T) as padded `<start> words <end>` rows, and the mask."""
  refs_BRT = np.zeros((len(references), num_refs, num_tokens), np.int32)
  for refs_RT, refs in zip(refs_BRT, references):
    refs_RT[: len(refs)] = _rows(
      [vocab.encode(' '.join(r)) for r in refs], num_tokens
    )
  num_refs_B = np.array([len(refs) for refs in references])
  return refs_BRT, np.arange(num_refs) < num_refs_B[:, None]


def _check_against_pycocoevalcap(
  images: list[list[Words]], references: list[list[Words]]
) -> np.ndarray:
  """Scores 3 candidates per image as capjax and as pycocoevalcap do.

  Args:
    images: each image's captions; the first is held out from `references`.
    references: each image's references.

  Returns:
    scores_BK of: the held-out caption, the previous image's held-out caption,
    the held-out caption cut after 8 words.
  """
  vocab = _vocab(images)
  num_tokens = 2 + max(len(c) for caps in images for c in caps)
  held_out = [vocab.encode(' '.join(caps[0])) for caps in images]
  candidates_BKT = np.stack(
    [
      _rows(held_out, num_tokens),  # <start> words <end>
      # Another image's, without <start>.
      _rows([held_out[i - 1][1:] for i in range(len(images))], num_tokens),
      # Cut at 8 words like a decoder's max length: no <end> when longer.
      _rows([ids[1:9] for ids in held_out], num_tokens),
    ],
    1,
  )
  candidate_words = [
    [caps[0] for caps in images],
    [images[i - 1][0] for i in range(len(images))],
    [caps[0][:8] for caps in images],
  ]
  refs_BRT, mask_BR = _references(
    vocab, references, max(map(len, references)), num_tokens
  )
  doc_freqs = cider.document_frequencies(refs_BRT, vocab.size)
  scores_BK = np.asarray(
    jax.jit(cider.cider_d)(candidates_BKT, refs_BRT, mask_BR, doc_freqs)
  )
  for scores_B, words in zip(scores_BK.T, candidate_words):
    gts = {i: [' '.join(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [' '.join(c)] for i, c in enumerate(words)}
    corpus, per_image = Cider().compute_score(gts, res)
    np.testing.assert_allclose(scores_B, per_image, rtol=0, atol=1e-5)
    assert scores_B.mean() == pytest.approx(corpus, rel=0, abs=1e-5)
  return scores_BK


def test_equals_pycocoevalcap_on_flickr8k(flickr_words):
  images = flickr_words[:100]
  scores_BK = _check_against_pycocoevalcap(
    images, [caps[1:] for caps in images]
  )
  # Humans agree with the other humans, far more than with other images'.
  assert scores_BK[:, 0].mean() > 0.5 > 0.2 > scores_BK[:, 1].mean()


def test_equals_pycocoevalcap_on_coco_with_unequal_references(coco_words):
  # 1 to 4 references per image exercise the reference mask.
  references = [caps[1 : 2 + i % 4] for i, caps in enumerate(coco_words)]
  scores_BK = _check_against_pycocoevalcap(coco_words, references)
  assert scores_BK[:, 0].mean() > 0.5 > 0.2 > scores_BK[:, 1].mean()


def test_keys_are_collision_free_on_flickr8k(flickr_words):
  images = flickr_words[:2000]
  vocab = _vocab(images)
  refs_BRT, _ = _references(
    vocab, images, 5, 2 + max(len(c) for caps in images for c in caps)
  )
  doc_freqs = cider.document_frequencies(refs_BRT, vocab.size)
  scorer = CiderScorer()
  for caps in images:
    scorer += (None, [' '.join(c) for c in caps])
  scorer.compute_doc_freq()
  grams = list(scorer.document_frequency)
  ids = {w: i for i, w in enumerate(vocab.words)}
  ngrams_G4 = np.array(
    [[ids[w] for w in g] + [0] * (4 - len(g)) for g in grams], np.int32
  )
  key1_G, key2_G = cider.encode_ngrams(ngrams_G4)
  # All distinct n-grams of the corpus get distinct keys, which decode back.
  assert len(set(zip(key1_G.tolist(), key2_G.tolist()))) == len(grams)
  np.testing.assert_array_equal(cider.decode_ngrams(key1_G, key2_G), ngrams_G4)
  # The table holds exactly those n-grams, sorted, with pycocoevalcap's df.
  order_G = np.lexsort((key2_G, key1_G))
  np.testing.assert_array_equal(doc_freqs.key1_G, key1_G[order_G])
  np.testing.assert_array_equal(doc_freqs.key2_G, key2_G[order_G])
  df_G = np.array([scorer.document_frequency[g] for g in grams])[order_G]
  np.testing.assert_allclose(
    doc_freqs.idf_G, np.log(len(images)) - np.log(df_G), atol=1e-6
  )


def test_keys_at_the_vocabulary_limit():
  top = cider.MAX_VOCAB_SIZE - 1
  ngrams_G4 = np.array(
    [
      [top, top, top, top],
      [top, 3, 0, 0],
      [3, top, 0, 0],
      [3, 0, 0, 0],
      [top, 0, 0, 0],
    ],
    np.int32,
  )
  key1_G, key2_G = cider.encode_ngrams(ngrams_G4)
  assert key1_G.dtype == key2_G.dtype == np.int32
  assert key1_G.min() >= 0 and key2_G.min() >= 0
  assert len(set(zip(key1_G.tolist(), key2_G.tolist()))) == len(ngrams_G4)
  np.testing.assert_array_equal(cider.decode_ngrams(key1_G, key2_G), ngrams_G4)
  with pytest.raises(ValueError, match='at most 32768 ids'):
    cider.document_frequencies(np.full((1, 1, 2), 3), cider.MAX_VOCAB_SIZE + 1)
  with pytest.raises(ValueError, match=r'ids must lie in \[0, 10\)'):
    cider.document_frequencies(np.full((1, 1, 2), 10), 10)


def test_padding_and_missing_end(coco_words):
  images = coco_words[:8]
  vocab = _vocab(images)
  words = [vocab.encode(' '.join(caps[0]))[1:-1] for caps in images]
  cut = min(map(len, words))
  cut_words = [w[:cut] for w in words]
  refs_BRT, mask_BR = _references(vocab, [caps[1:] for caps in images], 4, 30)
  doc_freqs = cider.document_frequencies(refs_BRT, vocab.size)
  score = jax.jit(cider.cider_d)

  def with_end(words, num_tokens, after_end=()):
    return _rows([np.r_[1, w, 2, after_end] for w in words], num_tokens)

  expected_BK = score(
    np.stack([with_end(words, 30), with_end(cut_words, 30)], 1),
    refs_BRT,
    mask_BR,
    doc_freqs,
  )
  # Longer padding, tokens after <end>, longer reference padding and a
  # masked-out junk reference change nothing.
  junk = np.random.default_rng(0).integers(0, vocab.size, 20)
  longer_refs_BRT = np.zeros((8, 5, 50), np.int32)
  longer_refs_BRT[:, :4, :30] = refs_BRT
  longer_refs_BRT[:, 4] = junk[np.arange(50) % 20]
  padded_BK = score(
    np.stack([with_end(words, 64), with_end(words, 64, junk)], 1),
    longer_refs_BRT,
    np.c_[mask_BR, np.zeros(8, bool)],
    doc_freqs,
  )
  np.testing.assert_allclose(padded_BK, expected_BK[:, [0, 0]], rtol=1e-6)
  # Rows full of words without <end> score all of them.
  np.testing.assert_allclose(
    score(np.stack(cut_words)[:, None], refs_BRT, mask_BR, doc_freqs),
    expected_BK[:, 1:],
    rtol=1e-6,
  )


@pytest.mark.slow  # eager dispatch compiles each op: 8 to 18 s on 2 busy cores
def test_jit_equals_eager(coco_words):
  images = coco_words[:16]
  vocab = _vocab(images)
  candidates_BKT = np.stack(
    [
      _rows([vocab.encode(' '.join(caps[k])) for caps in images], 30)
      for k in (0, 1)
    ],
    1,
  )
  refs_BRT, mask_BR = _references(vocab, [caps[2:] for caps in images], 3, 30)
  doc_freqs = cider.document_frequencies(refs_BRT, vocab.size)
  eager_BK = cider.cider_d(candidates_BKT, refs_BRT, mask_BR, doc_freqs)
  jitted_BK = jax.jit(cider.cider_d)(
    candidates_BKT, refs_BRT, mask_BR, doc_freqs
  )
  assert jitted_BK.shape == (16, 2) and jitted_BK.dtype == np.float32
  np.testing.assert_allclose(jitted_BK, eager_BK, rtol=1e-6)
  assert np.asarray(jitted_BK).min() > 0
