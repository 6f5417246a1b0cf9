"""CIDEr-D in JAX: batched, jittable, equal to coco-caption's `CiderScorer`.

CIDEr-D (Vedantam et al. 2015, as pycocoevalcap computes it) compares the
tf-idf vectors of a candidate's n-grams (n = 1..4) with each reference's:
a cosine similarity with clipped candidate counts, times a Gaussian penalty on
the length difference, averaged over the references and over n, times 10. The
idf comes from document frequencies (for each n-gram, the number of images
whose references hold it) over a reference corpus: the scored split's
references, as coco-caption does, or all training references, as SCST does.
They are counted once on the host; scoring takes token ids, in jit, on any
device.

Usage:

  doc_freqs = cider.document_frequencies(train_references_NRT, vocab.size)
  scores_BK = jax.jit(cider.cider_d)(
      tokens_BKT, references_BRT, reference_mask_BR, doc_freqs)

Token rows are capjax's: `<pad>`=0 and `<start>`=1 are skipped, a row ends at
its first `<end>`=2 or its last column, and every other id is a word, `<unk>`
too (its text would be scored as a word).

N-gram keys (no x64 in JAX, so no int64): an n-gram of word ids w1..wn is
padded with zeros to (w1, w2, w3, w4) and keyed by two int32s,
k1 = w1 * 2**15 + w2 and k2 = w3 * 2**15 + w4. For ids in [0, 2**15) these are
base-2**15 digits, so the map from id quadruples to key pairs in
[0, 2**30)**2 is a bijection (`decode_ngrams` inverts it); no word has id 0,
so the padding tells the order n and n-grams of all orders get distinct keys:
collision-free. `document_frequencies` refuses vocabularies over 2**15 ids.
The corpus n-grams are kept sorted lexicographically by (k1, k2): candidate
and reference n-grams find their document frequency by a vectorised binary
search of fixed depth, and a candidate n-gram's count in a reference is an
exact key comparison.
"""

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from capjax import tokens

MAX_N = 4  # n-grams of orders 1..MAX_N
SIGMA = 6.0  # standard deviation of the length penalty
# The ids below <end>, <pad> and <start>, are skipped.
END_ID = tokens.END_ID
_ID_BITS = 15
MAX_VOCAB_SIZE = 1 << _ID_BITS
# Images per numpy pass when counting document frequencies, which bounds the
# host memory for a large training corpus.
_CHUNK_IMAGES = 2048


@struct.dataclass
class DocumentFrequencies:
  """The idf of every n-gram of a reference corpus, an argument of `cider_d`.

  Attributes:
    key1_G: int32 first keys of the corpus's G distinct n-grams, sorted
      lexicographically by (key1_G, key2_G).
    key2_G: int32 second keys.
    idf_G: float32 `log(num_images) - log(df)`, where df is the number of
      corpus images whose references hold the n-gram.
    log_num_images: float32 scalar, the idf of n-grams outside the corpus
      (pycocoevalcap's `ref_len`).
  """

  key1_G: jax.Array
  key2_G: jax.Array
  idf_G: jax.Array
  log_num_images: jax.Array


def _keys(w1, w2, w3, w4):
  return (w1 << _ID_BITS) | w2, (w3 << _ID_BITS) | w4


def encode_ngrams(ngrams_G4):
  """Keys (key1_G, key2_G) of n-grams: rows of word ids, zero-padded after n."""
  return _keys(*(ngrams_G4[..., i] for i in range(MAX_N)))


def decode_ngrams(key1_G, key2_G) -> np.ndarray:
  """The n-grams (G, 4) of `encode_ngrams` keys, zero-padded after n."""
  key1_G, key2_G = np.asarray(key1_G), np.asarray(key2_G)
  low = MAX_VOCAB_SIZE - 1
  return np.stack(
    [key1_G >> _ID_BITS, key1_G & low, key2_G >> _ID_BITS, key2_G & low], -1
  )


def _ngrams(tokens_XT, xp):
  """Keys of the n-grams of token rows, with numpy or jax.numpy as `xp`.

  Args:
    tokens_XT: int32 token ids, any leading shape X.
    xp: `np` (host) or `jnp`, so both sides key n-grams identically.

  Returns:
    key1_XNT, key2_XNT: keys of the n-gram of order n + 1 starting at word t.
    valid_XNT: whether that n-gram lies within the row's words.
    num_words_X: words in each row.
  """
  num_tokens = tokens_XT.shape[-1]
  is_word_XT = (tokens_XT > END_ID) & (
    xp.cumsum(tokens_XT == END_ID, axis=-1) == 0
  )
  # Words to the front, in order: skipped ids are not in the caption's text,
  # so they must not split n-grams.
  order_XT = xp.argsort(~is_word_XT, axis=-1, stable=True)
  words_XT = xp.take_along_axis(
    xp.where(is_word_XT, tokens_XT, 0), order_XT, axis=-1
  )
  num_words_X = is_word_XT.sum(-1)
  padded = xp.pad(words_XT, [(0, 0)] * (words_XT.ndim - 1) + [(0, MAX_N - 1)])
  shifted = [padded[..., i : i + num_tokens] for i in range(MAX_N)]
  zeros_XT = xp.zeros_like(words_XT)
  keys = [
    _keys(*(shifted[i] if i < n else zeros_XT for i in range(MAX_N)))
    for n in range(1, MAX_N + 1)
  ]
  key1_XNT = xp.stack([k1 for k1, _ in keys], -2)
  key2_XNT = xp.stack([k2 for _, k2 in keys], -2)
  # An n-gram of order n + 1 starting at word t needs t + n + 1 words.
  ends_NT = xp.arange(num_tokens) + xp.arange(1, MAX_N + 1)[:, None]
  valid_XNT = ends_NT <= num_words_X[..., None, None]
  return key1_XNT, key2_XNT, valid_XNT, num_words_X


