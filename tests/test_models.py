"""capjax.model.captioner against the TensorFlow tutorial's; invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf

from capjax.model import captioner
from capjax.model import losses
from capjax.porting import tutorial_weights
from capjax.testing import tf_reference as ref

SMALL = dict(
  vocab_size=40, embedding_dim=16, units=24, feature_dim=12, num_positions=6
)
TUTORIAL = dict(
  vocab_size=5001,
  embedding_dim=256,
  units=512,
  feature_dim=2048,
  num_positions=64,
)


def _inputs(sizes, batch=3, length=9, seed=0):
  """Random non-negative features (CNN outputs are post-ReLU) and captions.

  Captions are <start>=1, words, <end>=2, then <pad>=0, of varied lengths.
  """
  rng = np.random.default_rng(seed)
  features = np.abs(
    rng.normal(size=(batch, sizes['num_positions'], sizes['feature_dim']))
  ).astype(np.float32)
  tokens = np.zeros((batch, length), np.int32)
  for b in range(batch):
    n = length - 2 * b  # real tokens including <start> and <end>
    tokens[b, 0] = 1
    tokens[b, 1 : n - 1] = rng.integers(4, sizes['vocab_size'], size=n - 2)
    tokens[b, n - 1] = 2
  return features, tokens


def _reference(sizes, carry_gru_state):
  encoder, decoder = ref.build(carry_gru_state=carry_gru_state, **sizes)
  ref.perturb_biases(encoder, decoder)
  return encoder, decoder


def _capjax(sizes, carry_gru_state, encoder, decoder, **kwargs):
  model = captioner.Captioner(
    vocab_size=sizes['vocab_size'],
    embedding_dim=sizes['embedding_dim'],
    units=sizes['units'],
    carry_gru_state=carry_gru_state,
    **kwargs,
  )
  params = tutorial_weights.params_from_tutorial(ref.weights(encoder, decoder))
  return model, jax.tree_util.tree_map(jnp.asarray, params)


def _loss_fn(model, features, tokens):

  def loss(params):
    logits, attention = model.apply({'params': params}, features, tokens)
    return losses.caption_loss(logits, attention, tokens[:, 1:])[0]

  return loss


def _reference_loss_and_grads(encoder, decoder, features, tokens):
  named = ref.variables(encoder, decoder)
  with tf.GradientTape() as tape:
    logits, _ = ref.teacher_forced(encoder, decoder, features, tokens)
    loss = ref.masked_loss(tokens, logits)
  grads = tape.gradient(loss, list(named.values()))
  grads = {
    name: tf.convert_to_tensor(g).numpy() for name, g in zip(named, grads)
  }
  return float(loss), tutorial_weights.params_from_tutorial(grads)


def _max_abs_diff(a, b):
  diffs = jax.tree_util.tree_map(
    lambda x, y: float(np.max(np.abs(x - y))), a, b
  )
  return max(jax.tree_util.tree_leaves(diffs))


@pytest.mark.parametrize('carry_gru_state', [True, False])
@pytest.mark.parametrize('sizes', [SMALL, TUTORIAL], ids=['small', 'tutorial'])
def test_logits_loss_and_grads_match_reference(sizes, carry_gru_state):
  encoder, decoder = _reference(sizes, carry_gru_state)
  model, params = _capjax(sizes, carry_gru_state, encoder, decoder)
  features, tokens = _inputs(sizes)

  ref_logits, ref_attention = ref.teacher_forced(
    encoder, decoder, features, tokens
  )
  logits, attention = jax.jit(model.apply)({'params': params}, features, tokens)
  assert logits.shape == (3, 8, sizes['vocab_size'])
  assert attention.shape == (3, 8, sizes['num_positions'])
  np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=0, atol=1e-4)
  np.testing.assert_allclose(
    attention, ref_attention.numpy(), rtol=0, atol=1e-5
  )

  ref_loss, ref_grads = _reference_loss_and_grads(
    encoder, decoder, features, tokens
  )
  loss, grads = jax.jit(jax.value_and_grad(_loss_fn(model, features, tokens)))(
    params
  )
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(
    ref_grads
  )
  jax.tree_util.tree_map_with_path(
    lambda path, g, r: np.testing.assert_allclose(
      g, r, rtol=1e-3, atol=1e-6, err_msg=jax.tree_util.keystr(path)
    ),
    grads,
    ref_grads,
  )


def test_one_adam_step_matches_keras_adam():
  sizes, lr = SMALL, 1e-3
  encoder, decoder = _reference(sizes, True)
  model, params = _capjax(sizes, True, encoder, decoder)
  features, tokens = _inputs(sizes)

  named = ref.variables(encoder, decoder)
  keras_adam = tf.keras.optimizers.Adam(learning_rate=lr)
  with tf.GradientTape() as tape:
    logits, _ = ref.teacher_forced(encoder, decoder, features, tokens)
    loss = ref.masked_loss(tokens, logits)
  # Densify the embedding's IndexedSlices: Keras' sparse Adam path adds up
  # g**2 per duplicate index instead of squaring the summed gradient, which is
  # not Adam for a token that occurs twice in a batch. capjax does dense Adam.
  grads = [
    tf.convert_to_tensor(g) for g in tape.gradient(loss, list(named.values()))
  ]
  keras_adam.apply_gradients(zip(grads, named.values()))
  keras_params = tutorial_weights.params_from_tutorial(
    ref.weights(encoder, decoder)
  )

  # Keras adds epsilon to sqrt(v) before bias correction, optax after: at
  # step t Keras' epsilon is optax's times sqrt(1 - b2**t). Step 1 here.
  tx = optax.adam(lr, b1=0.9, b2=0.999, eps=1e-7 / np.sqrt(1 - 0.999))
  grads = jax.grad(_loss_fn(model, features, tokens))(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new_params = optax.apply_updates(params, updates)

  assert _max_abs_diff(new_params, params) > 5e-4  # the step did move them
  np.testing.assert_allclose(
    _max_abs_diff(new_params, keras_params), 0, atol=1e-6
  )


def test_scan_equals_python_loop_over_decode_step():
  model = captioner.Captioner(vocab_size=30, embedding_dim=8, units=16)
  features, tokens = _inputs(dict(SMALL, vocab_size=30, feature_dim=5))
  variables = model.init(jax.random.key(0), features, tokens)
  logits, attention = model.apply(variables, features, tokens)

  encoded = model.apply(variables, features, method=captioner.Captioner.encode)
  h = model.apply(
    variables, tokens.shape[0], method=captioner.Captioner.initial_state
  )
  step = jax.jit(
    lambda h, token: model.apply(
      variables, h, token, encoded, method=captioner.Captioner.decode_step
    )
  )
  for t in range(tokens.shape[1] - 1):
    step_logits, h, step_attention = step(h, tokens[:, t])
    np.testing.assert_allclose(step_logits, logits[:, t], atol=1e-5)
    np.testing.assert_allclose(step_attention, attention[:, t], atol=1e-6)


def test_padding_length_changes_nothing():
  """Bucketing pads a caption further: loss and gradients must not move."""
  model = captioner.Captioner(vocab_size=30, embedding_dim=8, units=16)
  features, tokens = _inputs(dict(SMALL, vocab_size=30))
  longer = np.pad(tokens, ((0, 0), (0, 7)))
  params = model.init(jax.random.key(0), features, tokens)['params']

  loss, grads = jax.value_and_grad(_loss_fn(model, features, tokens))(params)
  loss_long, grads_long = jax.value_and_grad(_loss_fn(model, features, longer))(
    params
  )
  np.testing.assert_allclose(loss_long, loss, rtol=1e-6)
  assert _max_abs_diff(grads_long, grads) < 1e-6


def test_tokens_after_end_do_not_affect_loss():
  """Whatever sits after <end> (in input positions whose target is pad)."""
  model = captioner.Captioner(vocab_size=30, embedding_dim=8, units=16)
  features, tokens = _inputs(dict(SMALL, vocab_size=30))
  params = model.init(jax.random.key(0), features, tokens)['params']

  def loss_and_grads(inputs_BT):
    def loss(params):
      logits, attention = model.apply({'params': params}, features, inputs_BT)
      return losses.caption_loss(logits, attention, tokens[:, 1:])[0]

    return jax.value_and_grad(loss)(params)

  garbage = tokens.copy()
  last_real = (tokens != 0).sum(axis=1) - 1  # index of <end>
  for b, end in enumerate(last_real):
    garbage[b, end:] = 7  # overwrite <end> and the padding after it
  loss, grads = loss_and_grads(tokens)
  loss_garbage, grads_garbage = loss_and_grads(garbage)
  np.testing.assert_allclose(loss_garbage, loss, rtol=1e-6)
  # The embedding row of the garbage token gets no gradient either.
  assert _max_abs_diff(grads_garbage, grads) < 1e-6


def test_causality():
  """Logits at step t have zero gradient with respect to inputs after t."""
  model = captioner.Captioner(vocab_size=30, embedding_dim=8, units=16)
  features, tokens = _inputs(dict(SMALL, vocab_size=30), batch=1, length=6)
  variables = model.init(jax.random.key(0), features, tokens)

  def logits_from_token_inputs(token_in_BT3U):
    def fn(module):
      encoded = module.encode(features)
      h_BTU, _ = module.unroll(encoded, token_in_BT3U)
      return module.head(h_BTU)

    return nn_apply(fn)

  def nn_apply(fn):
    return model.apply(variables, method=lambda module: fn(module))

  token_in = model.apply(
    variables, tokens[:, :-1], method=captioner.Captioner.token_inputs
  )
  jac = jax.jacrev(logits_from_token_inputs)(token_in)  # (1,T,V, 1,T,3U)
  per_pair = np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 5))  # (T_out, T_in)
  steps = per_pair.shape[0]
  for t in range(steps):
    for s in range(steps):
      if s > t:
        assert per_pair[t, s] == 0.0, (t, s)
      else:
        assert per_pair[t, s] > 0.0, (t, s)


def test_bfloat16_compute_stays_close_to_float32():
  sizes = dict(
    vocab_size=500,
    embedding_dim=64,
    units=128,
    feature_dim=256,
    num_positions=16,
  )
  features, tokens = _inputs(sizes, batch=4, length=12)
  model32 = captioner.Captioner(vocab_size=500, embedding_dim=64, units=128)
  model16 = captioner.Captioner(
    vocab_size=500, embedding_dim=64, units=128, dtype=jnp.bfloat16
  )
  params = model32.init(jax.random.key(0), features, tokens)['params']
  params16 = model16.init(jax.random.key(0), features, tokens)['params']
  assert all(
    p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params16)
  )

  logits32, attention32 = model32.apply({'params': params}, features, tokens)
  logits16, attention16 = model16.apply({'params': params}, features, tokens)
  assert logits16.dtype == jnp.float32  # logits come back in float32
  # bfloat16 keeps 8 significant bits (relative rounding 2**-9 = 0.2%);
  # errors compound through the 11-step recurrence and the 64-256 term dot
  # products, so allow 2% of the logit range, and compare the quantity that
  # training optimises more tightly.
  scale = float(np.max(np.abs(logits32)))
  assert float(np.max(np.abs(logits16 - logits32))) < 0.02 * scale
  assert float(np.max(np.abs(attention16 - attention32))) < 0.01
  loss32 = losses.caption_loss(logits32, attention32, tokens[:, 1:])[0]
  loss16 = losses.caption_loss(logits16, attention16, tokens[:, 1:])[0]
  np.testing.assert_allclose(loss16, loss32, rtol=5e-3)


def test_dropout_is_off_when_deterministic_and_on_otherwise():
  features, tokens = _inputs(dict(SMALL, vocab_size=30))
  plain = captioner.Captioner(vocab_size=30, embedding_dim=8, units=16)
  dropout = captioner.Captioner(
    vocab_size=30, embedding_dim=8, units=16, dropout_rate=0.5
  )
  variables = plain.init(jax.random.key(0), features, tokens)
  expected, _ = plain.apply(variables, features, tokens)
  same, _ = dropout.apply(variables, features, tokens, deterministic=True)
  np.testing.assert_array_equal(same, expected)
  rngs = {'dropout': jax.random.key(1)}
  dropped, _ = dropout.apply(
    variables, features, tokens, deterministic=False, rngs=rngs
  )
  again, _ = dropout.apply(
    variables, features, tokens, deterministic=False, rngs=rngs
  )
  assert float(np.max(np.abs(dropped - expected))) > 1e-3
  np.testing.assert_array_equal(dropped, again)


def test_shape_errors_are_clear():
  model = captioner.Captioner(vocab_size=30, embedding_dim=8, units=16)
  features, tokens = _inputs(dict(SMALL, vocab_size=30))
  variables = model.init(jax.random.key(0), features, tokens)
  with pytest.raises(ValueError, match=r'expected features \(B, L, D\)'):
    model.apply(variables, features[0], tokens)
  with pytest.raises(ValueError, match='batch size'):
    model.apply(variables, features[:2], tokens)


def test_nothing_hard_codes_the_feature_grid():
  model = captioner.Captioner(vocab_size=30, embedding_dim=8, units=16)
  for positions, dim in [(64, 2048), (49, 512), (1, 3)]:
    features = np.ones((2, positions, dim), np.float32)
    tokens = np.array([[1, 5, 2], [1, 2, 0]], np.int32)
    variables = model.init(jax.random.key(0), features, tokens)
    logits, attention = model.apply(variables, features, tokens)
    assert logits.shape == (2, 2, 30)
    assert attention.shape == (2, 2, positions)
