"""capjax.data.schedule and .input_pipeline: contents, order, resume, I/O."""

import functools
import itertools

import numpy as np
import pytest

from capjax.configs import default
from capjax.data import datasets
from capjax.data import feature_store
from capjax.data import input_pipeline
from capjax.data import schedule
from capjax.data import vocab as vocab_lib

_BUCKETS = (8, 16, 24)
_MAX_LEN = 24


def _make_data(tmp_path, num_images=150, seed=0):
  """A store whose features are the image's number, and captions naming it.

  Image i has 1 to 4 captions 'w{i} c{j} x x ...', mostly short; its features
  are all i.
  """
  rng = np.random.default_rng(seed)
  ids = [f'img{i}' for i in range(num_images)]
  numbers = np.arange(num_images, dtype=np.float32)
  grids = np.broadcast_to(numbers[:, None, None], (num_images, 2, 3))
  store = feature_store.write_feature_store(
    str(tmp_path / 'store'), grids, ids, {'name': 'test'}, shard_size=16
  )

  def padding():
    return ' x' * int(
      rng.integers(0, 30) if rng.random() < 0.1 else rng.integers(0, 4)
    )

  records = [
    datasets.Record(
      ids[i],
      None,
      tuple(f'w{i} c{j}' + padding() for j in range(int(rng.integers(1, 5)))),
    )
    for i in range(num_images)
  ]
  vocab = vocab_lib.Vocab.build(
    [c for r in records for c in r.captions], top_k=10_000
  )
  return store, records, vocab


@pytest.fixture(name='data')
def data_fixture(tmp_path):
  return _make_data(tmp_path)


def _train_batches(
  data,
  *,
  batch_size=8,
  cache_features=False,
  seed=1,
  shuffle_buffer=10,
  group_by_length=False,
  process_index=0,
  process_count=1,
):
  store, records, vocab = data
  examples = input_pipeline.make_examples(store, records, vocab, _MAX_LEN)
  batch_schedule = schedule.BatchSchedule(
    examples.lengths,
    examples.image_index,
    batch_size=batch_size,
    seed=seed,
    bucket_lengths=_BUCKETS,
    shuffle_buffer=shuffle_buffer,
    group_by_length=group_by_length,
    process_index=process_index,
    process_count=process_count,
  )
  return input_pipeline.TrainBatches(
    examples, batch_schedule, cache_features=cache_features
  )


def _identify(batch, vocab):
  """(image, caption) numbers of each row, from its words."""
  return [
    (int(vocab.words[t[1]][1:]), int(vocab.words[t[2]][1:]))
    for t in batch['tokens']
  ]


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize('group_by_length', [False, True])
def test_batches_are_well_formed(data, group_by_length):
  store, records, vocab = data
  batches = _train_batches(data, group_by_length=group_by_length)
  num_examples = sum(len(r.captions) for r in records)
  assert batches.schedule.steps_per_epoch == num_examples // 8
  lengths_seen = set()
  for step in range(batches.schedule.steps_per_epoch + 3):
    batch = batches.batch(step)
    tokens = batch['tokens']
    assert batch['features'].shape == (8, 2, 3)
    assert batch['features'].dtype == np.float16
    assert tokens.dtype == np.int32
    ends = np.argmax(tokens == vocab.end_id, axis=1)
    assert (tokens[:, 0] == vocab.start_id).all()
    assert ((tokens == vocab.end_id).sum(axis=1) == 1).all()
    for row, end in zip(tokens, ends):
      assert (row[end + 1 :] == vocab.pad_id).all()
      assert (row[:end] != vocab.pad_id).all()
    longest = ends.max() + 1
    assert tokens.shape[1] == min(b for b in _BUCKETS if b >= longest)
    lengths_seen.add(tokens.shape[1])
    # Each row's features are its image's.
    images = [image for image, _ in _identify(batch, vocab)]
    np.testing.assert_array_equal(batch['features'][:, 0, 0], images)
  assert lengths_seen == set(_BUCKETS)


@pytest.mark.parametrize('group_by_length', [False, True])
def test_each_epoch_sees_each_example_at_most_once(data, group_by_length):
  _, records, vocab = data
  batches = _train_batches(data, group_by_length=group_by_length)
  spe = batches.schedule.steps_per_epoch
  epochs = []
  for epoch in range(3):
    seen = [
      pair
      for s in range(epoch * spe, (epoch + 1) * spe)
      for pair in _identify(batches.batch(s), vocab)
    ]
    assert len(seen) == len(set(seen)) == spe * 8
    epochs.append(seen)
  everything = {
    (i, j) for i, r in enumerate(records) for j in range(len(r.captions))
  }
  assert set(epochs[0]) <= everything
  assert len(everything - set(epochs[0])) == len(everything) - spe * 8
  assert epochs[0] != epochs[1] != epochs[2]
  # An image's captions are spread over the epoch, not kept together.
  first_images = [image for image, _ in epochs[0][:16]]
  assert len(set(first_images)) >= 12


