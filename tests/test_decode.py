"""capjax.model.search and .decoding: greedy search, sampling, beam search."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax.data import vocab as vocab_lib
from capjax.model import captioner
from capjax.model import decoding
from capjax.model import search

PAD, START, END = 0, 1, 2
A, B_ = 4, 5  # the table tests' words: 'a' and 'b' after <unk> = 3
VOCAB_SIZE = 23
NUM_POSITIONS = 4
FEATURE_DIM = 6
# Model tests share these shapes, so that each decoder compiles once.
BATCH = 8
MAX_LEN = 12
BEAM = 4


@pytest.fixture(scope='module')
def model_and_params():
  """A small random Captioner whose captions end at various steps.

  At their initial scale, random weights make nearly the same caption for
  every image and never pick <end>; doubled, and with <end>'s output bias
  raised, some captions end early and others run to MAX_LEN.
  """
  model = captioner.Captioner(vocab_size=VOCAB_SIZE, embedding_dim=8, units=16)
  params = model.init(
    jax.random.PRNGKey(0), _features(1), jnp.zeros((1, 2), jnp.int32)
  )['params']
  params = jax.tree_util.tree_map(lambda x: 2 * x, params)
  bias = params['fc2']['bias'].at[END].set(1.0)
  return model, dict(params, fc2=dict(params['fc2'], bias=bias))


def _features(batch=BATCH, seed=0):
  rng = np.random.default_rng(seed)
  return (
    np.abs(rng.normal(size=(batch, NUM_POSITIONS, FEATURE_DIM))).astype(
      np.float32
    )
    * 3
  )


def _jitted_decode_step(model):
  return jax.jit(
    functools.partial(model.apply, method=captioner.Captioner.decode_step)
  )


def _python_greedy(model, params, features_LD, max_len):
  """The tutorial's `evaluate()`: one image, one step call per token, argmax
  on the host."""
  variables = {'params': params}
  encoded = model.apply(
    variables, features_LD[None], method=captioner.Captioner.encode
  )
  h = model.apply(variables, 1, method=captioner.Captioner.initial_state)
  decode_step = _jitted_decode_step(model)
  token, tokens, attention, log_prob = START, [], [], 0.0
  for _ in range(max_len):
    logits, h, a = decode_step(variables, h, jnp.array([token]), encoded)
    log_probs = np.asarray(search.token_log_probs(logits))[0]
    token = int(np.argmax(log_probs))
    tokens.append(token)
    attention.append(np.asarray(a)[0])
    log_prob += log_probs[token]
    if token == END:
      break
  return tokens, np.array(attention), log_prob


def _table_step_fn(log_probs_VV, num_positions=3):
  """A fake step: the next token's logits depend on the last token only.

  The state counts the steps, and the attention is one-hot at position
  count % num_positions, so the test sees which step each row came from.
  """
  table_VV = jnp.asarray(log_probs_VV, jnp.float32)

  def step_fn(count_x, token_x, encoded):
    del encoded
    attention_xL = jax.nn.one_hot(count_x % num_positions, num_positions)
    return table_VV[token_x], count_x + 1, attention_xL

  return step_fn


def _table(rows):
  """A log-probability table from {token: {next token: probability}}."""
  probs = np.zeros((6, 6))
  for token, row in rows.items():
    for next_token, p in row.items():
      probs[token, next_token] = p
  with np.errstate(divide='ignore'):
    return np.log(probs)


# Greedy: a (.5) then <end> (.4) = .2. The best caption is b (.4) then <end>
# (.9) = .36, which a beam of two finds.
HAND_TABLE = _table(
  {
    PAD: {END: 1.0},
    START: {END: 0.1, A: 0.5, B_: 0.4},
    A: {END: 0.4, A: 0.35, B_: 0.25},
    B_: {END: 0.9, A: 0.05, B_: 0.05},
  }
)


def _count_state(batch):
  return jnp.zeros((batch,), jnp.int32)


# --- Greedy search ------------------------------------------------------------


def test_greedy_equals_python_loop_token_for_token(model_and_params):
  model, params = model_and_params
  features, max_len = _features(), MAX_LEN
  got = decoding.greedy_captions(params, features, model=model, max_len=max_len)
  lengths = []
  for b in range(len(features)):
    tokens, attention, log_prob = _python_greedy(
      model, params, features[b], max_len
    )
    n = len(tokens)
    lengths.append(n)
    np.testing.assert_array_equal(
      got.tokens_BT[b], tokens + [PAD] * (max_len - n)
    )
    assert got.lengths_B[b] == n
    np.testing.assert_allclose(
      got.attention_BTL[b, :n], attention, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(got.attention_BTL[b, n:], 0.0)
    np.testing.assert_allclose(got.log_prob_B[b], log_prob, rtol=1e-5)
  # The fixture is meant to exercise both endings.
  assert min(lengths) < max_len and max(lengths) == max_len


def test_greedy_known_answer_with_a_table():
  got = search.greedy_search(
    _table_step_fn(HAND_TABLE), None, _count_state(2), max_len=4
  )
  np.testing.assert_array_equal(got.tokens_BT, [[A, END, PAD, PAD]] * 2)
  np.testing.assert_array_equal(got.lengths_B, [2, 2])
  np.testing.assert_allclose(got.log_prob_B, np.log([0.2, 0.2]), rtol=1e-6)
  one_hot = [[1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0]]
  np.testing.assert_array_equal(got.attention_BTL, [one_hot] * 2)


def test_pad_and_start_are_never_generated():
  # <pad> and <start> have the largest logits; the words are what is left.
  logits = np.zeros((6, 6))
  logits[:, PAD] = logits[:, START] = 10.0
  logits[:, A] = 1.0
  got = search.greedy_search(
    _table_step_fn(logits), None, _count_state(1), max_len=3
  )
  np.testing.assert_array_equal(got.tokens_BT, [[A, A, A]])
  np.testing.assert_allclose(
    got.log_prob_B, 3 * (1 - np.log(np.exp(1) + 3)), rtol=1e-6
  )


def test_greedy_compiles_once_per_shape(model_and_params):
  model, params = model_and_params
  decoding.greedy_captions(params, _features(), model=model, max_len=MAX_LEN)
  compiled = decoding.greedy_captions._cache_size()  # noqa: SLF001
  for seed in range(1, 3):
    decoding.greedy_captions(
      params, _features(seed=seed), model=model, max_len=MAX_LEN
    )
  assert decoding.greedy_captions._cache_size() == compiled  # noqa: SLF001


def test_decoders_cut_captions_that_never_end():
  # <end> has probability 0: every decoder must stop at max_len with words.
  table = _table(
    {START: {A: 0.6, B_: 0.4}, A: {A: 0.7, B_: 0.3}, B_: {A: 0.5, B_: 0.5}}
  )
  step_fn = _table_step_fn(table)
  vocab = vocab_lib.Vocab(['a', 'b'])
  results = [
    search.greedy_search(step_fn, None, _count_state(2), max_len=5),
    search.temperature_sampling(
      step_fn, None, _count_state(2), jax.random.PRNGKey(0), max_len=5
    ),
    search.beam_search(
      step_fn, None, _count_state(2), max_len=5, beam_size=3
    ).best(),
  ]
  for got in results:
    np.testing.assert_array_equal(got.lengths_B, [5, 5])
    assert all(
      len(t.split()) == 5 and set(t.split()) <= {'a', 'b'}
      for t in vocab.decode_rows(got.tokens_BT)
    )
    assert np.all(np.isfinite(got.log_prob_B))
  np.testing.assert_array_equal(results[0].tokens_BT, [[A] * 5] * 2)
  np.testing.assert_array_equal(results[2].tokens_BT, [[A] * 5] * 2)


# --- Temperature sampling -----------------------------------------------------


def test_sampling_equals_python_loop(model_and_params):
  model, params = model_and_params
  features, max_len, temperature = _features(), MAX_LEN, 0.7
  rng = jax.random.PRNGKey(3)
  got = decoding.sampled_captions(
    params, features, rng, temperature, model=model, max_len=max_len
  )
  variables = {'params': params}
  encoded = model.apply(variables, features, method=captioner.Captioner.encode)
  h = model.apply(
    variables, len(features), method=captioner.Captioner.initial_state
  )
  token = np.full(len(features), START)
  done = np.zeros(len(features), bool)
  expected = np.zeros((len(features), max_len), np.int32)
  log_prob = np.zeros(len(features))
  decode_step = _jitted_decode_step(model)
  for t in range(max_len):
    logits, h, _ = decode_step(variables, h, jnp.asarray(token), encoded)
    log_probs = search.token_log_probs(logits)
    drawn = np.asarray(
      jax.random.categorical(
        jax.random.fold_in(rng, t), log_probs / temperature, axis=-1
      )
    )
    token = np.where(done, PAD, drawn)
    log_prob += np.where(
      done,
      0.0,
      np.take_along_axis(np.asarray(log_probs), token[:, None], axis=1)[:, 0],
    )
    expected[:, t] = token
    done |= token == END
  np.testing.assert_array_equal(got.tokens_BT, expected)
  np.testing.assert_allclose(got.log_prob_B, log_prob, rtol=1e-5)
  # Another key draws other captions.
  other = decoding.sampled_captions(
    params,
    features,
    jax.random.PRNGKey(4),
    temperature,
    model=model,
    max_len=max_len,
  )
  assert not np.array_equal(other.tokens_BT, got.tokens_BT)


@pytest.mark.parametrize('temperature', [0.5, 1.0, 2.0])
def test_sampling_follows_the_tempered_distribution(temperature):
  n = 20_000
  got = search.temperature_sampling(
    _table_step_fn(HAND_TABLE),
    None,
    _count_state(n),
    jax.random.PRNGKey(0),
    max_len=1,
    temperature=temperature,
  )
  first = np.asarray(got.tokens_BT[:, 0])
  frequencies = [np.mean(first == t) for t in (END, A, B_)]
  p = np.array([0.1, 0.5, 0.4]) ** (1 / temperature)
  np.testing.assert_allclose(frequencies, p / p.sum(), atol=0.015)


# --- Beam search --------------------------------------------------------------


def test_beam_size_one_equals_greedy(model_and_params):
  model, params = model_and_params
  features = _features(seed=1)
  greedy = decoding.greedy_captions(
    params, features, model=model, max_len=MAX_LEN
  )
  beam = decoding.beam_captions(
    params, features, model=model, max_len=MAX_LEN, beam_size=1
  ).best()
  np.testing.assert_array_equal(beam.tokens_BT, greedy.tokens_BT)
  np.testing.assert_array_equal(beam.lengths_B, greedy.lengths_B)
  np.testing.assert_allclose(beam.log_prob_B, greedy.log_prob_B, rtol=1e-5)
  np.testing.assert_allclose(
    beam.attention_BTL, greedy.attention_BTL, rtol=1e-5, atol=1e-6
  )


def test_beam_scores_at_least_greedy(model_and_params):
  model, params = model_and_params
  features = _features()
  greedy = decoding.greedy_captions(
    params, features, model=model, max_len=MAX_LEN
  )
  beams = decoding.beam_captions(
    params, features, model=model, max_len=MAX_LEN, beam_size=BEAM
  )
  assert np.all(beams.score_BK[:, 0] >= greedy.log_prob_B - 1e-5)
  # Normalisation off: the score is the log-probability, best first.
  np.testing.assert_array_equal(beams.score_BK, beams.log_prob_BK)
  assert np.all(np.diff(beams.score_BK, axis=1) <= 0)
  # Beam search found better captions than greedy for some images.
  assert np.any(beams.score_BK[:, 0] > greedy.log_prob_B + 1e-3)


def test_beam_batched_equals_per_example(model_and_params):
  model, params = model_and_params
  features = _features(seed=3)
  kwargs = dict(model=model, max_len=MAX_LEN, beam_size=BEAM, alpha=0.7)
  batched = decoding.beam_captions(params, features, **kwargs)
  for b in range(len(features)):
    alone = decoding.beam_captions(params, features[b : b + 1], **kwargs)
    np.testing.assert_array_equal(batched.tokens_BKT[b], alone.tokens_BKT[0])
    np.testing.assert_allclose(
      batched.score_BK[b], alone.score_BK[0], rtol=1e-5
    )
    np.testing.assert_allclose(
      batched.attention_BKTL[b], alone.attention_BKTL[0], rtol=1e-5, atol=1e-6
    )


def test_beam_known_answer_with_a_table():
  got = search.beam_search(
    _table_step_fn(HAND_TABLE), None, _count_state(1), max_len=4, beam_size=2
  )
  np.testing.assert_array_equal(
    got.tokens_BKT, [[[B_, END, PAD, PAD], [A, END, PAD, PAD]]]
  )
  np.testing.assert_array_equal(got.lengths_BK, [[2, 2]])
  np.testing.assert_allclose(got.log_prob_BK, np.log([[0.36, 0.2]]), rtol=1e-6)
  np.testing.assert_allclose(got.score_BK, got.log_prob_BK)
  one_hot = [[1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0]]
  np.testing.assert_array_equal(got.attention_BKTL, [[one_hot, one_hot]])


def _exhaustive(log_probs_VV, max_len, alpha):
  """All captions of up to max_len tokens as (tokens, log_prob, score), best
  first."""
  log_probs_VV = np.asarray(search.token_log_probs(log_probs_VV))
  outputs = [t for t in range(log_probs_VV.shape[0]) if t not in (PAD, START)]
  hypotheses = []
  for n in range(1, max_len + 1):
    for tokens in itertools.product(outputs, repeat=n):
      if END in tokens[:-1] or (n < max_len and tokens[-1] != END):
        continue  # ended early, or neither finished nor cut at max_len
      previous = (START,) + tokens[:-1]
      log_prob = sum(log_probs_VV[p, t] for p, t in zip(previous, tokens))
      score = log_prob / ((5 + n) / 6) ** alpha
      hypotheses.append((list(tokens) + [PAD] * (max_len - n), log_prob, score))
  return sorted(hypotheses, key=lambda h: -h[2])


@pytest.mark.parametrize('alpha', [0.0, 1.0, 3.0])
def test_wide_beam_equals_exhaustive_search(alpha):
  # 3 outputs (<end>, a, b) and 3 steps: 15 captions in all (7 finished, 8 cut
  # at max_len), so a beam of 15 keeps every one of them.
  rng = np.random.default_rng(0)
  table = np.log(rng.dirichlet(np.ones(5), size=5))
  expected = _exhaustive(table, max_len=3, alpha=alpha)
  assert len(expected) == 15
  got = search.beam_search(
    _table_step_fn(table),
    None,
    _count_state(1),
    max_len=3,
    beam_size=15,
    alpha=alpha,
  )
  np.testing.assert_array_equal(got.tokens_BKT[0], [h[0] for h in expected])
  np.testing.assert_allclose(
    got.log_prob_BK[0], [h[1] for h in expected], rtol=1e-5
  )
  np.testing.assert_allclose(
    got.score_BK[0], [h[2] for h in expected], rtol=1e-5
  )


def test_length_normalisation_changes_the_winner():
  # <end> at once (.3) beats "a <end>" (.35 * .8 = .28) on log-probability,
  # but not once scores are divided by ((5 + length) / 6) ** 2.
  table = _table(
    {
      START: {END: 0.3, A: 0.35, B_: 0.35},
      A: {END: 0.8, A: 0.1, B_: 0.1},
      B_: {END: 0.7, A: 0.15, B_: 0.15},
    }
  )
  beam_search = functools.partial(
    search.beam_search,
    _table_step_fn(table),
    None,
    _count_state(1),
    max_len=2,
    beam_size=3,
  )
  raw = beam_search(alpha=0.0)
  np.testing.assert_array_equal(
    raw.tokens_BKT[0], [[END, PAD], [A, END], [B_, END]]
  )
  np.testing.assert_allclose(
    raw.score_BK[0], np.log([0.3, 0.28, 0.245]), rtol=1e-6
  )
  normalised = beam_search(alpha=2.0)
  np.testing.assert_array_equal(normalised.tokens_BKT[0, 0], [A, END])
  np.testing.assert_allclose(
    normalised.score_BK[0, 0], np.log(0.28) / (7 / 6) ** 2, rtol=1e-6
  )
  np.testing.assert_allclose(
    normalised.log_prob_BK[0, 0], np.log(0.28), rtol=1e-6
  )


# --- Dispatch and errors ------------------------------------------------------


def test_caption_features_dispatches(model_and_params):
  model, params = model_and_params
  features = _features()
  kwargs = dict(model=model, max_len=MAX_LEN)
  greedy = decoding.greedy_captions(params, features, **kwargs)
  np.testing.assert_array_equal(
    decoding.caption_features(params, features, **kwargs).tokens_BT,
    greedy.tokens_BT,
  )
  np.testing.assert_array_equal(
    decoding.caption_features(
      params, features, beam_size=BEAM, **kwargs
    ).tokens_BT,
    decoding.beam_captions(
      params, features, beam_size=BEAM, **kwargs
    ).tokens_BKT[:, 0],
  )
  rng = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(
    decoding.caption_features(
      params, features, temperature=0.5, rng=rng, **kwargs
    ).tokens_BT,
    decoding.sampled_captions(params, features, rng, 0.5, **kwargs).tokens_BT,
  )


@pytest.mark.parametrize(
  'kwargs, message',
  [
    (dict(max_len=0), 'max_len must be >= 1'),
    (dict(beam_size=0), 'beam_size must be >= 1'),
    (dict(temperature=-1.0), 'temperature must be >= 0'),
    (dict(beam_size=2, alpha=-0.5), 'alpha must be >= 0'),
    (dict(temperature=1.0), 'needs an rng'),
    (dict(temperature=1.0, beam_size=2, rng=jax.random.PRNGKey(0)), 'not both'),
  ],
)
def test_caption_features_rejects_bad_settings(
  model_and_params, kwargs, message
):
  model, params = model_and_params
  kwargs = dict(dict(max_len=5), **kwargs)
  with pytest.raises(ValueError, match=message):
    decoding.caption_features(params, _features(1), model=model, **kwargs)


def test_bad_feature_shape_is_a_clear_error(model_and_params):
  model, params = model_and_params
  with pytest.raises(ValueError, match=r'expected features \(B, L, D\)'):
    decoding.greedy_captions(params, _features(2)[0], model=model, max_len=5)
