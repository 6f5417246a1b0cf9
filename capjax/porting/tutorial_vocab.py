"""The tutorial's tokenizer as a capjax vocabulary.

The tokenizer is the JSON of the tutorial's Keras `Tokenizer`
(`tokenizer.to_json()`) or a plain {word: id} JSON object. The tutorial's ids
are <pad>=0, its oov_token <unk>=1, then the words by frequency, <start> and
<end> among them. capjax's decoders and `Vocab` fix <pad>, <start>, <end>,
<unk> = 0, 1, 2, 3, so the ids are renumbered: the specials first, then the
other words in the tutorial's order. Permuting the embedding's rows and fc2's
columns alike (`tutorial_weights.select_tokens`) changes no computation.

The tutorial's `Tokenizer(num_words=top_k)` turns every id >= num_words into
<unk>, so its model never saw those ids, as inputs or as targets, though its
embedding has top_k + 1 rows. The converted vocabulary keeps the words with
ids below num_words and below the number of embedding rows (a plain
{word: id} map has no num_words: below the number of rows); the rows and fc2
columns of the other ids are dropped. capjax then encodes those words as
<unk>, as the tutorial's tokenizer did, and never emits them.
"""

import dataclasses
import json
import os

import numpy as np

from capjax import errors
from capjax import files
from capjax.data import vocab as vocab_lib


@dataclasses.dataclass(frozen=True)
class TutorialTokenizer:
  """The ids the tutorial's model was trained on.

  Attributes:
    word_index: word -> id.
    num_words: the Keras Tokenizer's num_words: it turned larger ids into
      `oov_token`. None keeps every id that has an embedding row.
    oov_token: the out-of-vocabulary word, capjax's <unk>.
  """

  word_index: dict[str, int]
  num_words: int | None = None
  oov_token: str = vocab_lib.UNK


def load_tokenizer(path: str | os.PathLike[str]) -> TutorialTokenizer:
  """Reads a Keras Tokenizer's JSON (`tokenizer.to_json()`) or a {word: id} map.

  Raises:
    UserError: the file cannot be read, or is neither.
  """
  data = files.read_json(path)
  try:
    if isinstance(data, dict) and data.get('class_name') == 'Tokenizer':
      config = data.get('config', {})
      word_index = config.get('word_index')
      # to_json() stores its dictionaries as JSON strings inside the JSON.
      if isinstance(word_index, str):
        word_index = json.loads(word_index)
      tokenizer = TutorialTokenizer(
        word_index,
        config.get('num_words'),
        config.get('oov_token') or vocab_lib.UNK,
      )
    else:
      tokenizer = TutorialTokenizer(data)
  except json.JSONDecodeError as e:
    raise errors.UserError(f'{path} is not a JSON file: {e}') from None
  if not (
    isinstance(tokenizer.word_index, dict)
    and all(
      isinstance(i, int) and not isinstance(i, bool) and i >= 0
      for i in tokenizer.word_index.values()
    )
  ):
    raise errors.UserError(
      f"{path} is neither a Keras Tokenizer's JSON (tokenizer.to_json()) "
      'nor a JSON object mapping words to ids >= 0'
    )
  return tokenizer


def vocabulary(
  tokenizer: TutorialTokenizer, num_rows: int
) -> tuple[vocab_lib.Vocab, np.ndarray]:
  """capjax's vocabulary of a tutorial model (see module docstring).

  Args:
    tokenizer: the ids the model was trained on.
    num_rows: the model's embedding rows (its vocab_size).

  Returns:
    The vocabulary and, for each of its ids, the tutorial's id (int64).

  Raises:
    errors.UserError: the tokenizer cannot be the model's: a special token is
      missing or has no row, two words share an id, or it gave ids the
      embedding has no rows for.
  """
  word_index = dict(tokenizer.word_index)
  # The tutorial adds <pad> after fitting: a tokenizer saved before lacks it.
  if word_index.setdefault(vocab_lib.PAD, 0) != 0:
    raise errors.UserError(
      f'the tokenizer gives {vocab_lib.PAD!r} the id '
      f"{word_index[vocab_lib.PAD]}; the tutorial's is 0"
    )
  by_id: dict[int, str] = {}
  for word, i in word_index.items():
    if i in by_id:
      raise errors.UserError(
        f'the tokenizer gives {by_id[i]!r} and {word!r} the same id {i}'
      )
    by_id[i] = word
  num_words = num_rows if tokenizer.num_words is None else tokenizer.num_words
  rowless = sorted(i for i in by_id if num_rows <= i < num_words)
  if rowless:
    raise errors.UserError(
      f'the tokenizer (num_words={num_words}) gives words such as '
      f"{by_id[rowless[0]]!r} the id {rowless[0]}, but the checkpoint's "
      f'embedding has only {num_rows} rows: is it the tokenizer this '
      'model was trained with?'
    )
  specials = (
    vocab_lib.PAD,
    vocab_lib.START,
    vocab_lib.END,
    tokenizer.oov_token,
  )
  for word in specials:
    if word not in word_index:
      raise errors.UserError(
        f"the tokenizer has no {word!r}: the tutorial's "
        f'holds {vocab_lib.START!r}, {vocab_lib.END!r} and its '
        f'oov_token {vocab_lib.UNK!r}'
      )
    if word_index[word] >= num_words:
      raise errors.UserError(
        f"the tokenizer's {word!r} has id {word_index[word]}, "
        f'which the model never saw (num_words={num_words})'
      )
  words = [
    word
    for i, word in sorted(by_id.items())
    if i < num_words and word not in specials
  ]
  tutorial_ids = [word_index[word] for word in (*specials, *words)]
  return vocab_lib.Vocab(words), np.array(tutorial_ids, np.int64)