@pytest.mark.parametrize('group_by_length', [False, True])
def test_resume_gives_exactly_the_same_batches(data, group_by_length):
  make = functools.partial(
    _train_batches, data, group_by_length=group_by_length
  )
  fresh = make(cache_features=False)
  spe = fresh.schedule.steps_per_epoch
  reference = list(itertools.islice(fresh.iterator(), 3 * spe + 4))
  for start in (0, 5, spe, 2 * spe + 3):
    resumed = make(cache_features=False).iterator(start_step=start)
    for step in range(start, min(start + spe + 1, len(reference))):
      _assert_batches_equal(next(resumed), reference[step])
  # Caching changes where features come from, not the batches.
  cached = make(cache_features=True)
  for step in (0, 7, spe, 3 * spe + 3):
    _assert_batches_equal(cached.batch(step), reference[step])
  # Another seed, another order.
  other = make(seed=2).batch(0)
  assert not np.array_equal(other['tokens'][:, 1], reference[0]['tokens'][:, 1])


def _record_reads(store):
  reads = []
  read = store.read

  def spy(indices):
    reads.append(np.asarray(indices))
    return read(indices)

  store.read = spy
  return reads


def test_features_are_read_once_per_epoch(data):
  store, _, _ = data
  reads = _record_reads(store)
  batches = _train_batches(data, batch_size=4)
  order, block_starts = batches.schedule.epoch_order(0)
  num_blocks = len(block_starts) - 1
  assert num_blocks >= 4
  for step in range(batches.schedule.steps_per_epoch):
    batches.batch(step)
  epoch_reads = np.concatenate(reads[:num_blocks])
  assert len(epoch_reads) == len(set(epoch_reads))  # each image at most once
  used = order[: batches.schedule.steps_per_epoch * 4]
  examples = input_pipeline.make_examples(*data, _MAX_LEN)
  assert set(epoch_reads) == set(examples.image_index[used])


def test_resume_does_not_replay_earlier_epochs(data):
  store, _, _ = data
  reads = _record_reads(store)
  batches = _train_batches(data, batch_size=4)
  epochs_ordered = []
  epoch_order = batches.schedule.epoch_order

  def spy(epoch):
    epochs_ordered.append(epoch)
    return epoch_order(epoch)

  batches.schedule.epoch_order = spy
  start = 5 * batches.schedule.steps_per_epoch + 3
  for step in range(start, start + 3):
    batches.batch(step)
  assert min(epochs_ordered) == 5
  assert sum(len(r) for r in reads) <= len(store)  # a block or two


@pytest.mark.parametrize(
  'cache_features,group_by_length',
  [(False, False), (True, False), (False, True)],
)
@pytest.mark.parametrize('process_count', [2, 4])
def test_process_slices_make_the_global_batch(
  data, process_count, cache_features, group_by_length
):
  make = functools.partial(
    _train_batches,
    data,
    cache_features=cache_features,
    group_by_length=group_by_length,
  )
  global_batches = make()
  processes = [
    make(process_index=i, process_count=process_count)
    for i in range(process_count)
  ]
  spe = global_batches.schedule.steps_per_epoch
  for step in (0, 1, spe - 1, spe, 2 * spe + 5):
    slices = [p.batch(step) for p in processes]
    assert slices[0]['features'].shape[0] == 8 // process_count
    whole = global_batches.batch(step)
    for key in whole:
      np.testing.assert_array_equal(
        np.concatenate([s[key] for s in slices]), whole[key]
      )


