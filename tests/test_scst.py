"""Self-critical training: the loss, its gradient, the rewards, the batches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from capjax.data import reference_batches
from capjax.data import vocab as vocab_lib
from capjax.metrics import cider
from capjax.model import captioner
from capjax.model import decoding
from capjax.model import search
from capjax.training import scst
from capjax.training import state as state_lib

_VOCAB, _L, _D = 12, 4, 6
_END = vocab_lib.Vocab.end_id


@pytest.fixture(scope='module')
def tiny():
  model = captioner.Captioner(vocab_size=_VOCAB, embedding_dim=8, units=8)
  params = state_lib.init_params(model, jax.random.PRNGKey(0), (_L, _D))
  features_BLD = jax.random.normal(jax.random.PRNGKey(1), (3, _L, _D))
  return model, params, features_BLD


def _hand_log_prob(model, params, features_LD, tokens):
  """log p(tokens) by calling the decoder's step token by token.

  The policy is the decoders' distribution: softmax over every token but
  <pad> and <start>, which are never generated (search.token_log_probs).
  """
  step_fn = decoding.model_step_fn(model, params)
  encoded = model.apply(
    {'params': params}, features_LD[None], method=captioner.Captioner.encode
  )
  h = model.apply(
    {'params': params}, 1, method=captioner.Captioner.initial_state
  )
  previous, total = vocab_lib.Vocab.start_id, 0.0
  for token in tokens:
    if token == 0:
      break
    logits, h, _ = step_fn(h, jnp.array([previous]), encoded)
    total += search.token_log_probs(logits)[0, token]
    previous = token
  return total


def test_sample_log_probs_are_the_samplers_own(tiny):
  """Teacher-forced log p of samples = what the sampler accumulated."""
  model, params, features_BLD = tiny
  scored = scst.sample_and_score(
    params,
    {'features': features_BLD},
    jax.random.PRNGKey(2),
    None,
    model=model,
    reward_fn=lambda c, b, a: jnp.zeros(c.shape[:2]),
    num_samples=4,
    baseline='mean',
    max_len=7,
  )
  samples_BKT = scored['samples_BKT']
  assert samples_BKT.shape == (3, 4, 7)
  log_p_BK = scst.sequence_log_probs(
    params, features_BLD, samples_BKT, model=model
  )
  rows = jnp.repeat(features_BLD, 4, axis=0)
  sampled = decoding.sampled_captions(
    params, rows, jax.random.PRNGKey(2), 1.0, model=model, max_len=7
  )
  np.testing.assert_array_equal(sampled.tokens_BT.reshape(3, 4, 7), samples_BKT)
  np.testing.assert_allclose(log_p_BK.ravel(), sampled.log_prob_B, atol=1e-5)


def test_loss_and_gradient_equal_a_hand_computation(tiny):
  model, params, features_BLD = tiny
  features_BLD = features_BLD[:2]
  # Ended early, cut at max_len, and an empty caption (only <end>).
  samples_BKT = jnp.array(
    [[[3, 4, _END, 0], [8, 9, 10, 11]], [[6, 6, _END, 0], [_END, 0, 0, 0]]]
  )
  advantage_BK = jnp.array([[0.5, -1.0], [2.0, 1.5]])
  samples_np = np.asarray(samples_BKT)

  def hand_loss(params):
    terms = [
      advantage_BK[b, k]
      * _hand_log_prob(
        model, params, features_BLD[b], [int(t) for t in samples_np[b, k]]
      )
      for b in range(2)
      for k in range(2)
    ]
    return -sum(terms) / 4

  loss_fn = functools.partial(scst.policy_gradient_loss, model=model)
  loss, grads = jax.value_and_grad(loss_fn)(
    params, features_BLD, samples_BKT, advantage_BK
  )
  want_loss, want_grads = jax.jit(jax.value_and_grad(hand_loss))(params)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    grads,
    want_grads,
  )
  # The advantage is a weight, not a path for the gradient.
  np.testing.assert_array_equal(
    jax.grad(lambda a: loss_fn(params, features_BLD, samples_BKT, a))(
      advantage_BK
    ),
    0.0,
  )
  no_grad = jax.grad(
    lambda p: scst.policy_gradient_loss(
      p, features_BLD, samples_BKT, jnp.zeros_like(advantage_BK), model=model
    )
  )(params)
  assert all(
    float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(no_grad)
  )


def test_reference_xent_is_minus_the_mean_log_p_of_the_real_references(tiny):
  """Each reference's log p by hand; padded reference rows count nothing."""
  model, params, features_BLD = tiny
  features_BLD = features_BLD[:2]
  start = vocab_lib.Vocab.start_id
  references_BRT = jnp.array(
    [
      [[start, 3, 4, _END, 0], [start, 5, _END, 0, 0]],
      [[start, 6, 7, 8, _END], [0, 0, 0, 0, 0]],
    ]
  )
  mask_BR = jnp.array([[True, True], [True, False]])
  got = scst.reference_xent(
    params, features_BLD, references_BRT, mask_BR, model=model
  )
  refs = np.asarray(references_BRT)
  want = -np.mean(
    [
      _hand_log_prob(model, params, features_BLD[b], list(refs[b, r, 1:]))
      for b, r in ((0, 0), (0, 1), (1, 0))
    ]
  )
  np.testing.assert_allclose(got, want, rtol=1e-5)
  batch = {
    'features': features_BLD,
    'references': references_BRT,
    'reference_mask': mask_BR,
  }
  samples_BKT = jnp.array([[[3, _END, 0, 0, 0]], [[6, 6, _END, 0, 0]]])
  advantage_BK = jnp.array([[0.5], [-1.0]])
  pg = scst.policy_gradient_loss(
    params, features_BLD, samples_BKT, advantage_BK, model=model
  )
  for weight in (0.0, 0.2):
    loss, xent = scst.mixed_loss(
      params, batch, samples_BKT, advantage_BK, model=model, xent_weight=weight
    )
    np.testing.assert_allclose(loss, pg + weight * want, rtol=1e-5)
    np.testing.assert_allclose(xent, want if weight else 0.0, rtol=1e-5)


