"""Caption vocabulary with the tutorial's Keras `Tokenizer` semantics.

Text is lowercased, every character of `FILTERS` is replaced by a space (as
`Tokenizer(filters=...)` does) and the result is split on whitespace. `<` and
`>` are not filtered, so the special tokens survive tokenization; `'` is not
filtered either, so "man's" stays one word. Unlike Keras, which splits on ' '
only, any whitespace separates words (COCO captions hold newlines).

Ids: `<pad>`=0, `<start>`=1, `<end>`=2, `<unk>`=3, then the `top_k` most
frequent training words, most frequent first; words with equal counts keep the
order of their first occurrence (Keras sorts its word counts stably in
insertion order). Every id is smaller than `size` by construction: the
special tokens, `<unk>` included, have rows of their own in the embedding
table, so no encoded caption can index outside it.
"""

import collections
from collections.abc import Iterable, Sequence
import os

import numpy as np

from capjax import errors
from capjax import files
from capjax import tokens

# The tutorial's `Tokenizer(filters=...)`, less the space, which separates
# words anyway.
FILTERS = '!"#$%&()*+.,-/:;=?@[\\]^_`{|}~'
PAD, START, END, UNK = tokens.PAD, tokens.START, tokens.END, tokens.UNK
SPECIAL_TOKENS = tokens.SPECIAL_TOKENS

_FILTER_TABLE = str.maketrans({c: ' ' for c in FILTERS})
_FORMAT = 'capjax.vocab/1'


def tokenize(text: str) -> list[str]:
  """Splits a caption into words: lowercase, filters to spaces, whitespace."""
  return text.lower().translate(_FILTER_TABLE).split()


class Vocab:
  """A word <-> id mapping; build it with `Vocab.build` or `Vocab.load`."""

  def __init__(self, words: Sequence[str]):
    """Makes a vocabulary of the special tokens followed by `words`.

    Args:
      words: the vocabulary's words, in id order, without special tokens.
    """
    self._id_to_word = list(SPECIAL_TOKENS) + list(words)
    # Only real words: a caption that spells out '<end>' gets <unk> there.
    self._word_to_id = {
      w: i for i, w in enumerate(self._id_to_word) if w not in SPECIAL_TOKENS
    }
    if len(set(self._id_to_word)) != len(self._id_to_word):
      raise ValueError(
        'vocabulary words must be distinct and must not be '
        f'special tokens {SPECIAL_TOKENS}'
      )

  @classmethod
  def build(cls, captions: Iterable[str], top_k: int) -> 'Vocab':
    """The `top_k` most frequent words of `captions` (training captions only).

    Args:
      captions: caption strings.
      top_k: number of words kept besides the four special tokens.

    Returns:
      A vocabulary of size <= top_k + 4. Ties in counts are broken by first
      occurrence. Special token strings found in captions are not counted (they
      encode to `<unk>`).
    """
    if top_k < 0:
      raise ValueError(f'top_k must be >= 0, got {top_k}')
    # Counter keeps insertion order and most_common sorts stably, so equal
    # counts keep their first-occurrence order, as in Keras.
    counts = collections.Counter(
      w for c in captions for w in tokenize(c) if w not in SPECIAL_TOKENS
    )
    return cls([w for w, _ in counts.most_common(top_k)])

  @property
  def size(self) -> int:
    return len(self._id_to_word)

  @property
  def words(self) -> list[str]:
    """All tokens in id order, special tokens first."""
    return list(self._id_to_word)

  pad_id = tokens.PAD_ID
  start_id = tokens.START_ID
  end_id = tokens.END_ID
  unk_id = tokens.UNK_ID

  def __len__(self) -> int:
    return self.size

  def __eq__(self, other) -> bool:
    return isinstance(other, Vocab) and self._id_to_word == other._id_to_word

  def encode(self, text: str, max_len: int | None = None) -> np.ndarray:
    """Caption -> int32 ids `<start> w1 ... wn <end>`, unpadded.

    Args:
      text: a caption.
      max_len: if given, the most ids returned (>= 2); longer captions lose
        their last words but always keep `<end>`.

    Returns:
      ids_T: int32 array of length <= max_len.
    """
    ids = [self._word_to_id.get(w, self.unk_id) for w in tokenize(text)]
    if max_len is not None:
      if max_len < 2:
        raise ValueError(
          f'max_len must be >= 2 for <start> and <end>, got {max_len}'
        )
      ids = ids[: max_len - 2]
    return np.array([self.start_id] + ids + [self.end_id], np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """Ids -> text: stops at `<end>`, skips `<start>` and `<pad>`.

    Raises:
      ValueError: for an id outside [0, size).
    """
    words = []
    for i in ids:
      i = int(i)
      if not 0 <= i < self.size:
        raise ValueError(
          f'token id {i} is outside the vocabulary [0, {self.size})'
        )
      if i == self.end_id:
        break
      if i not in (self.start_id, self.pad_id):
        words.append(self._id_to_word[i])
    return ' '.join(words)

  def decode_rows(self, ids_BT: Iterable[Iterable[int]]) -> list[str]:
    """The text of each row of ids, e.g. of a batch of decoded captions."""
    return [self.decode(row) for row in np.asarray(ids_BT)]

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes the vocabulary as JSON (atomically)."""
    files.write_json_atomic(
      path,
      {'format': _FORMAT, 'tokens': self._id_to_word},
      ensure_ascii=False,
      indent=0,
    )

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> 'Vocab':
    """Reads a vocabulary written by `save`."""
    data = files.read_json(path)
    if (
      not isinstance(data, dict)
      or data.get('format') != _FORMAT
      or tuple(data.get('tokens', ())[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS
    ):
      raise errors.UserError(f'{path} is not a capjax vocabulary file')
    return cls(data['tokens'][len(SPECIAL_TOKENS) :])
