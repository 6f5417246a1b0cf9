"""Tests of capjax.data.vocab."""

import json

import numpy as np
import pytest

from capjax.configs import default
from capjax.data import datasets
from capjax.data import vocab as vocab_lib


def test_tokenize_lowercases_and_turns_filters_into_separators():
  assert vocab_lib.tokenize('A man\'s Dog-walk,(OK)  <b>\n"x"!') == [
    'a',
    "man's",
    'dog',
    'walk',
    'ok',
    '<b>',
    'x',
  ]
  assert vocab_lib.tokenize('a.b/c@d=e~f`g{h}i|j_k^l[m]n\\o') == list(
    'abcdefghijklmno'
  )
  assert vocab_lib.tokenize(' \t.,!\n') == []


def test_special_ids_come_first():
  vocab = vocab_lib.Vocab(['cat'])
  assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (
    0,
    1,
    2,
    3,
  )
  assert vocab.words == ['<pad>', '<start>', '<end>', '<unk>', 'cat']
  assert vocab.size == len(vocab) == 5


def test_build_keeps_top_k_and_breaks_ties_by_first_occurrence():
  # Counts: a=3, d=2, then c, b, e once each, in that order of appearance.
  captions = ['c a d', 'A b.', 'a d e']
  vocab = vocab_lib.Vocab.build(captions, top_k=4)
  assert vocab.words[4:] == ['a', 'd', 'c', 'b']
  assert vocab.size == 8
  np.testing.assert_array_equal(vocab.encode('e a b zzz'), [1, 3, 4, 7, 3, 2])


def test_unk_is_inside_the_vocabulary():
  vocab = vocab_lib.Vocab.build(['one two three four five six'], top_k=2)
  ids = vocab.encode('seven one eight two nine')
  assert ids.max() < vocab.size
  assert vocab.unk_id < vocab.size
  np.testing.assert_array_equal(ids, [1, 3, 4, 3, 5, 3, 2])


def test_special_token_strings_in_captions_are_not_words():
  vocab = vocab_lib.Vocab.build(['<start> a <end> <pad> <unk>'], top_k=10)
  assert vocab.words[4:] == ['a']
  np.testing.assert_array_equal(vocab.encode('<end> a'), [1, 3, 4, 2])
  with pytest.raises(ValueError, match='special tokens'):
    vocab_lib.Vocab(['a', '<end>'])
  with pytest.raises(ValueError, match='distinct'):
    vocab_lib.Vocab(['a', 'a'])


def test_encode_truncates_but_keeps_end():
  vocab = vocab_lib.Vocab(['a', 'b', 'c'])
  np.testing.assert_array_equal(vocab.encode('a b c'), [1, 4, 5, 6, 2])
  np.testing.assert_array_equal(vocab.encode('a b c', max_len=4), [1, 4, 5, 2])
  np.testing.assert_array_equal(vocab.encode('a b c', max_len=2), [1, 2])
  np.testing.assert_array_equal(vocab.encode('', max_len=5), [1, 2])
  assert vocab.encode('a').dtype == np.int32
  with pytest.raises(ValueError, match='max_len'):
    vocab.encode('a', max_len=1)


def test_decode_stops_at_end_and_skips_start_and_pad():
  vocab = vocab_lib.Vocab(['a', 'b'])
  assert vocab.decode([1, 4, 0, 5, 3, 2, 4, 4]) == 'a b <unk>'
  assert vocab.decode(np.array([4, 5], np.int32)) == 'a b'
  assert vocab.decode([2, 4]) == ''
  with pytest.raises(ValueError, match='6'):
    vocab.decode([1, 6])
  with pytest.raises(ValueError, match='-1'):
    vocab.decode([-1])


def test_save_load_round_trip(tmp_path):
  vocab = vocab_lib.Vocab.build(['ünïcode words', 'words'], top_k=10)
  path = tmp_path / 'vocab.json'
  vocab.save(path)
  loaded = vocab_lib.Vocab.load(path)
  assert loaded == vocab
  assert loaded.words == [
    '<pad>',
    '<start>',
    '<end>',
    '<unk>',
    'words',
    'ünïcode',
  ]
  path.write_text(json.dumps({'tokens': ['a']}))
  with pytest.raises(ValueError, match='not a capjax vocabulary'):
    vocab_lib.Vocab.load(path)


def _flickr8k_train_captions(shared_data):
  config = default.get_config()
  config.dataset = 'flickr'
  config.data_dir = str(shared_data / 'flickr8k')
  records = datasets.load_split(config, 'train')
  return records, [c for r in records for c in r.captions]


def test_flickr8k_training_vocabulary(shared_data):
  records, captions = _flickr8k_train_captions(shared_data)
  assert len(records) == 6000
  assert len(captions) == 30000
  vocab = vocab_lib.Vocab.build(captions, top_k=5000)
  assert vocab.size == 5004
  assert vocab.words[4:10] == ['a', 'in', 'the', 'on', 'is', 'and']
  full = vocab_lib.Vocab.build(captions, top_k=100_000)
  assert full.size - 4 == 7375  # distinct training words
  for caption in captions[:200]:
    ids = vocab.encode(caption, max_len=48)
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert ids.max() < vocab.size


def test_word_order_matches_the_tutorial_keras_tokenizer(shared_data):
  tf = pytest.importorskip('tensorflow')
  _, captions = _flickr8k_train_captions(shared_data)
  captions = captions[:3000]
  # The tutorial's tokenizer, on its '<start> ... <end>' captions.
  tokenizer = tf.keras.preprocessing.text.Tokenizer(
    num_words=5000, oov_token='<unk>', filters='!"#$%&()*+.,-/:;=?@[\\]^_`{|}~ '
  )
  tokenizer.fit_on_texts([f'<start> {c} <end>' for c in captions])
  keras_words = [
    w for w in tokenizer.word_index if w not in vocab_lib.SPECIAL_TOKENS
  ]
  vocab = vocab_lib.Vocab.build(captions, top_k=len(keras_words))
  assert vocab.words[4:] == keras_words