def test_baselines():
  reward_BK = jnp.array([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
  np.testing.assert_allclose(
    scst.baseline_of(reward_BK, None, 'mean'),
    [[4.0, 3.5, 1.5], [1.5, 1.5, 0.0]],
  )
  np.testing.assert_allclose(
    scst.baseline_of(reward_BK, jnp.array([0.5, 2.0]), 'greedy'),
    [[0.5] * 3, [2.0] * 3],
  )


def test_padding_after_end_changes_neither_reward_nor_log_prob(tiny):
  model, params, features_BLD = tiny
  references_BRT = jnp.array([[[1, 3, 4, 5, _END, 0]]] * 3)
  mask_BR = jnp.ones((3, 1), bool)
  doc_freqs = cider.document_frequencies(
    np.array([[[1, 3, 4, 5, _END]], [[1, 6, 7, _END, 0]]]), _VOCAB
  )
  samples_BKT = jnp.array(
    [[[3, 4, 5, _END]], [[3, 4, _END, 0]], [[6, 7, 8, 9]]]
  )
  padded_BKT = jnp.pad(samples_BKT, ((0, 0), (0, 0), (0, 5)))
  batch = {'references': references_BRT, 'reference_mask': mask_BR}
  reward = scst.cider_reward(samples_BKT, batch, doc_freqs)
  np.testing.assert_allclose(
    scst.cider_reward(padded_BKT, batch, doc_freqs), reward, rtol=1e-6
  )
  assert float(reward[0, 0]) > float(reward[1, 0]) > 0
  log_p = functools.partial(
    scst.sequence_log_probs, params, features_BLD, model=model
  )
  np.testing.assert_allclose(log_p(padded_BKT), log_p(samples_BKT), rtol=1e-6)


def test_scst_raises_the_frequency_of_a_rewarded_word(trained_workdir):
  """SCST on a trained `shapes` model, rewarded for each 'red' it says."""
  from capjax import inference  # noqa: PLC0415
  from capjax.data import feature_store  # noqa: PLC0415

  trained = inference.load_trained(trained_workdir)
  red = trained.vocab.words.index('red')
  store = feature_store.FeatureStore.open_split(
    trained_workdir / 'features', 'train'
  )
  features_BLD = jnp.asarray(store.read(np.arange(16)), jnp.float32)

  def count_red(candidates_BCT, batch, reward_args):
    del batch, reward_args
    return jnp.sum(candidates_BCT == red, axis=-1).astype(jnp.float32)

  tx = optax.adam(1e-2)
  state = state_lib.TrainState(
    step=jnp.array(0),
    params=trained.params,
    opt_state=tx.init(trained.params),
    rng=jax.random.PRNGKey(0),
  )
  step = jax.jit(
    functools.partial(
      scst.scst_step,
      model=trained.model,
      tx=tx,
      num_samples=4,
      baseline='mean',
      max_len=12,
      reward_fn=count_red,
    )
  )

  def red_per_caption(params):
    captions = decoding.sampled_captions(
      params,
      jnp.repeat(features_BLD, 8, axis=0),
      jax.random.PRNGKey(9),
      1.0,
      model=trained.model,
      max_len=12,
    )
    return float(jnp.mean(jnp.sum(captions.tokens_BT == red, axis=-1)))

  before = red_per_caption(trained.params)
  rewards = []
  for _ in range(30):
    state, metrics = step(state, {'features': features_BLD}, None)
    rewards.append(float(metrics['reward_sum'] / metrics['sample_count']))
  after = red_per_caption(state.params)
  print(f"'red' per sampled caption: {before:.2f} before, {after:.2f} after")
  assert after > before + 0.3 and after > 0.9
  assert np.mean(rewards[-5:]) > np.mean(rewards[:5])


def _references(tokens_by_image):
  """Examples of images 0.. with the given captions' token rows."""
  image_index, tokens = [], []
  for image, captions in enumerate(tokens_by_image):
    for caption in captions:
      image_index.append(image)
      tokens.append(caption + [0] * (6 - len(caption)))
  tokens = np.array(tokens, np.int32)
  return reference_batches.image_references(
    reference_batches.input_pipeline.Examples(
      store=None,
      image_index=np.array(image_index),
      tokens=tokens,
      lengths=np.sum(tokens != 0, axis=1),
    )
  )


def test_image_references_group_every_caption_of_an_image():
  refs = _references(
    [
      [[1, 5, 2]],
      [[1, 6, 7, 2], [1, 8, 2], [1, 9, 2]],
      [[1, 3, 2], [1, 4, 4, 2]],
    ]
  )
  np.testing.assert_array_equal(refs.rows_M, [0, 1, 2])
  assert refs.references_MRT.shape == (3, 3, 4)
  np.testing.assert_array_equal(
    refs.references_MRT[1], [[1, 6, 7, 2], [1, 8, 2, 0], [1, 9, 2, 0]]
  )
  np.testing.assert_array_equal(refs.references_MRT[0, 1:], 0)


def test_image_batches_are_a_pure_function_of_the_step():

  class Store:
    dtype = np.float32

    def read(self, rows):
      return np.asarray(rows, np.float32)[:, None, None]

  refs = _references([[[1, 3 + i % 8, 2]] for i in range(10)])
  refs = reference_batches.ImageReferences(
    Store(), refs.rows_M, refs.references_MRT
  )
  make = functools.partial(
    reference_batches.ImageBatches, refs, batch_size=4, seed=3
  )
  whole = make()
  assert whole.steps_per_epoch == 2
  epoch = np.concatenate([whole.images(0), whole.images(1)])
  assert len(set(epoch)) == 8
  assert not np.array_equal(whole.images(2), whole.images(0))
  halves = [make(process_index=p, process_count=2) for p in (0, 1)]
  for step in (0, 1, 5):
    np.testing.assert_array_equal(
      np.concatenate([h.images(step) for h in halves]), whole.images(step)
    )
    batch = halves[1].batch(step)
    np.testing.assert_array_equal(
      batch['features'][:, 0, 0], whole.images(step)[2:]
    )
    np.testing.assert_array_equal(batch['reference_mask'], True)
  np.testing.assert_array_equal(
    make().batch(7)['references'], whole.batch(7)['references']
  )
