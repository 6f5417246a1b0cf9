"""capjax.model.losses on inputs whose answers are known."""

import jax.numpy as jnp
import numpy as np
import pytest

from capjax.model import losses
from capjax.porting import tutorial_weights


def test_uniform_logits_give_log_vocab_over_real_tokens_only():
  vocab = 7
  targets = np.array([[3, 4, 2, 0, 0], [5, 2, 0, 0, 0]])
  logits = np.zeros((2, 5, vocab), np.float32)
  sums = losses.cross_entropy_sums(logits, targets)
  assert float(sums['token_count']) == 5
  np.testing.assert_allclose(sums['loss_sum'], 5 * np.log(vocab), rtol=1e-6)
  loss, _ = losses.caption_loss(logits, None, targets)
  np.testing.assert_allclose(loss, np.log(vocab), rtol=1e-6)


def test_accuracy_counts_argmax_hits_on_real_tokens():
  targets = np.array([[1, 2, 0]])
  logits = np.full((1, 3, 4), -5.0, np.float32)
  logits[0, 0, 1] = 5.0  # hit
  logits[0, 1, 3] = 5.0  # miss
  logits[0, 2, 0] = 5.0  # would be a hit, but it is padding
  metrics = losses.normalize(losses.cross_entropy_sums(logits, targets))
  assert metrics['accuracy'] == 0.5


def test_sums_over_shards_equal_the_whole_batch():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 6, 9)).astype(np.float32)
  targets = rng.integers(0, 9, size=(4, 6))
  whole = losses.cross_entropy_sums(logits, targets)
  halves = [
    losses.cross_entropy_sums(logits[i : i + 2], targets[i : i + 2])
    for i in (0, 2)
  ]
  for key in whole:
    np.testing.assert_allclose(
      whole[key], halves[0][key] + halves[1][key], rtol=1e-6
    )


def test_attention_penalty_known_value_and_masking():
  # Uniform attention over L=4 positions for 2 real steps: each position gets
  # coverage 2/4, so the penalty is 4 * (1 - 0.5)^2 = 1. The padded third step
  # must not count; the all-pad caption must not count either.
  attention = np.full((2, 3, 4), 0.25, np.float32)
  targets = np.array([[5, 2, 0], [0, 0, 0]])
  sums = losses.attention_penalty_sums(attention, targets)
  np.testing.assert_allclose(sums['penalty_sum'], 1.0)
  assert float(sums['caption_count']) == 1
  logits = np.zeros((2, 3, 6), np.float32)
  loss, _ = losses.caption_loss(
    logits, attention, targets, attention_penalty=0.5
  )
  np.testing.assert_allclose(loss, np.log(6) + 0.5 * 1.0, rtol=1e-6)


def test_shape_mismatch_is_a_clear_error():
  with pytest.raises(ValueError, match='do not match targets'):
    losses.cross_entropy_sums(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), int))


def test_convert_names_every_missing_weight():
  with pytest.raises(ValueError) as info:
    tutorial_weights.params_from_tutorial(
      {'encoder/fc/kernel': np.zeros((2, 2))}
    )
  assert 'decoder/gru/bias' in str(info.value)
  assert 'encoder/fc/bias' in str(info.value)