def document_frequencies(
  references_NRT, vocab_size: int
) -> DocumentFrequencies:
  """Counts on the host, for each n-gram, the images whose references hold it.

  Args:
    references_NRT: int token ids of N images' reference captions, padded with
      `<pad>` rows for images with fewer than R (such rows hold no n-grams).
    vocab_size: size of the vocabulary of all ids `cider_d` will see.

  Returns:
    The corpus's idf table, on the default device. Its size is static under
    jit: a corpus with another number of distinct n-grams retraces `cider_d`.

  Raises:
    ValueError: for a vocabulary over `MAX_VOCAB_SIZE`, ids outside it, or
      references without words.
  """
  if vocab_size > MAX_VOCAB_SIZE:
    raise ValueError(
      f'CIDEr-D n-gram keys take vocabularies of at most '
      f'{MAX_VOCAB_SIZE} ids, got {vocab_size}'
    )
  references_NRT = np.asarray(references_NRT)
  if references_NRT.ndim != 3 or not references_NRT.shape[0]:
    raise ValueError(
      'references must be (images, captions, tokens), got '
      f'shape {references_NRT.shape}'
    )
  if references_NRT.size and (
    references_NRT.min() < 0 or references_NRT.max() >= vocab_size
  ):
    raise ValueError(f'reference ids must lie in [0, {vocab_size})')
  unique_keys = []
  for start in range(0, len(references_NRT), _CHUNK_IMAGES):
    chunk_CRT = references_NRT[start : start + _CHUNK_IMAGES].astype(np.int32)
    key1, key2, valid, _ = _ngrams(chunk_CRT, np)
    # Both keys in one int64 (numpy has them), ordered as (key1, key2) are.
    keys_CM = np.where(
      valid, (key1.astype(np.int64) << 2 * _ID_BITS) | key2, -1
    ).reshape(len(chunk_CRT), -1)
    keys_CM.sort(axis=-1)
    # Each image counts an n-gram once, however many references hold it.
    first_CM = np.ones_like(keys_CM, bool)
    first_CM[:, 1:] = keys_CM[:, 1:] != keys_CM[:, :-1]
    unique_keys.append(keys_CM[first_CM & (keys_CM >= 0)])
  keys_G, df_G = np.unique(np.concatenate(unique_keys), return_counts=True)
  if not keys_G.size:
    raise ValueError('the references hold no words')
  log_num_images = np.log(len(references_NRT))
  return DocumentFrequencies(
    key1_G=jnp.asarray(keys_G >> 2 * _ID_BITS, jnp.int32),
    key2_G=jnp.asarray(keys_G & ((1 << 2 * _ID_BITS) - 1), jnp.int32),
    idf_G=jnp.asarray(log_num_images - np.log(df_G), jnp.float32),
    log_num_images=jnp.asarray(log_num_images, jnp.float32),
  )


def _idf(doc_freqs: DocumentFrequencies, key1, key2):
  """idf of n-grams, by a lexicographic binary search of the corpus keys."""
  num_ngrams = doc_freqs.key1_G.shape[0]

  def step(_, bounds):
    # Invariant: corpus n-grams before `lo` sort before the query, those from
    # `hi` on do not.
    lo, hi = bounds
    mid = (lo + hi) // 2
    at = jnp.minimum(mid, num_ngrams - 1)  # mid == G only once lo == hi
    k1, k2 = doc_freqs.key1_G[at], doc_freqs.key2_G[at]
    before = (k1 < key1) | ((k1 == key1) & (k2 < key2))
    active = lo < hi
    return (
      jnp.where(active & before, mid + 1, lo),
      jnp.where(active & ~before, mid, hi),
    )

  # Each step at least halves hi - lo, which starts at G.
  lo, _ = jax.lax.fori_loop(
    0,
    num_ngrams.bit_length(),
    step,
    (jnp.zeros_like(key1), jnp.full_like(key1, num_ngrams)),
  )
  at = jnp.minimum(lo, num_ngrams - 1)
  found = (doc_freqs.key1_G[at] == key1) & (doc_freqs.key2_G[at] == key2)
  return jnp.where(found, doc_freqs.idf_G[at], doc_freqs.log_num_images)