def test_grouping_by_length_pads_less_and_keeps_lengths_shuffled(tmp_path):
  data = _make_data(tmp_path, num_images=600)
  plain = _train_batches(data, shuffle_buffer=200)
  grouped = _train_batches(data, shuffle_buffer=200, group_by_length=True)
  steps = range(2 * plain.schedule.steps_per_epoch)

  def padded_tokens(batches):
    return sum(batches.schedule.caption_length(s) * 8 for s in steps)

  assert padded_tokens(grouped) < 0.8 * padded_tokens(plain)
  order, block_starts = grouped.schedule.epoch_order(0)
  assert len(block_starts) - 1 >= 3
  examples = input_pipeline.make_examples(*data, _MAX_LEN)
  lengths = examples.lengths[order]
  # Batches inside a block hold captions of about one length...
  spread = [
    np.ptp(lengths[i : i + 8]) for i in range(0, block_starts[1] - 7, 8)
  ]
  assert np.median(spread) == 0
  # ...but come in random order, not shortest first.
  first_block = lengths[: block_starts[1] // 8 * 8].reshape(-1, 8).max(axis=1)
  assert not (np.diff(first_block) >= 0).all()
  # Each block still holds the same examples as without grouping.
  plain_order, plain_starts = plain.schedule.epoch_order(0)
  np.testing.assert_array_equal(block_starts, plain_starts)
  for a, b in zip(block_starts[:-1], block_starts[1:]):
    assert set(order[a:b]) == set(plain_order[a:b])


def test_batch_size_must_divide_over_processes(data):
  with pytest.raises(ValueError, match='does not divide over 3 processes'):
    _train_batches(data, process_count=3)
  with pytest.raises(ValueError, match='process_index 2'):
    _train_batches(data, process_index=2, process_count=2)
  with pytest.raises(ValueError, match='do not make one batch'):
    _train_batches(data, batch_size=4096)


def _eval_batches(
  data,
  *,
  batch_size=8,
  process_index=0,
  process_count=1,
  num_examples=0,
  captions_per_image=None,
):
  store, records, vocab = data
  examples = input_pipeline.make_examples(
    store, records, vocab, _MAX_LEN, captions_per_image
  )
  return examples, input_pipeline.EvalBatches(
    examples,
    batch_size=batch_size,
    bucket_lengths=_BUCKETS,
    process_index=process_index,
    process_count=process_count,
    num_examples=num_examples,
  )


def test_eval_covers_every_example_in_order_and_pads(data):
  examples, batches = _eval_batches(data)
  n = len(examples)
  assert n % 8  # so the last batch is partial
  assert batches.num_batches == -(-n // 8)
  all_batches = list(batches.iterator())
  assert len(all_batches) == batches.num_batches
  masks = np.concatenate([b['mask'] for b in all_batches])
  np.testing.assert_array_equal(masks, np.arange(len(masks)) < n)
  index = np.concatenate([b['image_index'] for b in all_batches])
  np.testing.assert_array_equal(index[:n], examples.image_index)
  assert (index[n:] == -1).all()
  for i, batch in enumerate(all_batches):
    real = int(batch['mask'].sum())
    t = batch['tokens'].shape[1]
    np.testing.assert_array_equal(
      batch['tokens'][:real], examples.tokens[8 * i : 8 * i + real, :t]
    )
    np.testing.assert_array_equal(
      batch['features'][:real, 0, 0], examples.image_index[8 * i : 8 * i + real]
    )
    assert not batch['tokens'][real:].any()
    assert not batch['features'][real:].any()
    _assert_batches_equal(batch, batches.batch(i))


def test_eval_limits_and_one_caption_per_image(data):
  _, records, _ = data
  _, batches = _eval_batches(data, num_examples=10)
  assert batches.num_batches == 2
  assert sum(b['mask'].sum() for b in batches.iterator()) == 10
  examples, batches = _eval_batches(data, captions_per_image=1)
  assert len(examples) == len(records)
  np.testing.assert_array_equal(examples.image_index, np.arange(len(records)))


@pytest.mark.parametrize('process_count', [2, 4])
def test_eval_process_slices_make_the_global_batch(data, process_count):
  _, whole = _eval_batches(data)
  parts = [
    _eval_batches(data, process_index=i, process_count=process_count)[1]
    for i in range(process_count)
  ]
  for index in range(whole.num_batches):
    expected = whole.batch(index)
    slices = [p.batch(index) for p in parts]
    for key in expected:
      np.testing.assert_array_equal(
        np.concatenate([s[key] for s in slices]), expected[key]
      )


def test_make_examples_truncates_and_skips_images_without_features(tmp_path):
  store = feature_store.write_feature_store(
    str(tmp_path), np.zeros((1, 1, 1)), ['a'], {'name': 'test'}
  )
  records = [
    datasets.Record('a', None, ('one two ' * 20, 'three')),
    datasets.Record('b', None, ('four',)),
  ]
  vocab = vocab_lib.Vocab.build([c for r in records for c in r.captions], 10)
  examples = input_pipeline.make_examples(store, records, vocab, 8)
  np.testing.assert_array_equal(examples.lengths, [8, 3])
  np.testing.assert_array_equal(examples.tokens[0], [1, 4, 5, 4, 5, 4, 5, 2])
  np.testing.assert_array_equal(
    examples.tokens[1], [1, vocab.words.index('three'), 2, 0, 0, 0, 0, 0]
  )
  np.testing.assert_array_equal(examples.image_index, [0, 0])


def test_bucket_length():
  assert schedule.bucket_length(1, (16, 24)) == 16
  assert schedule.bucket_length(16, (24, 16)) == 16
  assert schedule.bucket_length(17, (16, 24)) == 24
  with pytest.raises(ValueError, match='fits no bucket'):
    schedule.bucket_length(25, (16, 24))


def test_config_entry_points(data):
  store, records, vocab = data
  config = default.get_config()
  config.batch_size = 16
  config.max_caption_len = _MAX_LEN
  config.bucket_lengths = _BUCKETS
  first = next(
    input_pipeline.train_batches(
      config, store, records, vocab, process_index=1, process_count=2
    ).iterator(3)
  )
  expected = _train_batches(
    data,
    batch_size=16,
    seed=config.seed,
    shuffle_buffer=config.shuffle_buffer,
    group_by_length=config.group_by_length,
    process_index=1,
    process_count=2,
  ).batch(3)
  _assert_batches_equal(first, expected)
  evaluation = list(
    input_pipeline.eval_iterator(config, store, records, vocab, num_examples=20)
  )
  assert [int(b['mask'].sum()) for b in evaluation] == [16, 4]