def _term_frequencies(key1_XNT, key2_XNT, valid_XNT):
  """Count of each position's n-gram in its row, and whether it comes first."""
  same_XNTT = (
    (key1_XNT[..., :, None] == key1_XNT[..., None, :])
    & (key2_XNT[..., :, None] == key2_XNT[..., None, :])
    & valid_XNT[..., None, :]
  )
  earlier_TT = jnp.tri(key1_XNT.shape[-1], k=-1, dtype=bool)
  first_XNT = valid_XNT & ~(same_XNTT & earlier_TT).any(-1)
  return same_XNTT.sum(-1), first_XNT


def _norm(vec_XNT, first_XNT):
  """Euclidean norm over distinct n-grams (each counted at its first place)."""
  return jnp.sqrt(jnp.where(first_XNT, vec_XNT**2, 0).sum(-1))


def cider_d(
  candidates_BKT: jax.Array,
  references_BRT: jax.Array,
  reference_mask_BR: jax.Array,
  doc_freqs: DocumentFrequencies,
) -> jax.Array:
  """CIDEr-D of K candidate captions per image against its references.

  Args:
    candidates_BKT: int32 token ids of K candidates for each of B images, as
      decoders output them (an optional `<start>`, words, `<end>`, `<pad>`s).
    references_BRT: int32 token ids of up to R references per image.
    reference_mask_BR: which reference rows are real; every image needs one.
    doc_freqs: the corpus's `document_frequencies`.

  Returns:
    scores_BK: float32 CIDEr-D of each candidate, pycocoevalcap's per-image
    score; the corpus score is their mean.
  """
  batch, num_samples, cand_len = candidates_BKT.shape
  _, num_refs, ref_len = references_BRT.shape
  num_tokens = max(cand_len, ref_len)

  def rows(tokens_BXT):  # -> (B * X, num_tokens)
    padding = num_tokens - tokens_BXT.shape[-1]
    return jnp.pad(tokens_BXT, ((0, 0), (0, 0), (0, padding))).reshape(
      -1, num_tokens
    )

  # Candidate and reference rows (Y = B * K + B * R) in one pass: one binary
  # search to compile, most of the compile time. Extra <pad>s change nothing.
  key1_YNT, key2_YNT, valid_YNT, num_words_Y = _ngrams(
    jnp.concatenate([rows(candidates_BKT), rows(references_BRT)]), jnp
  )
  idf_YNT = _idf(doc_freqs, key1_YNT, key2_YNT)
  tf_YNT, first_YNT = _term_frequencies(key1_YNT, key2_YNT, valid_YNT)
  vec_YNT = tf_YNT * idf_YNT
  norm_YN = _norm(vec_YNT, first_YNT)
  # pycocoevalcap's length is its bigram count (its `n == 1` is 0-based):
  # words - 1, or 0 for no words.
  length_Y = jnp.maximum(num_words_Y - 1, 0)

  def cands(x_Y):  # (B * K + B * R, ...) -> (B, K, ...)
    return x_Y[: batch * num_samples].reshape(
      batch, num_samples, *x_Y.shape[1:]
    )

  def refs(x_Y):  # -> (B, R, ...)
    return x_Y[batch * num_samples :].reshape(batch, num_refs, *x_Y.shape[1:])

  # Each candidate n-gram's count in each reference: its reference vector
  # entry, with the same idf.
  in_ref_BKRNTS = (
    (
      cands(key1_YNT)[:, :, None, :, :, None]
      == refs(key1_YNT)[:, None, :, :, None, :]
    )
    & (
      cands(key2_YNT)[:, :, None, :, :, None]
      == refs(key2_YNT)[:, None, :, :, None, :]
    )
    & refs(valid_YNT)[:, None, :, :, None, :]
  )
  ref_vec_BKRNT = in_ref_BKRNTS.sum(-1) * cands(idf_YNT)[:, :, None]
  clipped_BKRNT = (
    jnp.minimum(cands(vec_YNT)[:, :, None], ref_vec_BKRNT) * ref_vec_BKRNT
  )
  dot_BKRN = jnp.where(cands(first_YNT)[:, :, None], clipped_BKRNT, 0).sum(-1)
  norms_BKRN = cands(norm_YN)[:, :, None] * refs(norm_YN)[:, None]
  # pycocoevalcap divides only by nonzero norms (the dot is then 0 anyway).
  cosine_BKRN = jnp.where(
    norms_BKRN > 0,
    dot_BKRN / jnp.where(norms_BKRN > 0, norms_BKRN, 1),
    dot_BKRN,
  )
  delta_BKR = (cands(length_Y)[:, :, None] - refs(length_Y)[:, None]).astype(
    jnp.float32
  )
  penalty_BKR = jnp.exp(-(delta_BKR**2) / (2 * SIGMA**2))
  per_ref_BKR = cosine_BKRN.mean(-1) * penalty_BKR
  mask_BR = reference_mask_BR.astype(bool)
  total_BK = jnp.where(mask_BR[:, None], per_ref_BKR, 0).sum(-1)
  return 10 * total_BK / jnp.maximum(mask_BR.sum(-1), 1)[:, None]
